"""Record -> chat messages: the one place where a record's task becomes prompts and answers (no tokenizer here).

Messages follow the Hugging Face chat-template layout::

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "..."}]}, ...]

with one ``{"type": "image"}`` per image of `record_images(record)`, in order; the collator pairs them with the opened
images. Boxes are rendered from pixels with `finevit_vl.boxes` in the chosen ``box_format``.

Per task (wording from `finevit_vl.prompts`, shared with evaluation):

* ``caption``: ``CAPTION`` -> caption.
* ``region``: per region a Bbox2Caption turn (``BOX_TO_CAPTION`` -> text) and a Caption2Bbox turn
  (``CAPTION_TO_BOX`` -> box).
* ``ocr``: per item ``BOX_TO_OCR`` -> text and ``OCR_TO_BOX`` -> box (quads as 4 points), plus one ``READ_ALL_TEXT``
  turn answered with every text in record order, one per line.
* ``grounding``: per item ``CAPTION_TO_BOX`` with the expression -> box.
* ``conversation``: the turns as written (a system turn included), ``<image>`` markers replaced by image items and
  ``<box>`` filled in order.

Text -> box turns are dropped when the same text names several items of the record: the target would be ambiguous.
Turns are shuffled with ``rng`` when one is given; without markers, images open the first user turn.
"""

import random
from collections import Counter
from typing import Any

from .. import prompts
from ..boxes import BoxFormat, box_to_text, check_box_format, points_to_text
from .schema import BOX_MARKER, IMAGE_MARKER, Record, record_images


Message = dict[str, Any]
# (prompt, answer) pairs before images are attached.
QA = tuple[str, str]


REGION_DIRECTIONS = ("both", "box_to_text", "text_to_box")


def record_to_messages(
    record: Record,
    width: int,
    height: int,
    box_format: BoxFormat = "int1000",
    rng: random.Random | None = None,
    max_regions: int | None = None,
    read_all_text: bool = True,
    directions: str = "both",
) -> list[Message]:
    """Chat messages for ``record`` whose (first) image is ``width x height`` pixels.

    ``max_regions`` bounds how many regions / OCR items / grounding items are used (a random subset with ``rng``,
    else the first ones), to bound sequence length. ``read_all_text`` adds the ``READ_ALL_TEXT`` turn to OCR records.
    ``directions`` (`REGION_DIRECTIONS`) selects the region turns: ``both`` (GranViT's two directions, the default),
    ``box_to_text`` (Bbox2Caption / box -> OCR only; a grounding expression becomes the caption of its box) or
    ``text_to_box`` (Caption2Bbox / OCR -> box / grounding only).
    """
    if directions not in REGION_DIRECTIONS:
        raise ValueError(f"directions must be one of {REGION_DIRECTIONS}, got {directions!r}")
    check_box_format(box_format)
    num_images = len(record_images(record))
    task = record["task"]
    if task == "conversation":
        return _conversation_messages(record, num_images, width, height, box_format)

    def box_text(item: dict[str, Any]) -> str:
        if "quad" in item:
            return points_to_text(item["quad"], width, height, box_format)
        return box_to_text(item["box"], width, height, box_format)

    if task == "caption":
        pairs = [(prompts.CAPTION, record["caption"])]
    elif task == "region":
        regions = _subset(record["regions"], max_regions, rng)
        pairs = _both_directions(regions, "text", box_text, prompts.BOX_TO_CAPTION, prompts.CAPTION_TO_BOX, directions)
    elif task == "ocr":
        items = _subset(record["ocr"], max_regions, rng)
        pairs = _both_directions(items, "text", box_text, prompts.BOX_TO_OCR, prompts.OCR_TO_BOX, directions)
        if read_all_text:
            pairs.append((prompts.READ_ALL_TEXT, "\n".join(item["text"] for item in record["ocr"])))
    elif task == "grounding":
        items = _subset(record["grounding"], max_regions, rng)
        if directions == "box_to_text":
            pairs = [(prompts.BOX_TO_CAPTION.format(box=box_text(item)), item["expression"]) for item in items]
        else:
            pairs = [(prompts.CAPTION_TO_BOX.format(text=item["expression"]), box_text(item)) for item in items]
    else:
        raise ValueError(f"record {record.get('id')!r}: unknown task {task!r}")
    if not pairs and directions != "both":
        raise NoTurnsInDirection(f"no {directions} turn: every text of this {task} record names several boxes, "
                                 "which cannot be asked text -> box")
    if rng is not None:
        rng.shuffle(pairs)
    return _qa_messages(pairs, num_images)


class NoTurnsInDirection(ValueError):
    """A region record that has no turn in the one direction asked for (not bad data: it fits the other one)."""


def _subset(items: list[dict[str, Any]], limit: int | None, rng: random.Random | None) -> list[dict[str, Any]]:
    if limit is None or len(items) <= limit:
        return list(items)
    return rng.sample(items, limit) if rng is not None else list(items[:limit])


def _both_directions(items: list[dict[str, Any]], text_key: str, box_text, to_text: str, to_box: str,
                     directions: str = "both") -> list[QA]:
    """Box -> text for every item; text -> box only for texts that name a single item of the record."""
    counts = Counter(item[text_key] for item in items)
    pairs: list[QA] = []
    for item in items:
        box = box_text(item)
        if directions != "text_to_box":
            pairs.append((to_text.format(box=box), item[text_key]))
        if counts[item[text_key]] == 1 and directions != "box_to_text":
            pairs.append((to_box.format(text=item[text_key]), box))
    return pairs


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _images(count: int) -> list[dict[str, str]]:
    # Distinct dicts: a collator may attach the opened image to each item.
    return [{"type": "image"} for _ in range(count)]


def _qa_messages(pairs: list[QA], num_images: int) -> list[Message]:
    messages: list[Message] = []
    for index, (prompt, answer) in enumerate(pairs):
        images = _images(num_images) if index == 0 else []
        messages.append({"role": "user", "content": [*images, _text(prompt)]})
        messages.append({"role": "assistant", "content": [_text(answer)]})
    return messages


def _conversation_messages(
    record: Record, num_images: int, width: int, height: int, box_format: BoxFormat
) -> list[Message]:
    boxes = iter(record.get("boxes", []))
    has_markers = any(IMAGE_MARKER in turn["content"] for turn in record["conversations"])
    first_user = next(index for index, turn in enumerate(record["conversations"]) if turn["role"] == "user")
    messages: list[Message] = []
    for index, turn in enumerate(record["conversations"]):
        # Fill "<box>" placeholders left to right, across turns.
        pieces = turn["content"].split(BOX_MARKER)
        text = pieces[0] + "".join(box_to_text(next(boxes), width, height, box_format) + p for p in pieces[1:])
        if turn["role"] == "user" and has_markers:
            content = _split_images(text)
        else:
            images = _images(num_images) if index == first_user else []
            content = [*images, _text(text)]
        messages.append({"role": turn["role"], "content": content})
    return messages


def _split_images(text: str) -> list[dict[str, str]]:
    """``"<image>\\nWhat is this?"`` -> ``[image, text]``; whitespace next to a marker is layout, not content."""
    pieces = text.split(IMAGE_MARKER)
    content: list[dict[str, str]] = []
    for index, piece in enumerate(pieces):
        if index > 0:
            content += _images(1)
            piece = piece.lstrip()
        if index < len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            content.append(_text(piece))
    return content


__all__ = ["REGION_DIRECTIONS", "NoTurnsInDirection", "record_images", "record_to_messages"]
