"""Synthetic data for the encoder pretraining stages: Stage I (masked image modeling, images only), Stage II
(image-text contrastive learning on LONG dense captions), and the zero-shot evaluation splits.

Output (``OUT`` = ``out``)::

    OUT/stage2/{train,eval}.jsonl          caption records (long caption; meta: short caption, group, label, drawing)
    OUT/stage2/images/{split}-g{group:05d}-{member}.png
    OUT/stage1/train.jsonl                 the Stage II train records, images as ../stage2/images/...
    OUT/zeroshot/retrieval/                manifest.jsonl {"image", "captions": [short, paraphrase]}, images/
    OUT/zeroshot/retrieval_long/           manifest.jsonl {"image", "captions": [long]}, images/
    OUT/zeroshot/classification/           manifest.jsonl {"image", "label"}, classnames.json, templates.json, images/
    OUT/pretrain_manifest.json             counts, seed, group size, where the long captions of a group diverge

Image paths are relative to the folder of their JSONL file (the `JsonlSource` default). Scenes reuse the drawing
helpers of `finevit_vl.data.scenes`: a plain background, sides multiples of 28 within 0.75x-1.25x ``image_size``,
seen as a 3x3 grid of cells.

Long-caption images come in GROUPS of ``group_size`` that share the canvas, the background and 2-3 common objects
(large or medium, in the non-corner cells, at identical pixels); the members differ only in a small extra object in one
corner and an optional word in another corner. Their long caption (about 100-150 words) describes the shared content
first, identical within a group and at least `MIN_SHARED_WORDS` words long, then the member's details. So a text
encoder truncated to 64 tokens cannot tell a group apart, while 256 tokens can (under the 512-token tiny tokenizer the
shared part is 100-170 tokens and whole captions stay under 256). The short caption names the two most salient common
objects only (COCO / Flickr style); short-caption retrieval images are therefore drawn one per scene. Classification
images hold one dominant colour x shape object (`CLASSNAMES`) and at most two small distractors of other classes.

Each group (each classification image) draws from its own seed stream (``"{seed}:pretrain:{split}:{index}"``), so the
output does not depend on ``workers`` and held-out splits never replay a training stream.
"""

import contextlib
import io
import itertools
import json
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from PIL import Image

from .scenes import (
    BACKGROUNDS,
    COLORS,
    INKS,
    NUMBER_WORDS,
    SHAPES,
    WORDS,
    _canvas_size,
    _draw_shape,
    _draw_text,
    _font,
)
from .schema import Record


GROUP_SIZE = 8
ZEROSHOT_SPLITS: tuple[str, ...] = ("retrieval", "retrieval_long", "classification")
MIN_SHARED_WORDS = 72  # the shared part of a long caption is padded to at least this many words
CLASSNAMES: tuple[str, ...] = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "an image showing a {}.",
    "a picture of a single {}.",
    "a simple illustration of a {}.",
)
BACKGROUND_NAMES: tuple[str, ...] = ("white", "warm off-white", "very pale blue")  # aligned with scenes.BACKGROUNDS
INK_NAMES: tuple[str, ...] = ("black", "dark navy", "dark red", "dark green")  # aligned with scenes.INKS
CORNER_WORDS: tuple[str, ...] = tuple(word for word in WORDS if len(word) <= 5)
CORNERS: tuple[tuple[int, int], ...] = ((0, 0), (0, 2), (2, 0), (2, 2))
INNER_CELLS: tuple[tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (1, 2), (2, 1))
# (row, col) of the 3x3 grid -> (short name, phrase in a sentence, paraphrase)
POSITIONS: dict[tuple[int, int], tuple[str, str, str]] = {
    (0, 0): ("top left", "in the top left corner", "in the upper left"),
    (0, 1): ("top", "at the top centre", "near the top edge"),
    (0, 2): ("top right", "in the top right corner", "in the upper right"),
    (1, 0): ("left", "on the left side", "at the left edge"),
    (1, 1): ("centre", "in the centre", "in the middle"),
    (1, 2): ("right", "on the right side", "at the right edge"),
    (2, 0): ("bottom left", "in the bottom left corner", "in the lower left"),
    (2, 1): ("bottom", "at the bottom centre", "near the bottom edge"),
    (2, 2): ("bottom right", "in the bottom right corner", "in the lower right"),
}
SIZE_PARAPHRASE = {"large": "big", "medium": "mid-sized", "small": "tiny"}
ORDINALS = ("first", "second", "third")

# Shared-part sentence templates (chosen once per group) ...
# The intro names the main colors, so that different groups differ within their first few words.
INTROS = (
    "A {canvas} synthetic image, {w} by {h} pixels, of flat {colors} shapes with sharp edges and no shading.",
    "A simple {canvas} illustration of {colors} shapes on an empty background, with no shadows.",
    "A {canvas} digital drawing of plain {colors} geometric figures, each filled with one solid color.",
)
BACKGROUND_SENTENCES = (
    "The background is a plain {bg} color without texture or gradient.",
    "The whole canvas is a flat {bg} tone with no texture.",
    "Everything sits on a uniform {bg} background.",
)
COUNT_SENTENCES = ("There are {count} main shapes: {kinds}.", "The main figures number {count}: {kinds}.")
OBJECT_SENTENCES = (
    "The {ordinal} is a {size} {color} {shape} {where}, about {px} pixels wide.",
    "{Ordinal}, {where} there is a {size} {shape} painted solid {color}.",
    "{Where} sits the {ordinal} one, a {size} {color} {shape}.",
)
RELATION_SENTENCES = ("The {a} is {relation} the {b}.", "The {a} sits {relation} the {b}.")
PADDING = (
    "Their colors are {colors}, all strongly saturated, and none of these shapes overlap or touch.",
    "Each shape has a single solid fill, no outline and no texture.",
    "The shapes are spread out with clear empty space between them.",
    "Nothing in the scene is blurred, rotated or partly hidden.",
)
# ... and member-part templates (chosen per image), the distinguishing details first.
EXTRA_SENTENCES = (
    "In the {corner} corner there is also a small {color} {shape}.",
    "A small {color} {shape} was added in the {corner} corner.",
    "Tucked into the {corner} corner is a small {color} {shape}.",
)
WORD_SENTENCES = (
    'The word "{word}" is written in small {ink} letters in the {corner} corner.',
    'In the {corner} corner, small {ink} text reads "{word}".',
)
NO_WORD_SENTENCES = ("No text or letters appear anywhere in the image.", "There is no writing in the picture.")
TOTAL_SENTENCES = ("In total the image contains {total} shapes.", "So the picture holds {total} shapes altogether.")
CLOSINGS = ("Every object is fully visible inside the frame.", "All objects lie fully inside the frame.")


@dataclass(frozen=True)
class _Shape:
    color: str
    shape: str
    size: str  # "large" | "medium" | "small"
    cell: tuple[int, int]  # (row, col) of the 3x3 grid
    box: tuple[int, int, int, int]  # planned square [x1, y1, x2, y2]; the drawn extent is recorded after drawing

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class _Member:
    """What one image of a group adds to the shared content."""

    extra: _Shape
    word: str | None
    word_cell: tuple[int, int] | None
    ink: int  # index into INKS
    templates: tuple[int, int, int, int]  # extra, word, total, closing sentence choices


@dataclass
class _Group:
    width: int
    height: int
    background: int  # index into BACKGROUNDS
    common: list[_Shape]  # in order of salience: large first, then reading order
    shared_caption: str
    short_caption: str
    short_paraphrase: str
    members: list[_Member] = field(default_factory=list)


# ---------------------------------------------------------------- scene planning


def _cell_box(width: int, height: int, cell: tuple[int, int]) -> tuple[int, int, int, int]:
    row, col = cell
    return col * width // 3, row * height // 3, (col + 1) * width // 3, (row + 1) * height // 3


def _place(rng: random.Random, width: int, height: int, cell: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """A ``side`` px square inside ``cell``, near its centre (jittered by at most a quarter of the slack)."""
    x1, y1, x2, y2 = _cell_box(width, height, cell)
    slack_x, slack_y = x2 - x1 - side, y2 - y1 - side
    x = x1 + slack_x // 2 + rng.randint(-(slack_x // 4), slack_x // 4)
    y = y1 + slack_y // 2 + rng.randint(-(slack_y // 4), slack_y // 4)
    return x, y, x + side, y + side


def _in_corner(width: int, height: int, cell: tuple[int, int], size: tuple[int, int], margin: int) -> tuple[int, int]:
    """Top-left origin of a ``size`` item pushed into the outer corner of corner ``cell``."""
    x = margin if cell[1] == 0 else width - margin - size[0]
    y = margin if cell[0] == 0 else height - margin - size[1]
    return x, y


def _kinds(shapes: list[str]) -> str:
    counts = Counter(shapes)
    parts = [f"{NUMBER_WORDS[n]} {shape if n == 1 else shape + 's'}" for shape, n in sorted(counts.items())]
    return _join(parts)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(a: _Shape, b: _Shape) -> str:
    vertical = "above" if a.cell[0] < b.cell[0] else "below" if a.cell[0] > b.cell[0] else ""
    horizontal = "to the left of" if a.cell[1] < b.cell[1] else "to the right of" if a.cell[1] > b.cell[1] else ""
    return " and ".join(part for part in (vertical, horizontal) if part)


def _plan_group(rng: random.Random, image_size: int, group_size: int) -> _Group:
    width, height = _canvas_size(rng, image_size)
    cell_side = min(width, height) // 3
    background = rng.randrange(len(BACKGROUNDS))
    count = rng.randint(2, 3)
    colors = rng.sample(list(COLORS), count)
    cells = rng.sample(INNER_CELLS, count)
    common = []
    for color, cell in zip(colors, cells):
        size = rng.choice(("large", "medium"))
        side = round(cell_side * (rng.uniform(0.78, 0.9) if size == "large" else rng.uniform(0.5, 0.62)))
        common.append(_Shape(color, rng.choice(SHAPES), size, cell, _place(rng, width, height, cell, side)))
    common.sort(key=lambda s: (s.size != "large", s.cell))
    group = _Group(width, height, background, common, *_shared_captions(rng, width, height, background, common))
    seen: set[tuple] = set()
    while len(group.members) < group_size:
        member = _plan_member(rng, width, height, cell_side)
        key = (member.extra.name, member.extra.cell, member.word, member.word_cell)
        if key not in seen:
            seen.add(key)
            group.members.append(member)
    return group


def _plan_member(rng: random.Random, width: int, height: int, cell_side: int) -> _Member:
    extra_cell, word_cell = rng.sample(CORNERS, 2)
    side = max(8, round(cell_side * rng.uniform(0.28, 0.36)))
    margin = max(2, cell_side // 12)
    x, y = _in_corner(width, height, extra_cell, (side, side), margin)
    extra = _Shape(rng.choice(list(COLORS)), rng.choice(SHAPES), "small", extra_cell, (x, y, x + side, y + side))
    word = rng.choice(CORNER_WORDS) if rng.random() < 0.75 else None
    templates = (
        rng.randrange(len(EXTRA_SENTENCES)),
        rng.randrange(len(WORD_SENTENCES if word else NO_WORD_SENTENCES)),
        rng.randrange(len(TOTAL_SENTENCES)),
        rng.randrange(len(CLOSINGS)),
    )
    return _Member(extra, word, word_cell if word else None, rng.randrange(len(INKS)), templates)


def _shared_captions(
    rng: random.Random, width: int, height: int, background: int, common: list[_Shape]
) -> tuple[str, str, str]:
    """(shared first part of the long caption, short caption, paraphrased short caption)."""
    canvas = "square" if width == height else "wide" if width > height else "tall"
    colors = _join([s.color for s in common])
    sentences = [
        rng.choice(INTROS).format(canvas=canvas, w=width, h=height, colors=colors),
        rng.choice(BACKGROUND_SENTENCES).format(bg=BACKGROUND_NAMES[background]),
        rng.choice(COUNT_SENTENCES).format(count=NUMBER_WORDS[len(common)], kinds=_kinds([s.shape for s in common])),
    ]
    for index, obj in enumerate(common):
        where = POSITIONS[obj.cell][1]
        template = rng.choice(OBJECT_SENTENCES)
        sentences.append(
            template.format(
                ordinal=ORDINALS[index],
                Ordinal=ORDINALS[index].capitalize(),
                where=where,
                Where=where.capitalize(),
                size=obj.size,
                color=obj.color,
                shape=obj.shape,
                px=obj.box[2] - obj.box[0],
            )
        )
    for a, b in itertools.pairwise(common):
        sentences.append(rng.choice(RELATION_SENTENCES).format(a=a.name, b=b.name, relation=_relation(a, b)))
    for padding in PADDING:  # deterministic padding up to MIN_SHARED_WORDS words
        if len(" ".join(sentences).split()) >= MIN_SHARED_WORDS:
            break
        sentences.append(padding.format(colors=colors))
    first, second = common[0], common[1]
    short = f"a {first.size} {first.name} {POSITIONS[first.cell][1]} and a {second.name}"
    paraphrase = f"a {second.name} with a {SIZE_PARAPHRASE[first.size]} {first.name} {POSITIONS[first.cell][2]}"
    return " ".join(sentences), short, paraphrase


def _member_caption(group: _Group, member: _Member) -> str:
    extra_template, word_template, total_template, closing = member.templates
    corner = POSITIONS[member.extra.cell][0]
    if member.word:
        word = WORD_SENTENCES[word_template].format(
            word=member.word, ink=INK_NAMES[member.ink], corner=POSITIONS[member.word_cell][0]
        )
    else:
        word = NO_WORD_SENTENCES[word_template]
    sentences = [
        group.shared_caption,
        EXTRA_SENTENCES[extra_template].format(corner=corner, color=member.extra.color, shape=member.extra.shape),
        word,
        TOTAL_SENTENCES[total_template].format(total=NUMBER_WORDS[len(group.common) + 1]),
        CLOSINGS[closing],
    ]
    return " ".join(sentences)


# ---------------------------------------------------------------- drawing


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast; flat images compress well anyway
    return buffer.getvalue()


def _shape_meta(shape: _Shape, drawn: list[int], common: bool) -> dict[str, Any]:
    return {
        "color": shape.color,
        "shape": shape.shape,
        "size": shape.size,
        "position": POSITIONS[shape.cell][0],
        "box": drawn,
        "common": common,
    }


def _draw_member(group: _Group, member: _Member) -> tuple[Image.Image, dict[str, Any]]:
    image = Image.new("RGB", (group.width, group.height), BACKGROUNDS[group.background])
    objects = [_shape_meta(s, _draw_shape(image, s.shape, COLORS[s.color], list(s.box)), True) for s in group.common]
    extra = member.extra
    objects.append(_shape_meta(extra, _draw_shape(image, extra.shape, COLORS[extra.color], list(extra.box)), False))
    word = None
    if member.word:
        x1, y1, x2, y2 = _cell_box(group.width, group.height, member.word_cell)
        margin = max(2, min(group.width, group.height) // 36)
        font_size = max(8, round(min(x2 - x1, y2 - y1) * 0.32))
        while font_size > 7 and _font(font_size).getbbox(member.word)[2] > x2 - x1 - 2 * margin:
            font_size -= 1
        left, top, right, bottom = _font(font_size).getbbox(member.word)
        origin = _in_corner(group.width, group.height, member.word_cell, (right - left, bottom - top), margin)
        box = _draw_text(image, member.word, origin, font_size, INKS[member.ink])
        word = {"text": member.word, "position": POSITIONS[member.word_cell][0], "box": box}
    meta = {"background": BACKGROUND_NAMES[group.background], "objects": objects, "word": word}
    return image, meta


def _group_job(job: tuple[Path, int, str, int, int, int, int]) -> list[Record]:
    """Draw and write the images of one group; return their caption records (``image`` relative to ``folder``)."""
    folder, seed, split, group_index, size, image_size, group_size = job
    group = _plan_group(random.Random(f"{seed}:pretrain:{split}:{group_index}"), image_size, group_size)
    records = []
    for member_index, member in enumerate(group.members[:size]):
        image, meta = _draw_member(group, member)
        relative = f"images/{split}-g{group_index:05d}-{member_index}.png"
        (folder / relative).write_bytes(_png(image))
        records.append(
            {
                "id": f"{split}-g{group_index:05d}-{member_index}",
                "image": relative,
                "task": "caption",
                "caption": _member_caption(group, member),
                "width": image.width,
                "height": image.height,
                "meta": {
                    "short_caption": group.short_caption,
                    "short_paraphrase": group.short_paraphrase,
                    "group": f"{split}-g{group_index:05d}",
                    "label": group.common[0].name,
                    **meta,
                },
            }
        )
    return records


def _classification_job(job: tuple[Path, int, int, int]) -> dict[str, Any]:
    """One image: a dominant object of class ``index % len(CLASSNAMES)``, 0-2 small distractors of other classes."""
    folder, seed, index, image_size = job
    rng = random.Random(f"{seed}:pretrain:classification:{index}")
    label = CLASSNAMES[index % len(CLASSNAMES)]
    width, height = _canvas_size(rng, image_size)
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    side = min(width, height)
    # Dominant object: 50-62% of the short side, near the centre; distractors (10-13%) stay in the corners, clear of it
    big = round(side * rng.uniform(0.5, 0.62))
    jitter = round(side * 0.04)
    x = (width - big) // 2 + rng.randint(-jitter, jitter)
    y = (height - big) // 2 + rng.randint(-jitter, jitter)
    color, shape = label.split(" ")
    _draw_shape(image, shape, COLORS[color], [x, y, x + big, y + big])
    for corner in rng.sample(CORNERS, rng.randint(0, 2)):
        other = rng.choice([name for name in CLASSNAMES if name != label]).split(" ")
        small = round(side * rng.uniform(0.1, 0.13))
        cx, cy = _in_corner(width, height, corner, (small, small), max(1, side // 100))
        _draw_shape(image, other[1], COLORS[other[0]], [cx, cy, cx + small, cy + small])
    relative = f"images/{index:06d}.png"
    (folder / relative).write_bytes(_png(image))
    return {"image": relative, "label": label}


# ---------------------------------------------------------------- writing


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _group_jobs(folder: Path, seed: int, split: str, count: int, image_size: int, group_size: int) -> list[tuple]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    sizes = [min(group_size, count - start) for start in range(0, count, group_size)]
    return [(folder, seed, split, group, size, image_size, group_size) for group, size in enumerate(sizes)]


def shared_word_prefix(captions: list[str]) -> int:
    """How many leading words all ``captions`` share: the word index where the first distinguishing detail starts."""
    words = [caption.split() for caption in captions]
    length = 0
    while all(len(w) > length for w in words) and len({w[length] for w in words}) == 1:
        length += 1
    return length


def _distinct_positions(records: list[Record]) -> list[int]:
    groups: dict[str, list[str]] = {}
    for record in records:
        groups.setdefault(record["meta"]["group"], []).append(record["caption"])
    return [shared_word_prefix(captions) for captions in groups.values() if len(captions) > 1]


def make_pretrain_data(
    out: Path,
    seed: int = 0,
    num_train: int = 2000,
    num_eval: int = 200,
    image_size: int = 112,
    workers: int = 1,
    group_size: int = GROUP_SIZE,
) -> dict[str, Any]:
    """Write the pretraining and zero-shot data under ``out`` (see the module docstring); return the manifest, also
    written to ``out/pretrain_manifest.json``."""
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train ({num_train}) and num_eval ({num_eval}) must be >= 0")
    if group_size < 1:
        raise ValueError(f"group_size {group_size}: choose at least 1 (8 by default)")
    if image_size < 112:
        raise ValueError(
            f"image_size {image_size}: choose at least 112 pixels (canvases then hold 3x3 cells of 28 px)"
        )
    out = Path(out)
    stage2, zeroshot = out / "stage2", out / "zeroshot"
    retrieval, retrieval_long, classification = (zeroshot / name for name in ZEROSHOT_SPLITS)
    for folder in (retrieval, retrieval_long, classification):
        (folder / "images").mkdir(parents=True, exist_ok=True)
    group_jobs = {
        "train": _group_jobs(stage2, seed, "train", num_train, image_size, group_size),
        "eval": _group_jobs(stage2, seed, "eval", num_eval, image_size, group_size),
        "long": _group_jobs(retrieval_long, seed, "long", num_eval, image_size, group_size),
        # Short-caption retrieval: one image per scene (groups of one), so images differ in their salient content.
        "short": [(retrieval, seed, "short", index, 1, image_size, 1) for index in range(num_eval)],
    }
    class_jobs = [(classification, seed, index, image_size) for index in range(num_eval)]
    with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:

        def run(function, jobs):  # map keeps the job order, so the output does not depend on the number of workers
            if pool is None:
                return [function(job) for job in jobs]
            return pool.map(function, jobs, chunksize=max(1, len(jobs) // (4 * workers)))

        records = {split: [r for rs in run(_group_job, jobs) for r in rs] for split, jobs in group_jobs.items()}
        class_rows = run(_classification_job, class_jobs)
    # Training records in a seeded random order (groups generate together): a stream reads its file in order, and a
    # contrastive batch should hold images of many groups, as in a shuffled web-scale shard.
    random.Random(f"{seed}:pretrain:order").shuffle(records["train"])
    _write_jsonl(stage2 / "train.jsonl", records["train"])
    _write_jsonl(stage2 / "eval.jsonl", records["eval"])
    # Stage I reads only the images: the Stage II train records, with paths relative to OUT/stage1.
    _write_jsonl(out / "stage1" / "train.jsonl", [{**r, "image": f"../stage2/{r['image']}"} for r in records["train"]])
    _write_jsonl(
        retrieval / "manifest.jsonl",
        [
            {"image": r["image"], "captions": [r["meta"]["short_caption"], r["meta"]["short_paraphrase"]]}
            for r in records["short"]
        ],
    )
    long_rows = [{"image": r["image"], "captions": [r["caption"]]} for r in records["long"]]
    _write_jsonl(retrieval_long / "manifest.jsonl", long_rows)
    _write_jsonl(classification / "manifest.jsonl", class_rows)
    (classification / "classnames.json").write_text(json.dumps(list(CLASSNAMES), indent=2) + "\n")
    (classification / "templates.json").write_text(json.dumps(list(TEMPLATES), indent=2) + "\n")
    positions = _distinct_positions(records["train"] + records["eval"] + records["long"])
    manifest = {
        "seed": seed,
        "group_size": group_size,
        "image_size": image_size,
        "counts": {
            "stage1/train.jsonl": len(records["train"]),
            "stage2/train.jsonl": len(records["train"]),
            "stage2/eval.jsonl": len(records["eval"]),
            "zeroshot/retrieval/manifest.jsonl": len(records["short"]),
            "zeroshot/retrieval_long/manifest.jsonl": len(records["long"]),
            "zeroshot/classification/manifest.jsonl": len(class_rows),
            "zeroshot/classification/classnames.json": len(CLASSNAMES),
        },
        # Word index (0-based) of the first word that differs between the long captions of a group, over all groups.
        "distinct_word_position": {
            "median": statistics.median(positions) if positions else None,
            "min": min(positions, default=None),
        },
    }
    (out / "pretrain_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["CLASSNAMES", "GROUP_SIZE", "TEMPLATES", "make_pretrain_data", "shared_word_prefix"]
