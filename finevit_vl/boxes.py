"""The one box convention of FineViT-VL: how boxes are stored, rendered into text, and parsed back.

Records store boxes model-agnostically as ``[x1, y1, x2, y2]`` in **pixels of the original image** (floats allowed),
so resizing an image never corrupts them. They become text only at collate time, in ONE documented convention:

* ``"int1000"`` (default): integers 0-1000 relative to the image size, ``[x1, y1, x2, y2]`` order, rendered as
  ``"[x1, y1, x2, y2]"`` (Qwen2-VL / Qwen3-VL / InternVL style). Independent of the resize the processor applies.
* ``"norm1"``: floats in [0, 1] with three decimals (GranViT / lmms-eval ``bbox_rec`` style), rendered as
  ``"[0.123, 0.456, 0.789, 1.0]"``.

Quadrilaterals (OCR) use the same scaling on 4 points: ``[x1, y1, x2, y2, x3, y3, x4, y4]``.
"""

import math
import re
from collections.abc import Sequence
from typing import Literal


BoxFormat = Literal["int1000", "norm1"]
BOX_FORMATS: tuple[str, ...] = ("int1000", "norm1")

# First bracketed list of 4 numbers, e.g. "[12, 40, 300, 512]" or "[0.1,0.2,0.5,0.9]".
BOX_PATTERN = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)


def check_box_format(box_format: str) -> None:
    if box_format not in BOX_FORMATS:
        raise ValueError(f"Unknown box format {box_format!r}; expected one of {BOX_FORMATS}.")


class BoxOutsideImageError(ValueError):
    """A well-formed box that does not fit its image (its own class so bad-record reports can tell it apart)."""


def validate_box(box: Sequence[float], width: int, height: int, where: str = "box") -> None:
    """Raise ``ValueError`` naming ``where`` if ``box`` is not a valid ``[x1, y1, x2, y2]`` inside a ``width x height`` image
    (`BoxOutsideImageError` when only the last condition fails)."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise ValueError(f"{where}: expected [x1, y1, x2, y2] with 4 finite numbers, got {box!r}")
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{where}: box {list(box)} is empty or inverted (need x2 > x1 and y2 > y1)")
    # Half a pixel of slack absorbs rounding in annotation tools.
    if x1 < -0.5 or y1 < -0.5 or x2 > width + 0.5 or y2 > height + 0.5:
        raise BoxOutsideImageError(f"{where}: box {list(box)} lies outside the {width}x{height} image")


def _scale(value: float, size: int, box_format: str) -> str:
    rel = min(max(value / size, 0.0), 1.0)
    if box_format == "int1000":
        return str(round(rel * 1000))
    return f"{round(rel, 3):g}" if rel not in (0.0, 1.0) else f"{rel:.1f}"


def points_to_text(points: Sequence[float], width: int, height: int, box_format: BoxFormat = "int1000") -> str:
    """Render pixel coordinates ``[x, y, x, y, ...]`` (a box or a quad) into the text convention."""
    check_box_format(box_format)
    if len(points) % 2:
        raise ValueError(f"expected an even number of coordinates, got {len(points)}")
    values = [_scale(v, width if i % 2 == 0 else height, box_format) for i, v in enumerate(points)]
    return "[" + ", ".join(values) + "]"


def box_to_text(box: Sequence[float], width: int, height: int, box_format: BoxFormat = "int1000") -> str:
    """``[x1, y1, x2, y2]`` in pixels of a ``width x height`` image -> ``"[x1, y1, x2, y2]"`` in the chosen convention."""
    if len(box) != 4:
        raise ValueError(f"expected [x1, y1, x2, y2], got {box!r}")
    return points_to_text(box, width, height, box_format)


def parse_box(text: str, box_format: BoxFormat = "int1000") -> list[float] | None:
    """First ``[x1, y1, x2, y2]`` in ``text`` as floats normalized to [0, 1] (clamped), or ``None`` if there is none.

    Coordinates are re-ordered so that ``x1 <= x2`` and ``y1 <= y2``.
    """
    check_box_format(box_format)
    match = BOX_PATTERN.search(text)
    if match is None:
        return None
    scale = 1000.0 if box_format == "int1000" else 1.0
    x1, y1, x2, y2 = (min(max(float(v) / scale, 0.0), 1.0) for v in match.groups())
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def normalized_to_pixels(box: Sequence[float], width: int, height: int) -> list[float]:
    """``[x1, y1, x2, y2]`` in [0, 1] -> pixels of a ``width x height`` image."""
    return [box[0] * width, box[1] * height, box[2] * width, box[3] * height]


def pixels_to_normalized(box: Sequence[float], width: int, height: int) -> list[float]:
    """``[x1, y1, x2, y2]`` in pixels -> [0, 1]."""
    return [box[0] / width, box[1] / height, box[2] / width, box[3] / height]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes in the same units; 0.0 when the union is empty."""
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


__all__ = [
    "BOX_FORMATS",
    "BOX_PATTERN",
    "BoxFormat",
    "BoxOutsideImageError",
    "box_iou",
    "box_to_text",
    "check_box_format",
    "normalized_to_pixels",
    "parse_box",
    "pixels_to_normalized",
    "points_to_text",
    "validate_box",
]
