"""The five synthetic task families of ``finevit-vl make-data``: each ``make_<family>(rng, settings)`` draws one image and
returns a `Scene` (the image, its Stage III records, one SFT question + answer, and its benchmark rows).

Every image is drawn on a plain light background at native resolution (sides are multiples of 28 between 0.75x and
1.25x ``Settings.image_size``, with wide charts and tall documents). A 28 px cell is exactly one projector token
(2x2 patches of 14 px), and the families place one object or glyph per token:

* ``counting``: 1..``max_count`` (default 6) copies of ONE shape (circle / square / triangle) in ONE color on a
  square canvas (``image_size`` rounded to 28 px) tiled by 28 px cells, one object of 16-22 px inside each chosen
  cell (so they never touch), so the count is the number of tokens holding an object. No distractors: the count is
  the only thing to learn.
* ``grounding``: 2-4 objects of distinct colors (shapes may repeat), one near the centre of each chosen quadrant of a
  square canvas (quadrants a whole number of 28 px tokens wide), 70-90% of the quadrant.
  The expression names color and shape ("the red circle"); the color alone identifies the object.
* ``ocr``: a cropped word image (as in OCRBench's regular-text sets): one lowercase word (48-word vocabulary, up to
  six letters) or a 2-5 digit number in a dark color, left-aligned in a strip of six 28 px token cells, one glyph
  centred in each cell on a common baseline. Reading is then naming the glyph in each token, left to right.
* ``chart``: a bar chart of 3-5 bars labelled with distinct capital letters, in consecutive slots of five 28 px token
  columns (the width does not tell the count); every bar carries its integer value (5-99, all distinct) above it.
  Questions: how many bars (40%, answered by looking), which
  bar is highest (20%) and the value of a bar (40%), both answered by reading.
* ``document``: a small form: a title (INVOICE / RECEIPT / ORDER) and 3-4 "Key: value" lines drawn from invoice
  number, date, total and customer.

Learnability choices: five saturated colors far apart in RGB, objects large relative to the 14 px patch (3-7 patches
across), no overlap, no anti-aliasing on shapes (boxes are the exact pixel extent of what was drawn, measured from the
drawing mask), and one short answer per question.

Stage III records per image: counting -> caption + region (the per-instance text is the same for every instance, so
only box -> text turns are rendered); grounding -> grounding + region; ocr -> ocr; chart -> ocr (values then labels) +
caption; document -> ocr (one item per line).

SFT user turns (assistant answer after the arrow); the benchmark rows store the bare question:

* counting: ``prompts.count_question("red circles")`` = ``"How many red circles are there in the image?\\nAnswer with a
  single number."`` -> ``"4"``. countbench ``question`` = ``"How many red circles are there in the image?"``
  (``prompts.COUNT_QUESTION``), ``number`` = 4, ``text`` = a caption WITHOUT the count ("Red circles on a plain
  background.") so that countbenchqa-style prompts do not leak the answer.
* grounding: ``prompts.CAPTION_TO_BOX.format(text="the red circle")`` -> the box (``"<box>"`` placeholder, rendered
  at collate time, int1000 by default). refcoco ``answer`` = ``["the red circle"]``, ``bbox`` = ``[x, y, w, h]`` pixels.
* ocr: ``prompts.short_answer("What is the word in the image?")`` (or ``"What is the number in the image?"``) ->
  ``"apple"``. ocrbench ``question`` = the bare question; question_type "Regular Text Recognition" or "Digit String
  Recognition". The ocrbench task must append ``prompts.SHORT_ANSWER`` like docvqa / chartqa.
* chart: ``prompts.short_answer("What is the value of B?")`` -> ``"42"`` (type "augmented_test"),
  ``prompts.short_answer("Which bar has the highest value?")`` -> ``"B"`` or ``prompts.short_answer("How many bars
  are there?")`` -> ``"4"`` (type "human_test"). chartqa ``question``
  = the bare question.
* document: ``prompts.short_answer("What is the total?")`` -> ``"56.20"`` (also "What is the invoice number?",
  "What is the date?", "What is the customer name?"). docvqa ``question`` = the bare question, ``answers`` = [value];
  the same question also goes to ocrbench as "Key Information Extraction".
"""

import functools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont, features

from .. import prompts
from .schema import BOX_MARKER, Record


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (22, 163, 74),
    "blue": (37, 99, 235),
    "yellow": (234, 179, 8),
    "purple": (147, 51, 234),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (246, 246, 240), (240, 244, 250))
INKS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (30, 41, 90), (120, 20, 20), (20, 80, 40))
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# fmt: off
WORDS: tuple[str, ...] = (
    "apple", "river", "house", "green", "music", "table", "light", "water", "stone", "cloud", "bread", "chair",
    "train", "plant", "smile", "dream", "ocean", "tiger", "piano", "honey", "lemon", "paper", "story", "north",
    "south", "cat", "dog", "sun", "map", "box", "key", "pen", "cup", "hat", "sky", "bus", "garden", "window",
    "forest", "market", "planet", "silver", "orange", "yellow", "rocket", "candle", "bridge", "castle",
)
# fmt: on
NAMES: tuple[str, ...] = ("Alice", "Bruno", "Chen", "Dana", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas")
# Document fields: key drawn on the page, question asked about it, value generator.
FIELDS: dict[str, tuple[str, Callable[[random.Random], str]]] = {
    "Invoice No": ("What is the invoice number?", lambda rng: str(rng.randint(1000, 99999))),
    "Date": (
        "What is the date?",
        lambda rng: f"{rng.randint(2018, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    ),
    "Total": ("What is the total?", lambda rng: f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"),
    "Customer": ("What is the customer name?", lambda rng: rng.choice(NAMES)),
}
TITLES: tuple[str, ...] = ("INVOICE", "RECEIPT", "ORDER")

Box = list[int]


@dataclass(frozen=True)
class Settings:
    image_size: int = 224
    max_count: int = 6


@dataclass
class Scene:
    """One drawn image and everything derived from it (records without id / image / size; benchmark rows without image)."""

    image: Image.Image
    stage3: list[Record]
    prompt: str  # SFT user turn
    answer: str  # SFT assistant turn; "<box>" placeholders are filled from `boxes`
    boxes: list[Box] = field(default_factory=list)
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)


# ---------------------------------------------------------------- drawing helpers


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    if not features.check("freetype2"):
        raise RuntimeError(
            "make-data draws text with FreeType, but this Pillow build lacks it; reinstall Pillow from PyPI wheels"
        )
    return ImageFont.load_default(size=size)


def _canvas_size(rng: random.Random, base: int, layout: str = "any") -> tuple[int, int]:
    """Sides are multiples of 28 (two 14 px patches) within [0.75, 1.25] x base, so native resolution is exercised."""
    sides = list(range(28 * round(0.75 * base / 28), 28 * round(1.25 * base / 28) + 1, 28))
    half = len(sides) // 2
    if layout == "wide":
        return rng.choice(sides[half:]), rng.choice(sides[: half + 1])
    if layout == "tall":
        return rng.choice(sides[: half + 1]), rng.choice(sides[half:])
    return rng.choice(sides), rng.choice(sides)


def _paste(image: Image.Image, mask: Image.Image, origin: tuple[int, int], color: tuple[int, int, int]) -> Box:
    """Paint ``color`` through ``mask`` at ``origin``; return the exact pixel box ``[x1, y1, x2, y2]`` of what was painted."""
    image.paste(color, origin, mask)
    left, top, right, bottom = mask.getbbox()
    return [origin[0] + left, origin[1] + top, origin[0] + right, origin[1] + bottom]


def _draw_shape(image: Image.Image, shape: str, color: tuple[int, int, int], box: Box) -> Box:
    width, height = box[2] - box[0], box[3] - box[1]
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([0, 0, width - 1, height - 1], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, width - 1, height - 1], fill=255)
    else:
        draw.polygon([(0, height - 1), (width - 1, height - 1), ((width - 1) / 2, 0)], fill=255)
    return _paste(image, mask, (box[0], box[1]), color)


def _draw_text(image: Image.Image, text: str, origin: tuple[int, int], size: int, color: tuple[int, int, int]) -> Box:
    """Draw ``text`` with its ink's top-left corner at ``origin``; return the ink box."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255)
    return _paste(image, mask, origin, color)


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = _font(size).getbbox(text)
    return right - left, bottom - top


def _scaled(size: int, settings: Settings) -> int:
    return max(8, round(size * settings.image_size / 224))


# ---------------------------------------------------------------- task families


TOKEN_CELL = 28  # px: one projector token (2x2 merge of 14 px patches)
CHART_COLUMNS = 5  # bar slots per chart, one token column each
OCR_CELLS = 6  # glyph cells per OCR strip: the longest word


def make_counting(rng: random.Random, settings: Settings) -> Scene:
    cells_per_side = max(3, round(settings.image_size / TOKEN_CELL))
    side = cells_per_side * TOKEN_CELL
    image = Image.new("RGB", (side, side), rng.choice(BACKGROUNDS))
    count = rng.randint(1, settings.max_count)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    boxes = []
    for cell in rng.sample(range(cells_per_side**2), count):
        row, col = divmod(cell, cells_per_side)
        size = rng.randint(16, 22)
        x = col * TOKEN_CELL + rng.randint(2, TOKEN_CELL - size - 2)
        y = row * TOKEN_CELL + rng.randint(2, TOKEN_CELL - size - 2)
        boxes.append(_draw_shape(image, shape, COLORS[color], [x, y, x + size, y + size]))
    name = f"{color} {shape}s"
    noun = shape if count == 1 else f"{shape}s"
    return Scene(
        image=image,
        stage3=[
            {
                "task": "caption",
                "caption": f"{NUMBER_WORDS[count].capitalize()} {color} {noun} on a plain background.",
            },
            {"task": "region", "regions": [{"box": box, "text": f"a {color} {shape}"} for box in boxes]},
        ],
        prompt=prompts.count_question(name),
        answer=str(count),
        benchmarks={
            "countbench": {
                "question": prompts.COUNT_QUESTION.format(name=name),
                "number": count,
                "text": f"{color.capitalize()} {shape}s on a plain background.",
            }
        },
    )


def make_grounding(rng: random.Random, settings: Settings) -> Scene:
    # Square canvas of 2x2 quadrants, each a whole number of projector tokens wide; one object near the centre of
    # each chosen quadrant (70-90% of it, a few px off centre), so finding the object meant is the whole question.
    quadrant = max(1, round(settings.image_size / TOKEN_CELL / 2)) * TOKEN_CELL
    image = Image.new("RGB", (2 * quadrant, 2 * quadrant), rng.choice(BACKGROUNDS))
    # Distinct colors (shapes may repeat): the color alone names the object.
    kinds = [(color, rng.choice(SHAPES)) for color in rng.sample(list(COLORS), rng.randint(2, 4))]
    cells = []
    for cell in rng.sample(range(4), len(kinds)):
        row, col = divmod(cell, 2)
        size = int(quadrant * rng.uniform(0.7, 0.9))
        slack = quadrant - size
        x = col * quadrant + slack // 2 + rng.randint(-(slack // 4), slack // 4)
        y = row * quadrant + slack // 2 + rng.randint(-(slack // 4), slack // 4)
        cells.append([x, y, x + size, y + size])
    boxes = [_draw_shape(image, shape, COLORS[color], box) for (color, shape), box in zip(kinds, cells)]
    expressions = [f"the {color} {shape}" for color, shape in kinds]
    target = rng.randrange(len(kinds))
    x1, y1, x2, y2 = boxes[target]
    return Scene(
        image=image,
        stage3=[
            {"task": "grounding", "grounding": [{"expression": e, "box": b} for e, b in zip(expressions, boxes)]},
            {"task": "region", "regions": [{"box": b, "text": f"a {c} {s}"} for (c, s), b in zip(kinds, boxes)]},
        ],
        prompt=prompts.CAPTION_TO_BOX.format(text=expressions[target]),
        answer=BOX_MARKER,
        boxes=[boxes[target]],
        benchmarks={
            "refcoco": {
                "answer": [expressions[target]],
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "segmentation": [float(v) for v in (x1, y1, x2, y1, x2, y2, x1, y2)],
            }
        },
    )


def make_ocr(rng: random.Random, settings: Settings) -> Scene:
    # A cropped word image, as in OCRBench's regular-text sets (IIIT5K, SVT): one text line, left-aligned, one glyph per
    # projector token (28 px cell at 112 px), in a strip of OCR_CELLS tokens. Reading is then "name the glyph in each
    # token, left to right".
    cell = TOKEN_CELL * max(1, round(settings.image_size / 112))
    image = Image.new("RGB", (OCR_CELLS * cell, cell), rng.choice(BACKGROUNDS))
    is_number = rng.random() < 0.3
    digits = rng.randint(2, 5)  # uniform length, so short numbers are as common as long ones
    text = str(rng.randint(10 ** (digits - 1), 10**digits - 1)) if is_number else rng.choice(WORDS)
    font, ink = _font(round(cell * 0.8)), rng.choice(INKS)
    boxes = []
    for column, char in enumerate(text):
        left, _, right, _ = font.getbbox(char)
        # Common baseline (descenders hang below it); glyph centred in its cell.
        origin = (column * cell + (cell - (right - left)) // 2 - left, -round(cell * 0.07))
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).text(origin, char, font=font, fill=255)
        boxes.append(_paste(image, mask, (0, 0), ink))
    box = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    question = "What is the number in the image?" if is_number else "What is the word in the image?"
    return Scene(
        image=image,
        stage3=[{"task": "ocr", "ocr": [{"text": text, "box": box}]}],
        prompt=prompts.short_answer(question),
        answer=text,
        benchmarks={
            "ocrbench": {
                "question": question,
                "answer": [text],
                "dataset": "synthetic_digits" if is_number else "synthetic_words",
                "question_type": "Digit String Recognition" if is_number else "Regular Text Recognition",
            }
        },
    )


def make_chart(rng: random.Random, settings: Settings) -> Scene:
    # Five columns of projector tokens (28 px each at 112 px); the 3-5 bars fill consecutive columns from a random one,
    # so the number of bars is the number of columns holding bar color (as in counting) and not the image width.
    count = rng.randint(3, 5)
    slot = TOKEN_CELL * max(1, round(settings.image_size / 112))
    width, height = CHART_COLUMNS * slot, _canvas_size(rng, settings.image_size, "wide")[1]
    first = rng.randint(0, CHART_COLUMNS - count)
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    labels = rng.sample(string.ascii_uppercase, count)
    values = rng.sample(range(5, 100), count)
    value_size, label_size = _scaled(12, settings), _scaled(14, settings)
    top, bottom = value_size + 8, label_size + 10
    baseline = height - bottom
    bar_w = int(slot * 0.6)
    ImageDraw.Draw(image).line([(0, baseline), (width - 1, baseline)], fill=(120, 120, 120), width=1)
    color = COLORS[rng.choice(list(COLORS))]
    value_items, label_items = [], []
    for i, (label, value) in enumerate(zip(labels, values)):
        x = (first + i) * slot + (slot - bar_w) // 2
        bar_h = max(1, round((baseline - top - 4) * value / 100))
        ImageDraw.Draw(image).rectangle([x, baseline - bar_h, x + bar_w - 1, baseline - 1], fill=color)
        for text, size, y, items in (
            (str(value), value_size, baseline - bar_h - 3 - _text_size(str(value), value_size)[1], value_items),
            (label, label_size, baseline + 4, label_items),
        ):
            text_w = _text_size(text, size)[0]
            items.append(
                {"text": text, "box": _draw_text(image, text, (x + (bar_w - text_w) // 2, y), size, (0, 0, 0))}
            )
    kind_draw = rng.random()
    if kind_draw < 0.4:
        question, answer, kind = "How many bars are there?", str(count), "human_test"
    elif kind_draw < 0.6:
        question, answer, kind = "Which bar has the highest value?", labels[values.index(max(values))], "human_test"
    else:
        target = rng.randrange(count)
        question, answer, kind = f"What is the value of {labels[target]}?", str(values[target]), "augmented_test"
    listing = ", ".join(f"{label} is {value}" for label, value in zip(labels, values))
    return Scene(
        image=image,
        stage3=[
            {"task": "ocr", "ocr": value_items + label_items},
            {"task": "caption", "caption": f"A bar chart with {count} bars: {listing}."},
        ],
        prompt=prompts.short_answer(question),
        answer=answer,
        benchmarks={"chartqa": {"question": question, "answer": answer, "type": kind}},
    )


def make_document(rng: random.Random, settings: Settings) -> Scene:
    width, height = _canvas_size(rng, settings.image_size, "tall")
    image = Image.new("RGB", (width, height), (255, 255, 255))
    title_size, line_size = _scaled(20, settings), _scaled(13, settings)
    x, y = rng.randint(8, 16), rng.randint(8, 16)
    items = [{"text": (title := rng.choice(TITLES)), "box": _draw_text(image, title, (x, y), title_size, (0, 0, 0))}]
    y = items[0]["box"][3] + _scaled(14, settings)
    keys = rng.sample(list(FIELDS), rng.randint(3, 4))
    values = {key: FIELDS[key][1](rng) for key in keys}
    for key in keys:
        line = f"{key}: {values[key]}"
        items.append({"text": line, "box": _draw_text(image, line, (x, y), line_size, (0, 0, 0))})
        y = items[-1]["box"][3] + rng.randint(_scaled(10, settings), _scaled(16, settings))
    key = rng.choice(keys)
    question, answer = FIELDS[key][0], values[key]
    return Scene(
        image=image,
        stage3=[{"task": "ocr", "ocr": items}],
        prompt=prompts.short_answer(question),
        answer=answer,
        benchmarks={
            "docvqa": {
                "question": question,
                "answers": [answer],
                "question_types": ["form"],
                "ucsf_document_page_no": "1",
            },
            "ocrbench": {
                "question": question,
                "answer": [answer],
                "dataset": "synthetic_docs",
                "question_type": "Key Information Extraction",
            },
        },
    )


MAKERS: dict[str, Callable[[random.Random, Settings], Scene]] = {
    "counting": make_counting,
    "grounding": make_grounding,
    "ocr": make_ocr,
    "chart": make_chart,
    "document": make_document,
}
FAMILIES: tuple[str, ...] = tuple(MAKERS)


__all__ = ["COLORS", "FAMILIES", "MAKERS", "Scene", "Settings", "make_chart", "make_counting", "make_document",
           "make_grounding", "make_ocr"]
