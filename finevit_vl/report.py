"""Run reports: trivial baselines for the synthetic benchmarks, loss-curve and prediction-grid PNGs, `report.md`.

Baselines are scored with the same metric functions the lmms-eval tasks use (`finevit_vl.eval.metrics`), on the
same held-out parquet files, so a model's score and its baseline are directly comparable.
"""

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .benchmark_data import PARQUET_FILES
from .boxes import box_iou, normalized_to_pixels
from .eval import metrics
from .models.image_processing_finevit import to_rgb_image


# task -> (eval parquet relative to the eval dir, headline metric key in lmms-eval results)
SYNTHETIC_TASKS: dict[str, tuple[str, str]] = {
    "finevit_countbench": (PARQUET_FILES["countbench"], "acc"),
    "finevit_refcoco_bbox_rec_val": (PARQUET_FILES["refcoco"], "refcoco_ACC@0.5"),
    "finevit_ocrbench": (PARQUET_FILES["ocrbench"], "ocrbench_score"),  # out of 1000
    "finevit_chartqa": (PARQUET_FILES["chartqa"], "relaxed_overall"),
    "finevit_docvqa_val": (PARQUET_FILES["docvqa"], "anls"),
}
CENTRED_BOX = "[250, 250, 750, 750]"  # the fixed-box baseline, in our int 0-1000 convention
# Also tried as fixed boxes: each quadrant (the grounding images lay objects out on a 2x2 grid, so a quadrant box is
# the strongest constant answer there).
FIXED_BOXES = {"centred box": CENTRED_BOX, "top-left box": "[0, 0, 500, 500]", "top-right box": "[500, 0, 1000, 500]",
               "bottom-left box": "[0, 500, 500, 1000]", "bottom-right box": "[500, 500, 1000, 1000]"}


def _rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # installed with `datasets`

    return pq.read_table(path).to_pylist()


def _image(row: dict) -> Image.Image:
    """The row's image, decoded as the model sees it (upright, RGB), so boxes and sizes match the evaluation."""
    value = row["image"]
    data = value["bytes"] if isinstance(value, dict) else value
    return to_rgb_image(data, f"image of row {row.get('question_id', '?')}")


def _text_baselines(rows: list[dict], answer_of: Callable[[dict], str], score: Callable[[str, dict], float]) -> dict[str, float]:
    """Constant answers for a question-answering task: the majority answer, the empty string, and a blind answer per
    question: the best constant for each distinct question (a model that ignores the image learns each question's
    answer format, e.g. a plausible date for "What is the date?", which ANLS and relaxed accuracy partly credit).

    The per-question constant for a row is chosen on the OTHER rows with the same question (leave-one-out), so small
    groups do not memorise their own answers; a question seen once falls back to the majority answer.
    """
    majority = Counter(answer_of(r) for r in rows).most_common(1)[0][0]
    candidates = {f"{name} {answer!r}": sum(score(answer, r) for r in rows) / len(rows)
                  for name, answer in (("majority", majority), ("empty", ""))}
    by_question: dict[str, list[dict]] = {}
    for row in rows:
        by_question.setdefault(row["question"], []).append(row)
    hits = 0.0
    for group in by_question.values():
        answers = [answer_of(r) for r in group]
        # Score every distinct answer of the group on every row once; leaving row i out subtracts its column.
        table = {answer: [score(answer, r) for r in group] for answer in dict.fromkeys(answers)}
        totals = {answer: sum(scores) for answer, scores in table.items()}
        for index, row in enumerate(group):
            others = dict.fromkeys(answers[:index] + answers[index + 1 :])
            answer = max(others, key=lambda a: totals[a] - table[a][index]) if others else majority
            hits += table[answer][index] if others else score(answer, row)
    candidates[f"blind: best answer per question ({len(by_question)} questions, leave-one-out)"] = hits / len(rows)
    return candidates


def baseline_scores(eval_dir: str | Path) -> dict[str, dict[str, float | str]]:
    """Best trivial baseline per task among: the majority answer, a blind answer per question (see `_text_baselines`),
    fixed boxes (grounding: centred, each quadrant), the empty string.

    Constants are chosen on the eval answers themselves, which favours the baseline (an upper bound on any constant
    answer). Returns `{task: {"score": value, "baseline": description}}`.
    """
    eval_dir = Path(eval_dir)
    results: dict[str, dict[str, float | str]] = {}
    for task, (relative, _) in SYNTHETIC_TASKS.items():
        path = eval_dir / relative
        if not path.exists():
            continue
        rows = _rows(path)
        candidates: dict[str, float] = {}
        if task == "finevit_countbench":
            candidates = _text_baselines(rows, lambda r: str(r["number"]), lambda a, r: metrics.count_correct(a, r["number"]))
        elif task == "finevit_refcoco_bbox_rec_val":
            # Every referring sentence is one document, as in the lmms-eval task.
            docs = [(r, sentence) for r in rows for sentence in r["answer"]]
            truths = []
            for row, _ in docs:
                image = _image(row)
                truths.append(metrics.xywh_to_normalized(row["bbox"], image.width, image.height))
            for name, box in FIXED_BOXES.items():
                candidates[f"{name} {box}"] = sum(metrics.rec_scores(box, gt)["acc"] for gt in truths) / len(truths)
        elif task == "finevit_ocrbench":
            candidates = _text_baselines(rows, lambda r: r["answer"][0],
                                         lambda a, r: metrics.ocrbench_match(a, r["answer"], r["dataset"]))
        elif task == "finevit_chartqa":
            candidates = _text_baselines(rows, lambda r: r["answer"], lambda a, r: metrics.relaxed_correctness(a, r["answer"]))
        elif task == "finevit_docvqa_val":
            candidates = _text_baselines(rows, lambda r: r["answers"][0], lambda a, r: metrics.anls(a, r["answers"]))
        best = max(candidates, key=candidates.get)
        results[task] = {"score": candidates[best], "baseline": best}
    return results


def headline_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """The one metric per task that the report compares against its baseline (accuracy-like, in [0, 1])."""
    out = {}
    for task, (_, key) in SYNTHETIC_TASKS.items():
        task_scores = scores.get(task, {})
        value = task_scores.get(key)
        if value is not None:
            out[task] = value / 1000.0 if key == "ocrbench_score" else value
    return out


def plot_loss_curves(metric_files: dict[str, str | Path], out_png: str | Path) -> None:
    """One panel per training stage: training loss per step and held-out loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metric_files), figsize=(6 * len(metric_files), 4), squeeze=False)
    for ax, (stage, path) in zip(axes[0], metric_files.items()):
        train, held_out = [], []
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and record.get("step") is not None:
                train.append((record["step"], record["loss"]))
            if "eval_loss" in record:
                held_out.append((record["step"], record["eval_loss"]))
        if train:
            ax.plot(*zip(*train), label="train loss", color="tab:blue", alpha=0.8)
        if held_out:
            ax.plot(*zip(*held_out), "o-", label="held-out loss", color="tab:red")
        ax.set_title(stage)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("next-token loss (assistant tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_prediction_grid(samples: Sequence[dict], out_png: str | Path, columns: int = 5, cell: int = 240) -> None:
    """A grid of eval images, each with its task, question, true answer and the model's answer; for grounding the
    true box (green) and the predicted box (red, parsed from the answer) are drawn on the image.

    Each sample: `{"image": PIL, "task": str, "question": str, "answer": str, "prediction": str,
    "gt_box": [x1, y1, x2, y2] in pixels or None, "pred_box": [x1, y1, x2, y2] normalized or None, "correct": bool}`.
    """
    rows = math.ceil(len(samples) / columns)
    text_height = 74
    canvas = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for index, sample in enumerate(samples):
        x0, y0 = (index % columns) * cell, (index // columns) * (cell + text_height)
        image = sample["image"].copy()
        scale = min((cell - 8) / image.width, (cell - 8) / image.height)
        shown = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        overlay = ImageDraw.Draw(shown)
        if sample.get("gt_box") is not None:
            overlay.rectangle([v * scale for v in sample["gt_box"]], outline=(0, 170, 0), width=3)
        if sample.get("pred_box") is not None:
            box = normalized_to_pixels(sample["pred_box"], image.width, image.height)
            overlay.rectangle([v * scale for v in box], outline=(220, 0, 0), width=2)
        canvas.paste(shown, (x0 + 4, y0 + 4))
        verdict = "OK" if sample.get("correct") else "WRONG"
        lines = [
            f"[{sample['task']}] {verdict}",
            _clip(sample["question"], 40),
            f"true: {_clip(sample['answer'], 34)}",
            f"model: {_clip(sample['prediction'], 33)}",
        ]
        for line_index, line in enumerate(lines):
            color = (0, 130, 0) if line_index == 0 and sample.get("correct") else (200, 0, 0) if line_index == 0 else (20, 20, 20)
            draw.text((x0 + 4, y0 + cell + 2 + 17 * line_index), line, fill=color, font=font)
    canvas.save(out_png)


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def grounding_iou(prediction_box: Sequence[float] | None, gt_box_pixels: Sequence[float], width: int, height: int) -> float:
    if prediction_box is None:
        return 0.0
    return box_iou(normalized_to_pixels(prediction_box, width, height), gt_box_pixels)


__all__ = [
    "SYNTHETIC_TASKS",
    "baseline_scores",
    "draw_prediction_grid",
    "grounding_iou",
    "headline_scores",
    "plot_loss_curves",
]
