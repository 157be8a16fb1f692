"""Benchmark metrics, in pure Python (no lmms-eval import), so the trainer and tests can score answers directly.

Each function follows the published definition and agrees with lmms-eval 0.7.3 on every answer it can score
(checked by `tests/test_eval_metrics.py`). Where we deliberately differ, the docstring says so:

* OCRBench scores are reported **out of 1000** (lmms-eval reports ``Final Score / 1000``) and are stateless
  (lmms-eval accumulates into a module-level dict, so a second run in the same process double-counts).
* REC: an answer without a box scores 0 on every metric (lmms-eval substitutes ``[0, 0, 0, 0]``, whose centre can fall
  inside a ground-truth box that touches the image corner).
"""

import math
from collections.abc import Iterable, Sequence

from finevit_vl.boxes import BoxFormat, box_iou, parse_box, pixels_to_normalized


# ---------------------------------------------------------------------------------------------------------------------
# DocVQA: Average Normalized Levenshtein Similarity (Biten et al., 2019).


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _collapse(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one question: ``1 - min_answer NL(pred, answer)``, set to 0 when it falls below ``threshold``.

    Strings are lowercased and whitespace-collapsed before the edit distance; as in the official DocVQA script the
    normalizing length is taken from the *raw* strings (upper-cased, which matters only for characters such as "ß").
    """
    if not answers:
        return 0.0
    pred = _collapse(prediction)
    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(_collapse(answer), pred) / length if length else 0.0)
    score = 1.0 - min(distances)
    return score if score >= threshold else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# ChartQA: relaxed accuracy (Methani et al., 2020; Masry et al., 2022).


def _to_number(text: str) -> float | None:
    try:
        # A trailing percent sign means "divide by 100" ("12%" == 0.12).
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """Numeric answers are correct within ``max_relative_change`` of a non-zero target; everything else needs a
    case-insensitive exact match (no stripping, as in the ChartQA paper's reference code)."""
    pred_number, target_number = _to_number(prediction), _to_number(target)
    if pred_number is not None and target_number:
        return abs(pred_number - target_number) / abs(target_number) <= max_relative_change
    return prediction.lower() == target.lower()


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

# Full-width ASCII (U+FF01..U+FF5E) and the ideographic space fold to ASCII; nothing else (no full NFKC).
_FULLWIDTH_TO_ASCII = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: ord(" ")}


def ocrbench_match(prediction: str, answers: str | Sequence[str], dataset: str = "") -> bool:
    """True if any ground-truth string occurs in the prediction.

    Case- and full-width-insensitive, except for handwritten maths (``dataset == "HME100k"``), which is compared
    case-sensitively with spaces and line breaks removed.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    if dataset == "HME100k":
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(answer.strip().replace("\n", " ").replace(" ", "") in pred for answer in answers)
    pred = prediction.translate(_FULLWIDTH_TO_ASCII).lower().strip().replace("\n", " ")
    return any(answer.translate(_FULLWIDTH_TO_ASCII).lower().strip().replace("\n", " ") in pred for answer in answers)


def ocrbench_scores(items: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """``(question_type, correct)`` pairs -> the official report: ``total`` out of 1000 and each group out of its points.

    On the full benchmark every value is the number of correct answers, as in the official report. On a subset
    (``--limit``, a local sample) each value is the accuracy scaled to the same points, so numbers stay comparable;
    a group without samples is NaN.
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

_NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]
NUMBER_WORD_TO_DIGITS: dict[str, str] = {word: str(value) for value, word in enumerate(_NUMBER_WORDS)} | {"none": "0"}


def normalize_count(answer: str | int) -> str:
    """``" Three "`` -> ``"3"``; anything that is not a number word is only stripped and lowercased."""
    text = str(answer).strip().lower()
    return NUMBER_WORD_TO_DIGITS.get(text, text)


def count_correct(prediction: str, number: str | int) -> bool:
    return normalize_count(prediction) == normalize_count(number)


# ---------------------------------------------------------------------------------------------------------------------
# Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg).

REC_IOU_THRESHOLD = 0.5


def xywh_to_normalized(bbox: Sequence[float], width: int, height: int) -> list[float]:
    """COCO ``[x, y, w, h]`` in pixels -> ``[x1, y1, x2, y2]`` in [0, 1] (the ground truth lmms-eval scores against)."""
    x, y, w, h = bbox
    return pixels_to_normalized([x, y, x + w, y + h], width, height)


def rec_scores(prediction: str, gt_box: Sequence[float], box_format: BoxFormat = "int1000") -> dict[str, float]:
    """Score a grounding answer against a normalized ``[x1, y1, x2, y2]`` ground truth.

    Returns ``iou``, ``acc`` (IoU >= 0.5, the standard REC accuracy) and ``center_acc`` (the predicted box centre lies
    inside the ground-truth box). The first box in ``prediction`` is read with `finevit_vl.boxes.parse_box`.
    """
    box = parse_box(prediction, box_format)
    if box is None:
        return {"iou": 0.0, "acc": 0.0, "center_acc": 0.0}
    iou = box_iou(box, gt_box)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    inside = gt_box[0] <= cx <= gt_box[2] and gt_box[1] <= cy <= gt_box[3]
    return {"iou": iou, "acc": float(iou >= REC_IOU_THRESHOLD), "center_acc": float(inside)}


__all__ = [
    "NUMBER_WORD_TO_DIGITS",
    "OCRBENCH_GROUPS",
    "OCRBENCH_TOTAL",
    "REC_IOU_THRESHOLD",
    "anls",
    "count_correct",
    "levenshtein",
    "normalize_count",
    "ocrbench_match",
    "ocrbench_scores",
    "rec_scores",
    "relaxed_correctness",
    "xywh_to_normalized",
]
