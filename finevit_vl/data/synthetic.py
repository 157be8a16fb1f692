"""``finevit-vl make-data``: a small synthetic fine-grained data set that a tiny model can learn in CPU minutes.

Writes the scenes of `finevit_vl.data.scenes` (counting, grounding, OCR, bar charts, documents) for a train and an
eval split. Output (``OUT`` = ``--out``)::

    OUT/images/{train,eval}/{family}/{index:06d}.png
    OUT/stage3/{train,eval}.jsonl     Stage III records: caption / region / ocr / grounding tasks
    OUT/sft/{train,eval}.jsonl        SFT records: one single-turn conversation per image
    OUT/eval/<folder>/<split>.parquet   benchmark schemas, from the eval images (`benchmark_data.PARQUET_FILES`)
    OUT/make_data.json                the arguments and the counts, to reproduce the run
    OUT/pretrain/...                  with --pretrain only: the encoder pretraining set (`pretrain_data`)

Image paths in the JSONL files are relative to the JSONL's folder (``../images/...``), the `JsonlSource` default.
Train and eval images come from disjoint seed streams (``"{seed}:{split}:{family}:{index}"``); the same seed gives
byte-identical JSONL and PNG files, whatever ``--workers`` (text pixels may differ across Pillow/FreeType versions).
Existing files are overwritten; nothing is deleted. Each benchmark row matches the record of the same eval image in
``sft/eval.jsonl``.
"""

import argparse
import contextlib
import io
import json
import os
import random
import sys
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from ..benchmark_data import PARQUET_FILES, parquet_features
from .pretrain_data import make_pretrain_data
from .scenes import FAMILIES, MAKERS, Settings
from .schema import Record


@dataclass
class Generated:
    """What one image contributes to the output files."""

    stage3: list[Record]
    sft: Record
    benchmarks: dict[str, dict[str, Any]]  # eval images only; rows embed the PNG bytes


def generate_one(out: Path, settings: Settings, seed: int, split: str, family: str, index: int) -> Generated:
    """Draw image ``index`` of ``family`` for ``split``, write its PNG, and return its records and benchmark rows."""
    rng = random.Random(f"{seed}:{split}:{family}:{index}")  # string seeds are hashed with SHA-512: stable everywhere
    scene = MAKERS[family](rng, settings)
    relative = f"images/{split}/{family}/{index:06d}.png"
    buffer = io.BytesIO()
    scene.image.save(buffer, format="PNG", compress_level=1)  # fast; these flat images compress well anyway
    png = buffer.getvalue()
    (out / relative).write_bytes(png)
    base_id = f"{split}-{family}-{index:06d}"
    # Records live in OUT/stage3 and OUT/sft; images are referenced relative to those folders.
    common = {"image": f"../{relative}", "width": scene.image.width, "height": scene.image.height}
    stage3 = [{"id": f"{base_id}-{r['task']}", **common, **r} for r in scene.stage3]
    sft: Record = {
        "id": f"{base_id}-qa",
        **common,
        "task": "conversation",
        "conversations": [{"role": "user", "content": scene.prompt}, {"role": "assistant", "content": scene.answer}],
    }
    if scene.boxes:
        sft["boxes"] = scene.boxes
    benchmarks = {}
    for name, row in scene.benchmarks.items() if split == "eval" else ():
        ids = {
            "docvqa": {"questionId": base_id, "docId": index, "ucsf_document_id": base_id},
            "refcoco": {"question_id": base_id, "file_name": f"{base_id}.png"},
        }.get(name, {})
        benchmarks[name] = {**ids, **row, "image": {"bytes": png, "path": f"{base_id}.png"}}
    return Generated(stage3, sft, benchmarks)


def _generate_job(job: tuple[Path, Settings, int, str, str, int]) -> Generated:
    return generate_one(*job)


def _write_jsonl(path: Path, records: list[Record]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _write_parquet(path: Path, name: str, rows: list[dict[str, Any]]) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    # Silence the progress bars for this call only: a caller (e.g. quickstart) may want its own.
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_list(rows, features=parquet_features(name)).to_parquet(str(path))
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def make_data(
    out: str | os.PathLike,
    seed: int = 0,
    train_per_task: int = 1000,
    eval_per_task: int = 100,
    settings: Settings | None = None,
    families: tuple[str, ...] = FAMILIES,
    workers: int = 1,
) -> dict[str, int]:
    """Write the data set under ``out`` (see the module docstring); returns ``{relative file: row count}``."""
    settings = settings or Settings()
    unknown = [family for family in families if family not in MAKERS]
    if unknown:
        raise ValueError(f"unknown task family {unknown}; choose from {FAMILIES}")
    out = Path(out)
    counts: dict[str, int] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for split, per_task in (("train", train_per_task), ("eval", eval_per_task)):
            for family in families:
                (out / "images" / split / family).mkdir(parents=True, exist_ok=True)
            jobs = [(out, settings, seed, split, family, index) for family in families for index in range(per_task)]
            if pool is None:
                generated = [_generate_job(job) for job in jobs]
            else:  # map keeps the job order, so the output does not depend on the number of workers
                generated = pool.map(_generate_job, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
            counts.update(_write_split(out, seed, split, generated))
            for item in generated:
                for name, row in item.benchmarks.items():
                    rows.setdefault(name, []).append(row)
    for name, benchmark_rows in rows.items():
        _write_parquet(out / "eval" / PARQUET_FILES[name], name, benchmark_rows)
        counts[f"eval/{PARQUET_FILES[name]}"] = len(benchmark_rows)
    return counts


def _write_split(out: Path, seed: int, split: str, generated: list[Generated]) -> dict[str, int]:
    """Write the Stage III and SFT JSONL files of one split; return their row counts."""
    counts = {f"images/{split}": len(generated)}
    stage3 = [record for item in generated for record in item.stage3]
    sft = [item.sft for item in generated]
    if split == "train":
        # Interleave families so any prefix of the file is a balanced mixture.
        random.Random(f"{seed}:shuffle:stage3").shuffle(stage3)
        random.Random(f"{seed}:shuffle:sft").shuffle(sft)
    for folder, records in (("stage3", stage3), ("sft", sft)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        _write_jsonl(out / folder / f"{split}.jsonl", records)
        counts[f"{folder}/{split}.jsonl"] = len(records)
    return counts


PRETRAIN_ARGUMENTS = frozenset({"pretrain", "pretrain_train", "pretrain_eval", "group_size", "pretrain_image_size"})


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finevit-vl make-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same seed writes byte-identical files (default: 0)")
    parser.add_argument("--train-per-task", type=int, default=1000, help="training images per task family")
    parser.add_argument("--eval-per-task", type=int, default=100, help="held-out images per task family")
    parser.add_argument(
        "--image-size", type=int, default=224, help="typical image side in pixels (sides vary 0.75x-1.25x)"
    )
    parser.add_argument("--max-count", type=int, default=6, help="largest count in the counting family (1-9)")
    parser.add_argument(
        "--tasks", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="task families to generate"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes drawing images")
    pretrain = parser.add_argument_group(
        "encoder pretraining data",
        "--pretrain writes, IN ADDITION to the Stage III / SFT set, the Stage I / II and zero-shot set of "
        "finevit_vl.data.pretrain_data into OUT/pretrain (add --train-per-task 0 --eval-per-task 0 to write it alone)",
    )
    pretrain.add_argument("--pretrain", action="store_true", help="also write OUT/pretrain (see above)")
    pretrain.add_argument("--pretrain-train", type=int, default=2000, help="Stage I / II training images")
    pretrain.add_argument(
        "--pretrain-eval", type=int, default=200, help="images per held-out split (Stage II eval, each zero-shot task)"
    )
    pretrain.add_argument(
        "--group-size", type=int, default=8, help="images that share the start of their long caption (default: 8)"
    )
    pretrain.add_argument(
        "--pretrain-image-size", type=int, default=112, help="typical image side of the pretraining set (default: 112)"
    )
    args = parser.parse_args(argv)
    if args.train_per_task < 0 or args.eval_per_task < 0:
        parser.error("--train-per-task and --eval-per-task must be >= 0")
    if not 112 <= args.image_size <= 2048:
        parser.error(f"--image-size {args.image_size}: choose 112-2048 pixels")
    if not 1 <= args.max_count <= 9:
        parser.error(f"--max-count {args.max_count}: choose 1-9 (the smallest canvas has 3x3 cells)")
    if args.pretrain_train < 0 or args.pretrain_eval < 0 or args.group_size < 1:
        parser.error("--pretrain-train and --pretrain-eval must be >= 0 and --group-size >= 1")
    if not 112 <= args.pretrain_image_size <= 2048:
        parser.error(f"--pretrain-image-size {args.pretrain_image_size}: choose 112-2048 pixels")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings(image_size=args.image_size, max_count=args.max_count)
    families = tuple(family for family in FAMILIES if family in args.tasks)
    counts = make_data(args.out, args.seed, args.train_per_task, args.eval_per_task, settings, families, args.workers)
    if args.pretrain:
        pretrain = make_pretrain_data(
            Path(args.out, "pretrain"),
            seed=args.seed,
            num_train=args.pretrain_train,
            num_eval=args.pretrain_eval,
            image_size=args.pretrain_image_size,
            workers=args.workers,
            group_size=args.group_size,
        )
        counts.update({f"pretrain/{name}": count for name, count in pretrain["counts"].items()})
    # Without --pretrain, make_data.json is what it was before the flag existed.
    skipped = {"out", "workers"} | (set() if args.pretrain else PRETRAIN_ARGUMENTS)
    manifest = {"arguments": {k: v for k, v in vars(args).items() if k not in skipped}, "counts": counts}
    Path(args.out, "make_data.json").write_text(json.dumps(manifest, indent=2) + "\n")
    width = max(map(len, counts))
    print(f"wrote {args.out}:")
    for name, count in counts.items():
        print(f"  {name:<{width}}  {count}")
    return 0


__all__ = ["Generated", "generate_one", "main", "make_data"]


if __name__ == "__main__":
    sys.exit(main())
