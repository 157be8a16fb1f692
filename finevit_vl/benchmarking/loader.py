"""Benchmark 6: the training data loader alone, in-process vs DataLoader workers.

The same JSONL records (camera-sized JPEGs with captions) go through `TrainStream` (decode, EXIF, resize to the
stage's pixel budget, tokenize, collate) with `data.num_workers` = 0 (in-process: the previous serial path) and 1, 2,
4 worker processes. Each repetition builds a fresh stream per variant, in rotated order; start-up (until the first
step is ready) and steady-state samples/s (the following steps) are reported separately.
"""

import tempfile
import time
from pathlib import Path

from ..data import JsonlSource
from ..data.collator import SampleEncoder
from ..tiny import build_tiny_model
from ..train.data import BadRecordLog, TrainStream
from .common import (
    fmt_stat,
    goal,
    goals_markdown,
    paired_ratio,
    result_skeleton,
    sizes_text,
    summarize,
    synthetic_image,
)


IMAGE_SIZES = [(1024, 768), (800, 1200), (1600, 900), (640, 480)]

SETTINGS = {
    "full": {"image_sizes": IMAGE_SIZES, "records": 96, "max_pixels": 448 * 448, "samples_per_step": 8,
             "steps": 24, "workers": [0, 1, 2, 4], "repeats": 3},
    "quick": {"image_sizes": [(320, 240), (200, 300)], "records": 8, "max_pixels": 112 * 112,
              "samples_per_step": 2, "steps": 2, "workers": [0, 2], "repeats": 1},
}


def _write_records(folder: Path, s: dict) -> Path:
    lines = []
    for i in range(s["records"]):
        width, height = s["image_sizes"][i % len(s["image_sizes"])]
        name = f"image_{i:04d}.jpg"
        synthetic_image(width, height, seed=i).save(folder / name, quality=90)
        lines.append(f'{{"id": "r{i}", "image": "{name}", "task": "caption", '
                     f'"caption": "a photo with many small coloured regions, number {i}"}}')
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _time_stream(path: Path, processor, workers: int, s: dict) -> tuple[float, float]:
    """(seconds until the first step is ready, seconds for the next `steps` steps)."""
    encoder = SampleEncoder(processor, max_length=1024)
    start = time.perf_counter()
    stream = TrainStream(JsonlSource(path), encoder, s["samples_per_step"], micro_batch_size=s["samples_per_step"],
                         pack=False, pad_token_id=processor.tokenizer.pad_token_id, bad_records=BadRecordLog(None),
                         num_workers=workers)
    stream.next_step()
    ready = time.perf_counter()
    for _ in range(s["steps"]):
        step = stream.next_step()
        if step.stop_reason is not None:
            raise RuntimeError(step.stop_reason)
    return ready - start, time.perf_counter() - ready


def run(quick: bool = False) -> dict:
    s = SETTINGS["quick" if quick else "full"]
    result = result_skeleton("loader", "Training data loader: in-process vs DataLoader workers", quick, s)
    processor = build_tiny_model(max_pixels=s["max_pixels"])[1]
    names = [f"workers_{n}" for n in s["workers"]]
    startup: dict[str, list[float]] = {name: [] for name in names}
    steady: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as folder:
        path = _write_records(Path(folder), s)
        for repetition in range(s["repeats"]):
            shift = repetition % len(names)
            for name, workers in list(zip(names, s["workers"]))[shift:] + list(zip(names, s["workers"]))[:shift]:
                first, rest = _time_stream(path, processor, workers, s)
                startup[name].append(first)
                steady[name].append(rest)
    samples = s["steps"] * s["samples_per_step"]
    result["results"] = {
        "samples_per_s": {name: summarize([samples / t for t in steady[name]]) for name in names},
        "startup_seconds": {name: summarize(startup[name]) for name in names},
        "speedup_vs_in_process": {name: paired_ratio(steady["workers_0"], steady[name]) for name in names},
    }
    if "workers_2" in names:
        speedup = result["results"]["speedup_vs_in_process"]["workers_2"]
        result["goals"].append(goal("loader samples/s, 2 workers vs in-process (x)", speedup["median"], 1.5,
                                    f"range {speedup['min']:.2f}-{speedup['max']:.2f}"))
    result["notes"].append("Workers are processes (fork); the main process still packs and collates. On a machine "
                           "with C cores, more than C - 1 workers only add contention.")
    return result


def markdown(result: dict) -> str:
    r, s = result["results"], result["settings"]
    lines = [
        (f"{s['records']} JPEG records ({sizes_text(s['image_sizes'])}) resized to max_pixels {s['max_pixels']}, "
         f"{s['samples_per_step']} samples per step; start-up = until the first step is ready, then "
         f"{s['steps']} steps timed; {s['repeats']} repetitions in rotated order."),
        "",
        "| data.num_workers | samples/s | speed-up vs in-process | start-up (s) |",
        "|---|---|---|---|",
    ]
    for name in r["samples_per_s"]:
        lines.append(f"| {name.split('_')[1]} | {fmt_stat(r['samples_per_s'][name], 1)} | "
                     f"{fmt_stat(r['speedup_vs_in_process'][name])} | {fmt_stat(r['startup_seconds'][name])} |")
    return "\n".join(lines + ["", goals_markdown(result["goals"])])


__all__ = ["markdown", "run"]
