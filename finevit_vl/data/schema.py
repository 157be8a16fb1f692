"""The one training-record schema of FineViT-VL: a plain JSON object per JSONL line (or per WebDataset sample / HF row).

```
{"id": str,
 "image": "rel/path.png" | ["a.png", "b.png"] | null,      # relative to the source's image root
 "task": "caption" | "region" | "ocr" | "grounding" | "conversation",
 "caption": str,                                            # task "caption": global dense caption
 "regions": [{"box": [x1, y1, x2, y2], "text": str}],      # task "region": yields box->text AND text->box turns
 "ocr": [{"text": str, "box": [x1, y1, x2, y2]} | {"text": str, "quad": [x1, y1, ..., x4, y4]}],
 "grounding": [{"expression": str, "box": [x1, y1, x2, y2]}],
 "conversations": [{"role": "system" | "user" | "assistant", "content": str}],
 "boxes": [[x1, y1, x2, y2], ...],                          # fill the "<box>" placeholders of "conversations", in order
 "width": int, "height": int,                               # optional: size of the (first) image, upright (EXIF)
 "meta": {...}}                                             # optional: free-form, ignored by training
```

Rules a reader needs:

* Boxes are always **pixels of the original image** (floats allowed), ``[x1, y1, x2, y2]`` with x2 > x1, y2 > y1. In a
  multi-image record every box refers to the **first** image. They become text only at render time
  (`finevit_vl.boxes.box_to_text`).
* In ``conversations``, ``"<image>"`` marks where each image goes (either no marker at all, or exactly one per
  image, in order, in user turns only); ``"<box>"`` placeholders are filled in order from ``boxes``. An optional
  system turn comes first; then turns alternate user / assistant, starting with user and ending with assistant.
* LLaVA and ShareGPT / LLaMA-Factory records are converted into this schema as they are read
  (`finevit_vl.data.formats`).
* Only a ``conversation`` may have no image.
* Keys starting with ``_`` are transient: sources attach them while streaming and they are never written back.
  ``_error`` (a line/sample that could not be parsed) with its ``_error_kind`` (a `BAD_RECORD_KINDS` entry),
  ``_image_root`` (folder that relative image paths resolve against) and ``_image_bytes`` (encoded images aligned with
  ``record["image"]``; ``None`` entries are read from disk).

Every problem with one record surfaces as `BadRecordError` (a ``ValueError``) from `validate_record` or
`finevit_vl.data.images.load_record_images`, never from inside a source's iteration, so a trainer can catch, count
and skip bad records without ending the stream. Its ``kind`` (one of `BAD_RECORD_KINDS`) groups the skipped records
of a run by cause.
"""

import math
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

from ..boxes import BoxOutsideImageError, validate_box


TASKS: tuple[str, ...] = ("caption", "region", "ocr", "grounding", "conversation")
ROLES: tuple[str, ...] = ("user", "assistant")
SYSTEM_ROLE = "system"  # allowed as the first turn of a conversation only
IMAGE_MARKER = "<image>"
BOX_MARKER = "<box>"

# What each task requires beyond the common keys.
TASK_FIELDS: dict[str, str] = {
    "caption": "caption",
    "region": "regions",
    "ocr": "ocr",
    "grounding": "grounding",
    "conversation": "conversations",
}
KNOWN_KEYS: frozenset[str] = frozenset(
    {
        "id",
        "image",
        "task",
        "caption",
        "regions",
        "ocr",
        "grounding",
        "conversations",
        "boxes",
        "width",
        "height",
        "meta",
    }
)


class Region(TypedDict):
    box: list[float]
    text: str


class OcrItem(TypedDict, total=False):
    text: str
    box: list[float]
    quad: list[float]


class GroundingItem(TypedDict):
    expression: str
    box: list[float]


class Turn(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class Record(TypedDict, total=False):
    """One training record; see the module docstring for the meaning of each key."""

    id: str
    image: str | list[str] | None
    task: Literal["caption", "region", "ocr", "grounding", "conversation"]
    caption: str
    regions: list[Region]
    ocr: list[OcrItem]
    grounding: list[GroundingItem]
    conversations: list[Turn]
    boxes: list[list[float]]
    width: int
    height: int
    meta: dict[str, Any]


# Causes of bad records, the categories of a run's bad-record summary.
BAD_RECORD_KINDS: tuple[str, ...] = (
    "malformed JSON",  # a line / sample that is not one JSON object
    "incomplete sample",  # a WebDataset sample without its .json or a named image
    "schema",  # a field missing, of the wrong type or inconsistent
    "box outside image",
    "image not found",
    "cannot decode image",
    "decompression bomb",  # more pixels than the decoder accepts
    "size mismatch",  # width/height in the record differ from the image
    "too long",  # over max_length after image expansion
    "cannot encode",  # refused by the image processor or the chat template
    "other",
)
# Raise sites that name no kind are classified by how their reason starts.
_KIND_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("malformed JSON", "malformed JSON"),
    ("not UTF-8", "malformed JSON"),
    ("image file not found", "image not found"),
    ("cannot decode image", "cannot decode image"),
    ("empty image", "cannot decode image"),
    ("refused as a possible decompression bomb", "decompression bomb"),
    ("record says", "size mismatch"),
)


class BadRecordError(ValueError):
    """A single record is unusable; ``location`` says where it is (``file.jsonl:17 (id=abc)``), ``reason`` what is
    wrong and ``kind`` (one of `BAD_RECORD_KINDS`) why, in one word; when not given it is derived from ``reason``."""

    def __init__(self, location: str, reason: str, kind: str | None = None) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason
        if kind is None:
            kind = next((k for prefix, k in _KIND_BY_PREFIX if reason.startswith(prefix)), "other")
        self.kind = kind


def record_images(record: Record) -> list[str]:
    """The record's image paths (relative to its source's image root), in order; ``[]`` for a text-only record."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def record_location(record: Record, where: str) -> str:
    """``where`` plus the record id when there is one, e.g. ``data/train.jsonl:17 (id=abc)``."""
    record_id = record.get("id") if isinstance(record, dict) else None
    return f"{where} (id={record_id})" if isinstance(record_id, str) and record_id else where


def image_size(record: Record) -> tuple[int, int] | None:
    """``(width, height)`` stored in the record, or ``None`` if the image has not been opened yet."""
    if "width" in record and "height" in record:
        return record["width"], record["height"]
    return None


def validate_record(record: Record, where: str) -> None:
    """Check ``record`` against the schema; raise `BadRecordError` naming ``where``, the id, and the problem.

    Boxes are checked against ``width``/``height`` when the record has them (always after the image was opened by
    `load_record_images`), otherwise only for shape and order.
    """
    if not isinstance(record, dict):
        raise BadRecordError(where, f"expected a JSON object, got {type(record).__name__}", "malformed JSON")
    location = record_location(record, where)
    if "_error" in record:
        raise BadRecordError(location, record["_error"], record.get("_error_kind"))
    try:
        _check_record(record)
    except BoxOutsideImageError as err:
        raise BadRecordError(location, str(err), "box outside image") from None
    except (TypeError, ValueError) as err:  # a wrong type or value: either way the record is bad
        raise BadRecordError(location, str(err), "schema") from None


def _check_record(record: Record) -> None:
    unknown = sorted(key for key in record if key not in KNOWN_KEYS and not key.startswith("_"))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown}; allowed keys are {sorted(KNOWN_KEYS)} (put extra data under 'meta')"
        )
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise ValueError("missing field 'id' (a non-empty string)")
    task = record.get("task")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    images = _check_images(record.get("image"))
    if not images and task != "conversation":
        raise ValueError(f"task {task!r} needs an image, but 'image' is missing or null")
    size = _check_size(record)
    field = TASK_FIELDS[task]
    if field not in record:
        raise ValueError(f"task {task!r} needs the field {field!r}")
    if task == "caption":
        _check_text(record["caption"], "caption")
    elif task == "conversation":
        _check_conversation(record, len(images), size)
    else:
        items = record[field]
        if not isinstance(items, list) or not items:
            raise ValueError(f"{field!r} must be a non-empty list")
        for index, item in enumerate(items):
            _check_item(task, item, f"{field}[{index}]", size)


def _check_images(image: Any) -> list[str]:
    paths = [image] if isinstance(image, str) else image
    if image is None:
        return []
    if not isinstance(paths, list) or not all(isinstance(path, str) and path for path in paths):
        raise ValueError(f"'image' must be a path, a list of paths, or null; got {image!r}")
    return paths


def _check_size(record: Record) -> tuple[int, int] | None:
    if ("width" in record) != ("height" in record):
        raise ValueError("'width' and 'height' must be given together")
    size = image_size(record)
    if size is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"'width'/'height' must be positive integers, got {size}")
    return size


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} must be a non-empty string, got {text!r}")


def _check_box(box: Any, where: str, size: tuple[int, int] | None) -> None:
    if not isinstance(box, Sequence) or isinstance(box, str):
        raise TypeError(f"{where}: expected [x1, y1, x2, y2], got {box!r}")
    numbers = len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    if size is None and numbers and min(box) < -0.5:
        raise BoxOutsideImageError(f"{where}: box {list(box)} has negative coordinates (boxes are pixels of the image)")
    # Without a size (image not opened yet) only shape and order are checked; the far edges are checked later.
    width, height = size if size is not None else (math.inf, math.inf)
    validate_box(box, width, height, where)


def _check_quad(quad: Any, where: str, size: tuple[int, int] | None) -> None:
    if not isinstance(quad, Sequence) or isinstance(quad, str) or len(quad) != 8:
        raise ValueError(f"{where}: expected 8 numbers [x1, y1, ..., x4, y4], got {quad!r}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in quad):
        raise ValueError(f"{where}: expected 8 finite numbers, got {quad!r}")
    # A quad is valid where its bounding box is.
    xs, ys = quad[0::2], quad[1::2]
    _check_box([min(xs), min(ys), max(xs), max(ys)], f"{where} (bounding box of {list(quad)})", size)


def _check_item(task: str, item: Any, where: str, size: tuple[int, int] | None) -> None:
    text_key = "expression" if task == "grounding" else "text"
    if not isinstance(item, dict):
        raise TypeError(f"{where} must be an object, got {item!r}")
    _check_text(item.get(text_key), f"{where}.{text_key}")
    if task == "ocr" and ("box" in item) == ("quad" in item):
        raise ValueError(f"{where} needs exactly one of 'box' or 'quad'")
    if "quad" in item:
        _check_quad(item["quad"], f"{where}.quad", size)
    elif "box" in item:
        _check_box(item["box"], f"{where}.box", size)
    else:
        raise ValueError(f"{where} is missing 'box'")


def _check_conversation(record: Record, num_images: int, size: tuple[int, int] | None) -> None:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of {'role', 'content'}")
    image_markers = box_markers = 0
    has_system = isinstance(turns[0], dict) and turns[0].get("role") == SYSTEM_ROLE
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise TypeError(f"{where} must be {{'role': ..., 'content': str}}, got {turn!r}")
        expected_role = SYSTEM_ROLE if has_system and index == 0 else ROLES[(index - has_system) % 2]
        if turn.get("role") != expected_role:
            raise ValueError(
                f"{where}.role is {turn.get('role')!r}; turns must alternate user/assistant starting with user "
                "(after an optional first system turn)"
            )
        if IMAGE_MARKER in turn["content"] and expected_role != "user":
            raise ValueError(f"{where}: '{IMAGE_MARKER}' may only appear in user turns")
        image_markers += turn["content"].count(IMAGE_MARKER)
        box_markers += turn["content"].count(BOX_MARKER)
    if turns[-1]["role"] != "assistant":
        raise ValueError("the last turn must be the assistant's (there is nothing to learn otherwise)")
    if image_markers not in (0, num_images):
        raise ValueError(
            f"{image_markers} '{IMAGE_MARKER}' marker(s) for {num_images} image(s); use one per image or none"
        )
    boxes = record.get("boxes", [])
    if not isinstance(boxes, list) or len(boxes) != box_markers:
        count = len(boxes) if isinstance(boxes, list) else boxes
        raise ValueError(f"{box_markers} '{BOX_MARKER}' placeholder(s) but 'boxes' has {count}")
    for index, box in enumerate(boxes):
        _check_box(box, f"boxes[{index}]", size)


__all__ = [
    "BAD_RECORD_KINDS",
    "BOX_MARKER",
    "IMAGE_MARKER",
    "SYSTEM_ROLE",
    "TASKS",
    "BadRecordError",
    "GroundingItem",
    "OcrItem",
    "Record",
    "Region",
    "Turn",
    "image_size",
    "record_images",
    "record_location",
    "validate_record",
]
