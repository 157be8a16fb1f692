"""Benchmark metrics: lmms-eval 0.7.3's own scoring functions, behind the signatures our tasks, report and tests use.

The scores come from lmms-eval (`lmms_eval.api.metrics.anls`, and the ``chartqa``, ``ocrbench``, ``countbench`` and
``refcoco`` task utils), imported on first use: importing them pulls in torch, transformers and datasets (seconds), so
importing this module stays cheap. What we keep of our own, each a small function with a test in
`tests/test_eval_metrics.py` that shows the difference:

* `anls`: a question without ground-truth answers scores 0 (lmms-eval raises).
* `ocrbench_scores`: stateless, out of 1000 and per report group (lmms-eval's aggregation accumulates across calls,
  writes a file and returns ``Final Score / 1000`` whatever the number of questions).
* REC: answers are read in our box convention with `finevit_vl.boxes.parse_box` (int 0-1000 by default; lmms-eval
  reads [0, 1] floats as written), an answer without a box scores 0 (`_no_box_scores`), and two empty boxes have IoU
  0 (`_iou_and_acc`).
"""

import functools
import importlib
import math
import warnings
from collections.abc import Iterable, Sequence
from types import ModuleType

from finevit_vl.boxes import BoxFormat, parse_box, pixels_to_normalized


@functools.cache
def _lmms_eval(module: str) -> ModuleType:
    """``lmms_eval.<module>``, imported once; its import runs ``warnings.filterwarnings("ignore")``, undone here."""
    with warnings.catch_warnings():
        return importlib.import_module(f"lmms_eval.{module}")


# ---------------------------------------------------------------------------------------------------------------------
# DocVQA: Average Normalized Levenshtein Similarity (Biten et al., 2019).


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one question (lmms-eval's ``anls``), but 0 without ground-truth answers, where lmms-eval raises."""
    answers = list(answers)
    if not answers:
        return 0.0
    return float(_lmms_eval("api.metrics").anls(answers, [prediction], thresh_hold=threshold)["anls"])


# ---------------------------------------------------------------------------------------------------------------------
# ChartQA: relaxed accuracy (Methani et al., 2020; Masry et al., 2022).


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """lmms-eval's ChartQA ``relaxed_correctness``: numbers within 5% of a non-zero target, else case-insensitive
    exact match."""
    return _lmms_eval("tasks.chartqa.utils").relaxed_correctness(prediction, target, max_relative_change)


# ---------------------------------------------------------------------------------------------------------------------
# OCRBench (Liu et al., 2024): 1000 questions, one point each, reported per category and in total.

# Official report line -> (question types it sums, points on the full benchmark).
OCRBENCH_GROUPS: dict[str, tuple[tuple[str, ...], int]] = {
    "text_recognition": (
        (
            "Regular Text Recognition",
            "Irregular Text Recognition",
            "Artistic Text Recognition",
            "Handwriting Recognition",
            "Digit String Recognition",
            "Non-Semantic Text Recognition",
        ),
        300,
    ),
    "scene_text_vqa": (("Scene Text-centric VQA",), 200),
    "doc_vqa": (("Doc-oriented VQA",), 200),
    "kie": (("Key Information Extraction",), 200),
    "hmer": (("Handwritten Mathematical Expression Recognition",), 100),
}
OCRBENCH_TOTAL = 1000


def ocrbench_match(prediction: str, answers: str | Sequence[str], dataset: str = "") -> bool:
    """lmms-eval's OCRBench check: any ground-truth string occurs in the prediction (case- and full-width-insensitive;
    handwritten maths, ``dataset == "HME100k"``, case-sensitive with spaces removed)."""
    doc = {"answer": answers if isinstance(answers, str) else list(answers), "dataset": dataset, "question_type": None}
    result = _lmms_eval("tasks.ocrbench.utils").ocrbench_process_results(doc, [prediction])
    return bool(result["ocrbench_accuracy"]["score"])


def ocrbench_scores(items: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """``(question_type, correct)`` pairs -> ``total`` out of 1000 and each group out of its points, statelessly.

    Deviates from lmms-eval's ``ocrbench_aggregate_accuracy``, which adds into a module-level dict (a second run in the
    same process double-counts), writes ``ocrbench_results.txt`` and returns the total / 1000. On the full benchmark
    every value here is the number of correct answers, as in the official report; on a subset (``--limit``, a local
    sample) each value is the accuracy scaled to the same points, so numbers stay comparable; a group without samples
    is NaN.
    """
    items = list(items)
    known = {qtype for qtypes, _ in OCRBENCH_GROUPS.values() for qtype in qtypes}
    unknown = {qtype for qtype, _ in items} - known
    if unknown:
        raise ValueError(f"Unknown OCRBench question_type(s) {sorted(unknown)}; expected one of {sorted(known)}.")
    scores = {"total": _scaled_accuracy([correct for _, correct in items], OCRBENCH_TOTAL)}
    for name, (qtypes, points) in OCRBENCH_GROUPS.items():
        scores[name] = _scaled_accuracy([correct for qtype, correct in items if qtype in qtypes], points)
    return scores


def _scaled_accuracy(corrects: list[bool], points: int) -> float:
    return points * sum(corrects) / len(corrects) if corrects else math.nan


# ---------------------------------------------------------------------------------------------------------------------
# CountBench (Paiss et al., 2023): exact match after mapping number words to digits.


def count_correct(prediction: str, number: str | int) -> bool:
    """lmms-eval's CountBench check: exact match after strip/lower, number words "zero"/"none"-"twenty" as digits."""
    result = _lmms_eval("tasks.countbench.utils").countbench_process_results({"number": number}, [prediction])
    return bool(result["acc"])


# ---------------------------------------------------------------------------------------------------------------------
# Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg).

REC_IOU_THRESHOLD = 0.5


def xywh_to_normalized(bbox: Sequence[float], width: int, height: int) -> list[float]:
    """COCO ``[x, y, w, h]`` in pixels -> ``[x1, y1, x2, y2]`` in [0, 1] (the ground truth lmms-eval scores)."""
    x, y, w, h = bbox
    return pixels_to_normalized([x, y, x + w, y + h], width, height)


def _no_box_scores() -> dict[str, float]:
    """0 everywhere; lmms-eval scores ``[0, 0, 0, 0]``, whose centre is inside any ground truth at the top-left."""
    return {"iou": 0.0, "acc": 0.0, "center_acc": 0.0}


def _iou_and_acc(gt_box: Sequence[float], box: Sequence[float]) -> tuple[float, float]:
    """lmms-eval's IoU and ACC@0.5, but 0 for two empty boxes, where its ``compute_iou`` divides by zero."""
    rec = _lmms_eval("tasks.refcoco.utils_rec")
    try:
        return rec.compute_iou(gt_box, box), float(rec.compute_accuracy(gt_box, box, REC_IOU_THRESHOLD))
    except ZeroDivisionError:
        return 0.0, 0.0


def rec_scores(prediction: str, gt_box: Sequence[float], box_format: BoxFormat = "int1000") -> dict[str, float]:
    """Score a grounding answer against a normalized ``[x1, y1, x2, y2]`` ground truth with lmms-eval's REC scorers.

    Returns ``iou``, ``acc`` (IoU >= 0.5, the standard REC accuracy) and ``center_acc`` (the predicted box centre lies
    inside the ground-truth box). The first box in ``prediction`` is read in our convention by
    `finevit_vl.boxes.parse_box` (lmms-eval's ``parse_float_sequence_within`` takes [0, 1] floats as written, so a
    0-1000 answer would score about 0).
    """
    box = parse_box(prediction, box_format)
    if box is None:
        return _no_box_scores()
    iou, acc = _iou_and_acc(gt_box, box)
    center_acc = float(_lmms_eval("tasks.refcoco.utils_rec").compute_center_accuracy(gt_box, box))
    return {"iou": iou, "acc": acc, "center_acc": center_acc}


__all__ = [
    "OCRBENCH_GROUPS",
    "OCRBENCH_TOTAL",
    "REC_IOU_THRESHOLD",
    "anls",
    "count_correct",
    "ocrbench_match",
    "ocrbench_scores",
    "rec_scores",
    "relaxed_correctness",
    "xywh_to_normalized",
]
