"""The run report of a trained model on the synthetic benchmarks: `report.md`, `results.json`, loss-curve and
prediction-grid PNGs (`write_run_report`, which `finevit-vl quickstart` calls).

The report puts each lmms-eval score next to the best trivial baseline (majority answer, a blind answer per question,
fixed boxes, the empty string), scored with the same metric functions the lmms-eval tasks use
(`finevit_vl.eval.metrics`) on the same held-out parquet files, so a model's score and its baseline are directly
comparable; it adds where grounding boxes land, OCRBench per question group, and each training stage's held-out loss
and throughput.
"""

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont

from .benchmark_data import PARQUET_FILES
from .boxes import box_iou, normalized_to_pixels, parse_box, pixels_to_normalized
from .eval import metrics
from .models.image_processing_finevit import to_rgb_image
from .prompts import benchmark_prompt


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
BLIND_DETECTOR = "expression-blind detector"  # grounding_breakdown's chance level
STAGE_TITLES = {"stage3": "Stage III alignment", "sft": "instruction tuning"}  # loss-curve panel per run folder name


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


def result_rows(scores: dict[str, dict[str, float]], eval_dir: str | Path) -> list[dict[str, Any]]:
    """One row per task with held-out data: its headline score next to the best trivial baseline."""
    headline = headline_scores(scores)
    return [{"task": task, "metric": SYNTHETIC_TASKS[task][1].replace("ocrbench_score", "ocrbench accuracy"),
             "model": headline.get(task, float("nan")), "baseline": baseline["score"], "baseline_name": baseline["baseline"]}
            for task, baseline in baseline_scores(eval_dir).items()]


def stage_summary(run_dir: str | Path) -> dict[str, Any]:
    """What a finished training run did, from its folder: steps and samples (its `config.yaml`), held-out loss at the
    first and last evaluation, mean tokens/s and images/s (its `metrics.jsonl`)."""
    run_dir = Path(run_dir)
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [record["eval_loss"] for record in records if "eval_loss" in record]

    def mean(key: str) -> float:
        values = [record[key] for record in records if key in record]
        return sum(values) / len(values) if values else 0.0

    return {"steps": train["max_steps"], "samples": train["max_steps"] * train["global_batch_size"],
            "eval_start": evals[0], "eval_end": evals[-1], "tokens_per_s": mean("tokens_per_s"),
            "images_per_s": mean("images_per_s"), "run_dir": str(run_dir)}


def loss_points(metrics_path: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """`(train, held_out)`: (step, loss) pairs of a run's `metrics.jsonl` (training loss per logged step, held-out loss
    per evaluation)."""
    train, held_out = [], []
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and record.get("step") is not None:
            train.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            held_out.append((record["step"], record["eval_loss"]))
    return train, held_out


def plot_loss_curves(metric_files: dict[str, str | Path], out_png: str | Path) -> None:
    """One panel per training stage: training loss per step and held-out loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metric_files), figsize=(6 * len(metric_files), 4), squeeze=False)
    for ax, (stage, path) in zip(axes[0], metric_files.items()):
        train, held_out = loss_points(path)
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


def _answers(model, processor, images: list, questions: list[str], batch_size: int = 16) -> list[str]:
    """The model's greedy answers to one question per image, in the evaluation's chat format, in batches."""
    from .eval.generation import generate_answers, image_question_chat

    chats = [image_question_chat(image, question) for image, question in zip(images, questions)]
    answers: list[str] = []
    for start in range(0, len(chats), batch_size):
        answers += generate_answers(model, processor, chats[start : start + batch_size], max_new_tokens=24,
                                    do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    return [answer.strip() for answer in answers]


def parquet_rows(path: Path) -> list[tuple[dict, Image.Image]]:
    """Rows of a benchmark parquet file with their decoded RGB images."""
    return [(row, _image(row)) for row in _rows(path)]


def predict_samples(model, processor, eval_dir: Path, per_task: int = 3) -> list[dict]:
    """Answers of the model on a few held-out images per task, with the evaluation prompts (`draw_prediction_grid`)."""
    # grid label, benchmark, row -> (question or referring expression, answer)
    specs = [
        ("count", "countbench", lambda r: (r["question"], str(r["number"]))),
        ("ground", "refcoco", lambda r: (r["answer"][0], None)),
        ("ocr", "ocrbench", lambda r: (r["question"], r["answer"][0])),
        ("chart", "chartqa", lambda r: (r["question"], r["answer"])),
        ("doc", "docvqa", lambda r: (r["question"], r["answers"][0])),
    ]
    asked = []
    for task, benchmark, make in specs:
        if (path := eval_dir / PARQUET_FILES[benchmark]).exists():
            for row, image in ((row, _image(row)) for row in _rows(path)[:per_task]):  # decode only those shown
                text, answer = make(row)
                asked.append((task, row, image, benchmark_prompt(benchmark, text), answer))
    predictions = _answers(model, processor, [item[2] for item in asked], [item[3] for item in asked])
    samples = []
    for (task, row, image, question, answer), prediction in zip(asked, predictions):
        sample = {"image": image, "task": task, "question": question.split("\n")[0], "prediction": prediction,
                  "gt_box": None, "pred_box": None}
        if task == "ground":
            x, y, w, h = row["bbox"]
            sample["gt_box"] = [x, y, x + w, y + h]
            sample["pred_box"] = parse_box(prediction)
            gt = metrics.xywh_to_normalized(row["bbox"], image.width, image.height)
            scores = metrics.rec_scores(prediction, gt)
            sample["answer"] = f"IoU {scores['iou']:.2f} (green: true box)"
            sample["correct"] = scores["acc"] == 1.0
        else:
            sample["answer"] = answer
            sample["correct"] = prediction.strip().lower() == str(answer).strip().lower()
        samples.append(sample)
    return samples


def grounding_breakdown(model, processor, data_dir: Path) -> dict[str, float] | None:
    """Where the predicted boxes of the held-out grounding set land (IoU >= 0.5): on the object the expression
    names, on another object of the image, or on none; and what a detector that ignores the expression would score
    (one of the image's objects at random). Accuracy above that chance level means the expression is understood, not
    only objects found. Every object of an image comes from its Stage III grounding record."""
    refcoco = data_dir / "eval" / PARQUET_FILES["refcoco"]
    if not refcoco.exists():
        return None
    objects = {}
    for line in (data_dir / "stage3" / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["task"] == "grounding":
            objects[record["id"].removesuffix("-grounding")] = record["grounding"]
    rows = parquet_rows(refcoco)
    predictions = _answers(model, processor, [image for _, image in rows],
                           [benchmark_prompt("refcoco", row["answer"][0]) for row, _ in rows])
    counts = Counter()
    chance = 0.0
    for (row, image), prediction in zip(rows, predictions):
        items = objects[row["question_id"]]
        box = parse_box(prediction)
        hits = [box is not None and box_iou(box, pixels_to_normalized(item["box"], *image.size)) >= 0.5 for item in items]
        named = next(i for i, item in enumerate(items) if item["expression"] == row["answer"][0])
        counts["named object" if hits[named] else "another object" if any(hits) else "no object"] += 1
        chance += 1 / len(items)
    shares = {name: counts[name] / len(rows) for name in ("named object", "another object", "no object")}
    return {**shares, BLIND_DETECTOR: chance / len(rows)}


def ocrbench_note(ocrbench: dict[str, float | None] | None) -> str:
    """How OCRBench is shown, and its accuracy per official report group (crops are text recognition, the
    synthetic documents key information extraction), so a total is not read as one skill."""
    note = "OCRBench is shown as accuracy (its score out of 1000 divided by 1000)"
    labels = {"text_recognition": "text recognition", "scene_text_vqa": "scene-text VQA", "doc_vqa": "document VQA",
              "kie": "key information extraction", "hmer": "handwritten maths"}
    groups = [f"{labels[name]} {value / points:.3f}" for name, (_, points) in metrics.OCRBENCH_GROUPS.items()
              if (value := (ocrbench or {}).get(f"ocrbench_{name}")) is not None and not math.isnan(value)]
    return note + (f"; accuracy by question group: {', '.join(groups)}." if groups else ".")


def write_report(out: Path, rows: list[dict], timings: dict[str, float], stages: dict[str, dict], command: str,
                 n_params: float, ocrbench: dict[str, float | None] | None = None, mixture: str = "",
                 grounding: dict[str, float] | None = None) -> str:
    """Write `out/report.md` (results next to baselines, training, timings, predictions, files) and return it;
    `command` is the one that made the run, `n_params` in millions."""
    lines = [
        "# FineViT-VL quickstart report",
        "",
        (f"`{command}` on {os.cpu_count()} CPU cores: a {n_params:.2f}M-parameter FineViT-VL trained from random "
         "initialisation on the synthetic fine-grained data, then scored by lmms-eval on held-out data in the "
         "benchmark schemas."),
        "",
        "## Results (held-out synthetic splits, lmms-eval)",
        "",
        "| task | metric | FineViT-VL | trivial baseline | margin | baseline used |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['task']} | {row['metric']} | {row['model']:.3f} | {row['baseline']:.3f} | "
                     f"{row['model'] - row['baseline']:+.3f} | {row['baseline_name']} |")
    lines += ["", ocrbench_note(ocrbench), "",
              ("The same seed gives bitwise the same model on the same machine and thread count only; across seeds and "
               "CPUs scores move (at the defaults, seeds 0-2 gave counting 0.99-1.00, chart 0.26-0.46, OCR 0.06-0.33, "
               "grounding 0.22-0.38, documents 0.14-0.20: README, \"The demo\")."), ""]
    if grounding:
        landed = ", ".join(f"{name} {share:.2f}" for name, share in grounding.items() if name != BLIND_DETECTOR)
        lines += [(f"Grounding: the predicted box (IoU >= 0.5) lands on the {landed}; a detector that ignores the "
                   f"expression (one of the image's objects at random) would find the named object "
                   f"{grounding[BLIND_DETECTOR]:.2f} of the time."), ""]
    lines += ["## Training", "", "| stage | steps | samples | held-out loss (start -> end) | tokens/s | images/s |",
              "|---|---|---|---|---|---|"]
    for stage, info in stages.items():
        lines.append(f"| {stage} | {info['steps']} | {info['samples']} | {info['eval_start']:.3f} -> {info['eval_end']:.3f} | "
                     f"{info['tokens_per_s']:.0f} | {info['images_per_s']:.1f} |")
    if mixture:
        lines += ["", f"Instruction-tuning mixture (share of samples): {mixture}."]
    lines += ["", "![loss curves](loss_curves.png)", "", "## Timings", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {seconds:.0f} |" for phase, seconds in timings.items()]
    lines += ["", "## Predictions on held-out images", "",
              "Green box: ground truth; red box: the model's answer (grounding).", "", "![predictions](predictions.png)",
              "", "## Files", "", ("- `model/`: the HF checkpoint (`AutoModelForImageTextToText` / `AutoProcessor`) "
              "with its model card"), "- `stage3/`, `sft/`: training runs (resolved config, metrics.jsonl, logs)",
              "- `eval/`: lmms-eval results (`results.json`, `results.md`)", "- `data/`: the generated data", ""]
    report = "\n".join(lines)
    (out / "report.md").write_text(report)
    return report


def write_run_report(out: Path, model_dir: Path, data_dir: Path, scores: dict[str, dict[str, float]],
                     stages: dict[str, dict], timings: dict[str, float], command: str, mixture: str = "") -> str:
    """The whole report of a run into `out`: `report.md`, `results.json`, `loss_curves.png`, `predictions.png`.

    `model_dir` is the final checkpoint, `data_dir` the `make-data` folder, `scores` its lmms-eval scores, `stages`
    `{run folder name: stage_summary(...)}` in training order; the time taken is added to `timings` as "report".
    Returns the markdown."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .parameters import count_parameters

    started = time.perf_counter()
    rows = result_rows(scores, data_dir / "eval")
    plot_loss_curves({STAGE_TITLES.get(stage, stage): Path(info["run_dir"]) / "metrics.jsonl"
                      for stage, info in stages.items()}, out / "loss_curves.png")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    draw_prediction_grid(predict_samples(model, processor, data_dir / "eval"), out / "predictions.png")
    grounding = grounding_breakdown(model, processor, data_dir)
    timings["report"] = time.perf_counter() - started
    report = write_report(out, rows, timings, stages, command, count_parameters(model) / 1e6,
                          scores.get("finevit_ocrbench"), mixture, grounding)
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "scores": scores, "grounding": grounding, "timings": timings}, indent=2)
    )
    return report


__all__ = [
    "BLIND_DETECTOR",
    "SYNTHETIC_TASKS",
    "baseline_scores",
    "draw_prediction_grid",
    "grounding_breakdown",
    "headline_scores",
    "ocrbench_note",
    "plot_loss_curves",
    "predict_samples",
    "result_rows",
    "stage_summary",
    "write_report",
    "write_run_report",
]
