"""``finevit-vl eval`` and `run_eval_suite`: run FineViT lmms-eval tasks in-process and report the scores.

    finevit-vl eval --model DIR --tasks finevit_countbench,finevit_refcoco_bbox_rec_val \\
        [--data-dir LOCAL] [--limit N] [--batch-size B] [--out OUT] [--model-card DIR/README.md]

writes ``OUT/results.json`` and ``OUT/results.md`` and, with ``--model-card``, puts the scores into that card
(`finevit_vl.model_card.fill_model_card`). The trainer calls `run_eval_suite` with the live model and its processor.
"""

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

from ..model_card import fill_model_card, results_markdown
from .tasks_path import SUITE_GROUP, local_tasks_dir, missing_local_data, suite_tasks, tasks_dir


DEFAULT_TASKS = (SUITE_GROUP,)
MODEL_NAME = "finevit_vl"  # selects the `finevit_vl` entry of the tasks' lmms_eval_specific_kwargs


def run_eval_suite(
    model_or_path,
    processor=None,
    tasks: list[str] | tuple[str, ...] | str = DEFAULT_TASKS,
    data_dir: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    out_dir: str | None = None,
    model_args: dict | None = None,
    gen_kwargs: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate on lmms-eval tasks and return ``{task: {metric: value}}`` (empty on ranks other than 0).

    Under multi-process training call it on **every** rank with the unwrapped model (and
    ``model_args={"accelerator": accelerator}``): lmms-eval shards the documents by ``RANK`` / ``WORLD_SIZE`` and
    gathers on rank 0, so a call from the main process alone waits forever for the others.

    Args:
        model_or_path: a checkpoint directory, a loaded FineViT-VL model (then pass ``processor``), or a ready
            `FineViTVL` wrapper.
        tasks: task or group names (``finevit_suite`` = all), as a list or a comma-separated string.
        data_dir: read local parquet copies (``DATA_DIR/<dataset>/<split>.parquet``) instead of the HF datasets.
        limit: documents per task (an int, or a fraction in (0, 1)); ``None`` = all.
        out_dir: if given, write ``results.json`` and ``results.md`` there.
        model_args: extra `FineViTVL` arguments (``dtype``, ``max_pixels``, ``adapter``, ``accelerator``...).
        gen_kwargs: generation settings that override every task's, e.g. ``{"max_new_tokens": 16}`` for quick checks.
    """
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    tasks = [t for t in tasks.split(",") if t] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("No tasks given; e.g. tasks=['finevit_suite'].")
    if data_dir is not None:
        missing = {task: path for task, path in missing_local_data(data_dir, tasks).items() if task in tasks}
        if missing:
            lines = "\n".join(f"  {task}: {path}" for task, path in missing.items())
            raise ValueError(f"Local data missing for the requested tasks:\n{lines}")
    include_path = local_tasks_dir(data_dir) if data_dir is not None else tasks_dir()
    task_manager = TaskManager(include_path=include_path, include_defaults=False, model_name=MODEL_NAME)
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; available: {task_manager.all_tasks}")

    lm = _as_lmms(model_or_path, processor, batch_size, model_args or {})
    raw = evaluator.simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
        gen_kwargs=",".join(f"{key}={value}" for key, value in gen_kwargs.items()) if gen_kwargs else None,
    )
    if raw is None:  # lmms-eval returns results on rank 0 only
        return {}
    scores = extract_scores(raw)
    if out_dir is not None:
        info = {
            "model": _model_name(model_or_path),
            "tasks": tasks,
            "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
            "limit": limit,
            "gen_kwargs": gen_kwargs,
            "n_samples": raw.get("n-samples", {}),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        write_reports(scores, out_dir, info)
    return scores


def _as_lmms(model_or_path, processor, batch_size: int, model_args: dict):
    from lmms_eval.api.model import lmms

    from .lmms_model import FineViTVL

    if isinstance(model_or_path, lmms):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return FineViTVL(pretrained=str(model_or_path), batch_size=batch_size, **model_args)
    if processor is None:
        raise ValueError("Pass the processor together with an in-memory model: run_eval_suite(model, processor, ...).")
    return FineViTVL.from_model(model_or_path, processor, batch_size=batch_size, **model_args)


def _model_name(model_or_path) -> str:
    if isinstance(model_or_path, (str, os.PathLike)):
        return str(model_or_path)
    config = getattr(getattr(model_or_path, "model", model_or_path), "config", None)
    return getattr(config, "_name_or_path", "") or type(model_or_path).__name__


def extract_scores(raw: dict) -> dict[str, dict[str, float]]:
    """lmms-eval's ``results["results"]`` (``"metric,filter": value``) -> ``{task: {metric: value}}``, no stderr.

    Tasks come in suite order (lmms-eval sorts them by name)."""
    order = {task: index for index, task in enumerate(suite_tasks())}
    scores = {}
    for task, values in sorted(raw["results"].items(), key=lambda item: (order.get(item[0], len(order)), item[0])):
        metrics = {}
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            if _filter and "_stderr" not in metric and isinstance(value, (int, float)):
                metrics[metric] = float(value)
        if metrics:
            scores[task] = metrics
    return scores


def write_reports(scores: dict[str, dict[str, float]], out_dir: str, info: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Empty OCRBench categories are NaN, which strict JSON cannot hold: write null.
    clean = {task: {m: (None if math.isnan(v) else v) for m, v in metrics.items()} for task, metrics in scores.items()}
    (out / "results.json").write_text(json.dumps({**info, "results": clean}, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(scores, info.get("limit")))


def _parse_limit(value: str) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() and number >= 1 else number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finevit-vl eval", description="Run FineViT lmms-eval tasks on a checkpoint.")
    parser.add_argument("--model", required=True, help="FineViT-VL checkpoint directory")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks or groups (default: finevit_suite)")
    parser.add_argument("--data-dir", help="local benchmark copies: DATA_DIR/<dataset>/<split>.parquet (see eval_tasks/README.md)")
    parser.add_argument("--limit", type=_parse_limit, help="documents per task (int) or fraction (0-1); for quick checks only")
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch size (default: 8)")
    parser.add_argument("--model-args", default="", help="extra plugin arguments, e.g. dtype=bfloat16,max_pixels=1003520,adapter=DIR")
    parser.add_argument("--gen-kwargs", default="", help="override the tasks' generation settings, e.g. max_new_tokens=16")
    parser.add_argument("--out", default="eval_results", help="output directory for results.json and results.md")
    parser.add_argument("--model-card", help="a model card (README.md) to put the scores into")
    args = parser.parse_args(argv)

    from lmms_eval.utils import simple_parse_args_string

    try:
        scores = run_eval_suite(
            args.model, tasks=args.tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
            out_dir=args.out, model_args=simple_parse_args_string(args.model_args) if args.model_args else None,
            gen_kwargs=simple_parse_args_string(args.gen_kwargs) if args.gen_kwargs else None,
        )
    except ValueError as error:
        print(f"finevit-vl eval: {error}", file=sys.stderr)
        return 2
    if not scores:  # not rank 0
        return 0
    print(results_markdown(scores, args.limit))
    if args.model_card:
        fill_model_card(args.model_card, scores, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
