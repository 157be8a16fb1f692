"""Shared benchmark machinery: interleaved timing, statistics, machine facts, synthetic images, isolated processes.

Timing rules (every benchmark follows them): each variant runs once or more as warm-up, then every repetition runs
every compared variant once, in an order rotated by one per repetition, so slow drift (other load, frequency changes)
hits all variants alike. Results are medians with min/max and quartiles; comparisons are ratios paired within a
repetition.
"""

import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


# The small FineViT-VL of the training-step and generation benchmarks: encoder preset + Qwen3 text config, for the
# full and the quick (smoke) settings.
SMALL_VL = {
    "full": {"vision_preset": "finevit-tiny",
             "text": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096}},
    "quick": {"vision_preset": "finevit-test",
              "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}},
}

# Keys every benchmark result carries (checked by the smoke test).
RESULT_KEYS = ("benchmark", "title", "quick", "settings", "results", "goals", "notes", "machine", "elapsed_s")


# ---------------------------------------------------------------------------------------------------------- timing


def time_interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, `repeats` samples each, variants interleaved and their order rotated."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of `values`."""
    q1, q3 = np.percentile(values, [25, 75]).tolist()
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "n": len(values)}


def rate(seconds: list[float], work: float) -> dict[str, float]:
    """Summary of `work / seconds` per sample (e.g. images/s)."""
    return summarize([work / s for s in seconds])


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Summary of per-repetition ratios `numerator[i] / denominator[i]` (a speed-up when both are times)."""
    return summarize([a / b for a, b in zip(numerator, denominator)])


def fmt_stat(summary: dict[str, float], digits: int = 2, scale: float = 1.0) -> str:
    """`median [min-max]` for a markdown cell."""
    m, lo, hi = (summary[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


# ---------------------------------------------------------------------------------------------------------- GEMM peak

GEMM_SIZE = 2048


def gemm_variant(dtype: torch.dtype, size: int = GEMM_SIZE) -> tuple[Callable[[], object], float]:
    """A `size^3` matmul to interleave with the measured variants (the peak they are compared with), and its FLOPs."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * size**3


# ---------------------------------------------------------------------------------------------------------- machine


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Where and with what the numbers were measured."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torchvision": _version("torchvision"),
        "pillow": _version("pillow"),
        "numpy": np.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def peak_memory_growth_mb(fn: Callable[[], object]) -> float | None:
    """How far one call of `fn` raises the resident set size above where it started, MiB (Linux).

    Freed heap memory is first handed back to the OS (`malloc_trim`) and the kernel's peak-RSS mark is reset
    (`/proc/self/clear_refs` <- 5), so the peak (`VmHWM`) covers this call only and variants can be measured one
    after another in one process. Counts everything the call allocates (activations, temporaries, gradients,
    outputs), not what already existed (weights, inputs). `None` where the kernel offers no reset.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _status_mb("VmRSS")
    except OSError:
        return None
    fn()
    return max(0.0, _status_mb("VmHWM") - before)


def run_isolated(target: str, isolated: bool = True, **kwargs) -> dict:
    """Run `"package.module:function"(**kwargs)` in a fresh Python process and return its JSON result.

    Used for profiles: they stay out of the timing process, and the profiler's C++ log lines are silenced there.
    `isolated=False` calls the function in this process instead (quick smoke settings, where the ~10 s start-up of
    a process would dominate).
    """
    if not isolated:
        return _resolve(target)(**kwargs)
    payload = json.dumps({"target": target, "kwargs": kwargs, "threads": torch.get_num_threads()})
    code = "from finevit_vl.benchmarking.common import _isolated_main; _isolated_main()"
    env = {**os.environ, "KINETO_LOG_LEVEL": "5"}  # silence the profiler's C++ start/stop log lines
    completed = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, check=False,
                               env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"isolated benchmark {target} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _resolve(target: str) -> Callable:
    import importlib

    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _isolated_main() -> None:
    payload = json.loads(sys.argv[1])
    torch.set_num_threads(payload["threads"])
    print(json.dumps(_resolve(payload["target"])(**payload["kwargs"])))


# ---------------------------------------------------------------------------------------------------------- inputs


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with smooth colour regions plus fine noise (so resizing does real work)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    image = image + rng.integers(-12, 13, image.shape, dtype=np.int16)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def lengths_of(grid_thw: torch.Tensor) -> list[int]:
    """Patches per image of a `(n, 3)` grid."""
    return grid_thw.prod(-1).tolist()


def sizes_text(sizes: list) -> str:
    """`[(640, 480), ...]` -> `"640x480, ..."`."""
    return ", ".join(f"{w}x{h}" for w, h in sizes)


def result_skeleton(name: str, title: str, quick: bool, settings: dict) -> dict:
    return {"benchmark": name, "title": title, "quick": quick, "settings": settings, "results": {}, "goals": [],
            "notes": []}


def goal(description: str, measured: float, target: float, detail: str = "") -> dict:
    """One goal line: met when `measured >= target`."""
    return {"goal": description, "target": target, "measured": measured, "met": bool(measured >= target),
            "detail": detail}


def goals_markdown(goals: list[dict]) -> str:
    if not goals:
        return ""
    lines = ["| goal | target | measured | met |", "|---|---|---|---|"]
    for entry in goals:
        detail = f" ({entry['detail']})" if entry.get("detail") else ""
        lines.append(f"| {entry['goal']} | {entry['target']:g} | {entry['measured']:.2f}{detail} | "
                     f"{'yes' if entry['met'] else '**no**'} |")
    return "\n".join(lines)


__all__ = [
    "GEMM_SIZE",
    "RESULT_KEYS",
    "SMALL_VL",
    "fmt_stat",
    "gemm_variant",
    "goal",
    "goals_markdown",
    "lengths_of",
    "machine_info",
    "paired_ratio",
    "peak_memory_growth_mb",
    "rate",
    "result_skeleton",
    "run_isolated",
    "sizes_text",
    "summarize",
    "synthetic_image",
    "time_interleaved",
]
