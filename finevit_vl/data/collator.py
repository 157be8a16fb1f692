"""Records -> model inputs: chat-template tokenization with assistant-only labels, then collation into batches.

The path of one sample::

    (record, location) --load_record_images--> images (+ width/height)   BadRecordError on any problem
        --record_to_messages(box_format)-->   chat messages               boxes become text here, at collate time
        --SampleEncoder.encode_messages-->    EncodedSample               labels only on assistant tokens

Labels come from the chat template's ``{% generation %}`` blocks (transformers' assistant-mask mechanism): the text is
rendered once, the character spans of the assistant turns are mapped onto the tokens, and only those tokens (answer +
end-of-turn token) are supervised. Image placeholders are expanded after tokenization, at the id level, into as many
image tokens as `FineViTVLProcessor.num_image_tokens` gives for the grid its image processor emitted (one rule for
every vision tower). A sample longer than ``max_length``
after that expansion is rejected (never truncated: a cut image would not match its features).

`collate_rows` turns rows of samples into one micro-batch. A row holds one sample (plain batching) or several
(packing, see `finevit_vl.data.packing`); positions restart at every sample, and `segment_ids` say which tokens may
attend to each other. Image inputs (whatever the tower's processor emits: `pixel_values`, `image_grid_thw`, NaFlex's
`pixel_attention_mask` / `spatial_shapes`) are concatenated along their first axis. A micro-batch without any image
gets a tiny zero-weighted dummy image, so every rank of a sharded engine (ZeRO-3 / FSDP) runs the vision tower on
every step.
"""

import math
import os
import random
import re
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

from .images import load_record_images
from .render import NoTurnsInDirection, record_to_messages
from .schema import BadRecordError, Record, record_location


IGNORE_INDEX = -100
# What a vision tower's processor may emit; all concatenate along their first axis.
IMAGE_INPUT_NAMES = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes")


class RecordOutsideDirection(BadRecordError):
    """A region record with no turn in `region_directions` (e.g. caption -> box only, and every caption names several
    boxes): left out of this phase, not bad data. The training stream passes over it uncounted; elsewhere it is
    skipped like a bad record."""


class SampleTooLongError(ValueError):
    """A sample over ``max_length`` after image expansion (its own class: a trainer remembers and skips such records)."""


@dataclass
class EncodedSample:
    """One tokenized sample.

    Attributes:
        input_ids (`torch.LongTensor` of shape `(seq_len,)`): token ids, image placeholders already expanded.
        labels (`torch.LongTensor` of shape `(seq_len,)`): `input_ids` on assistant tokens, -100 elsewhere.
        image_inputs (`dict[str, torch.Tensor]`, *optional*): the processor's image outputs (`pixel_values`,
            `image_grid_thw`, and what else the tower takes), each with images (or their patches) on the first axis.
        location (`str`): where the record came from, for error messages.
        regions (`dict[str, torch.Tensor]`, *optional*): GranViT self-distillation (`RegionCrops`): `boxes` `(R, 4)`
            pixels of the first image, `image_size` `(2,)` its (width, height), and the crops' image inputs
            (`crop_pixel_values`, `crop_image_grid_thw`).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    image_inputs: dict[str, torch.Tensor] | None = None
    location: str = ""
    regions: dict[str, torch.Tensor] | None = None  # region self-distillation: see `RegionCrops`

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return None if self.image_inputs is None else self.image_inputs["pixel_values"]

    @property
    def image_grid_thw(self) -> torch.Tensor | None:
        return None if self.image_inputs is None else self.image_inputs["image_grid_thw"]

    @property
    def num_images(self) -> int:
        return 0 if self.image_inputs is None else int(self.image_grid_thw.shape[0])

    @property
    def num_patches(self) -> int:
        """Patches the tower sees (for throughput; padding of NaFlex batches not counted)."""
        return 0 if self.image_inputs is None else int(self.image_grid_thw.prod(-1).sum())

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def _render(template: str, messages: list[dict], special_tokens: dict, add_generation_prompt: bool = False) -> str:
    return render_jinja_template(conversations=[messages], chat_template=template,
                                 add_generation_prompt=add_generation_prompt, **special_tokens)[0][0]


def assistant_spans(template: str, messages: list[dict], special_tokens: dict) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (answer + end of turn).

    A template with `{% generation %}` blocks says where they are. Any other template (an LLM's own) is rendered turn
    by turn: an assistant turn is what the conversation up to it adds after the generation prompt. That needs a
    template that renders conversations incrementally (each prefix of turns renders a prefix of the text), which
    ordinary chat templates do; one that rewrites earlier turns is refused with a clear error.
    """
    if GENERATION_BLOCK.search(template):
        rendered, indices = render_jinja_template(conversations=[messages], chat_template=template,
                                                  return_assistant_tokens_mask=True, **special_tokens)
        return rendered[0], indices[0]
    text = _render(template, messages, special_tokens)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(template, messages[:index], special_tokens, add_generation_prompt=True)
        with_turn = _render(template, messages[: index + 1], special_tokens)
        if not (with_turn.startswith(prompt) and text.startswith(with_turn)):
            raise ValueError(
                "the chat template does not render this conversation turn by turn (an earlier turn renders "
                "differently once later turns follow), so assistant tokens cannot be located; build the model with "
                "--chat-format chatml (or llama3), or add {% generation %} blocks to the template"
            )
        spans.append((len(prompt), len(with_turn.rstrip())))  # not the whitespace between turns
    return text, spans


def record_boxes(record: Record) -> list[list[float]]:
    """Every box a record names (regions, OCR items with a box, grounding items), in pixels of its first image."""
    items = [*record.get("regions", []), *record.get("ocr", []), *record.get("grounding", [])]
    return [list(map(float, item["box"])) for item in items if "box" in item]


def crop_regions(image: Image.Image, boxes: list[list[float]]) -> list[Image.Image]:
    """The box crops of an image (pixel boxes, clamped to the image, at least 1 px).

    A fractional box is widened to the whole pixels it touches (floor of x1/y1, ceil of x2/y2), so the crop holds
    everything the student's box covers.
    """
    width, height = image.size
    crops = []
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a box is [x1, y1, x2, y2], got {box}")
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box {box} has x2 < x1 or y2 < y1")
        left = min(max(math.floor(x1), 0), width - 1)
        top = min(max(math.floor(y1), 0), height - 1)
        right = max(min(math.ceil(x2), width), left + 1)
        bottom = max(min(math.ceil(y2), height), top + 1)
        crops.append(image.crop((left, top, right, bottom)))
    return crops


class RegionCrops:
    """The teacher's view for GranViT's region self-distillation: up to `max_regions` box crops of a record's first
    image, each resized by `crop_processor` (a copy of the tower's image processor with its own pixel budget)."""

    def __init__(self, crop_processor, max_regions: int = 4) -> None:
        self.crop_processor = crop_processor
        self.max_regions = max_regions

    def __call__(self, record: Record, image: Image.Image, rng: random.Random | None) -> dict[str, torch.Tensor] | None:
        boxes = record_boxes(record)
        if not boxes:
            return None
        if len(boxes) > self.max_regions:
            boxes = rng.sample(boxes, self.max_regions) if rng is not None else boxes[: self.max_regions]
        clamped = [(max(0.0, x1), max(0.0, y1), min(float(image.width), x2), min(float(image.height), y2))
                   for x1, y1, x2, y2 in boxes]
        inputs = self.crop_processor(crop_regions(image, clamped), return_tensors="pt")
        return {"boxes": torch.tensor(clamped, dtype=torch.float32), "image_size": torch.tensor(image.size),
                "crop_pixel_values": inputs["pixel_values"], "crop_image_grid_thw": inputs["image_grid_thw"]}


class SampleEncoder:
    """Encode chat messages (or whole records) into `EncodedSample`s with the processor's tokenizer and chat template.

    Args:
        processor (`FineViTVLProcessor`): its chat template must wrap assistant turns in `{% generation %}`.
        max_length (`int`): longest accepted sequence after image expansion; longer samples raise `BadRecordError`.
        box_format (`str`): box text convention (`"int1000"` or `"norm1"`), see `finevit_vl.boxes`.
        max_regions (`int`, *optional*): cap on regions / OCR items rendered per record.
        shuffle_turns (`bool`): shuffle the Q/A turns of a record, seeded by `seed`, the pass and the record id.
        seed (`int`): seed of that shuffle.
    """

    def __init__(
        self,
        processor,
        max_length: int,
        box_format: str = "int1000",
        max_regions: int | None = None,
        shuffle_turns: bool = True,
        seed: int = 0,
        region_directions: str = "both",
        region_crops: RegionCrops | None = None,
    ) -> None:
        if not processor.chat_template:
            raise ValueError("The processor has no chat template; build the model with `finevit-vl build` (it takes "
                             "the LLM's own template, or ChatML / Llama 3) or set processor.chat_template")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.dummy_image_inputs = dummy_image_inputs(processor)
        self.image_token_id = processor.image_token_id
        self.max_length = max_length
        self.box_format = box_format
        self.max_regions = max_regions
        self.shuffle_turns = shuffle_turns
        self.seed = seed
        self.region_directions = region_directions
        self.region_crops = region_crops

    def encode_messages(self, messages: list[dict], images: list[Image.Image] | None = None) -> EncodedSample:
        """Tokenize one conversation; `images` pair in order with its `{"type": "image"}` items.

        Raises:
            `ValueError` if the template renders no assistant tokens or the image count does not match;
            `SampleTooLongError` (a `ValueError`) if the expanded sequence exceeds `max_length`.
        """
        images = list(images or [])
        text, spans = assistant_spans(self.processor.chat_template, messages, self.tokenizer.special_tokens_map)
        # The template writes every special token itself (BOS included), as in `processor.apply_chat_template`.
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        supervised = [any(start < end_char and end > start_char for start_char, end_char in spans) for start, end in offsets]
        if not any(supervised):
            raise ValueError(
                "no assistant tokens to learn from: the conversation has no assistant turn, or the chat template's "
                "{% generation %} blocks do not line up with the tokenizer (check the template of this LLM)"
            )

        placeholders = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(placeholders) != len(images):
            raise ValueError(f"{len(placeholders)} image placeholder(s) in the rendered text but {len(images)} image(s)")
        image_inputs = None
        counts: list[int] = []
        if images:
            image_inputs = self.processor.process_images(images)
            counts = self.processor.num_image_tokens(image_inputs["image_grid_thw"])
        length = len(ids) + sum(counts) - len(counts)
        if length > self.max_length:
            raise SampleTooLongError(
                f"sample is {length} tokens after image expansion ({sum(counts)} image tokens), over max_length "
                f"{self.max_length}; skipped, not truncated (raise data.max_length or lower data.max_pixels)"
            )

        # Expand each placeholder into its image tokens (never supervised).
        input_ids: list[int] = []
        labels: list[int] = []
        image_counts = iter(counts)
        for token, is_supervised in zip(ids, supervised):
            repeat = next(image_counts) if token == self.image_token_id else 1
            input_ids.extend([token] * repeat)
            labels.extend([token if is_supervised and token != self.image_token_id else IGNORE_INDEX] * repeat)
        # The first token never has a predecessor: keep it unsupervised so packed samples never learn across a boundary.
        labels[0] = IGNORE_INDEX
        return EncodedSample(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            image_inputs=image_inputs,
        )

    def encode_record(self, record: Record, location: str, epoch: int = 0) -> EncodedSample:
        """Open, validate, render and tokenize one record; every problem raises `BadRecordError` naming `location`."""
        images = load_record_images(record, location, getattr(self.image_processor, "max_image_pixels", None))
        where = record_location(record, location)
        # Seeded by the record's id (else its file name and line), never by the absolute path: the same data in
        # another folder must give the same samples.
        key = record.get("id") or os.path.basename(location)
        rng = random.Random(f"{self.seed}:{epoch}:{key}") if self.shuffle_turns else None
        try:
            messages = record_to_messages(
                record, record.get("width", 1), record.get("height", 1), self.box_format, rng, self.max_regions,
                directions=self.region_directions,
            )
            sample = self.encode_messages(messages, images)
            if self.region_crops is not None and images:
                sample.regions = self.region_crops(record, images[0], rng)
        except NoTurnsInDirection as err:
            raise RecordOutsideDirection(where, str(err), "cannot encode") from None
        except ValueError as err:  # too long, image processor refusal (aspect ratio), template mismatch, ...
            kind = "too long" if isinstance(err, SampleTooLongError) else "cannot encode"
            raise BadRecordError(where, str(err), kind) from None
        sample.location = where
        return sample


def dummy_image_inputs(processor) -> dict[str, torch.Tensor]:
    """The processor's inputs for one small black image (the smallest it makes of a merge group's size in pixels)."""
    side = (processor.patch_size or 14) * processor.merge_size
    return processor.process_images([Image.new("RGB", (side, side))])


def collate_rows(
    rows: list[list[EncodedSample]], pad_token_id: int, dummy_image: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rows of samples -> one micro-batch, right-padded to the longest row.

    Returns a dict with `input_ids`, `labels` and `position_ids` `(num_rows, row_len)`; `segment_ids`
    `(num_rows, row_len)` (index of the sample within its row, -1 on padding); `sample_ids` `(num_rows, row_len)`
    (index of the sample in the micro-batch, -1 on padding); the image inputs (`pixel_values`, `image_grid_thw`,
    ...); and `image_token_weight` (a zero scalar) when the batch has no image and carries `dummy_image` (see
    `dummy_image_inputs`).
    """
    if not rows or not all(rows):
        raise ValueError("collate_rows needs at least one non-empty row")
    row_len = max(sum(sample.length for sample in row) for row in rows)
    shape = (len(rows), row_len)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    sample_ids = torch.full(shape, -1, dtype=torch.long)
    image_inputs: list[dict[str, torch.Tensor]] = []
    regions: list[tuple[int, dict[str, torch.Tensor]]] = []  # (index of the sample's first image in the batch, regions)
    sample_index = num_images = 0
    for row_index, row in enumerate(rows):
        start = 0
        for segment, sample in enumerate(row):
            end = start + sample.length
            input_ids[row_index, start:end] = sample.input_ids
            labels[row_index, start:end] = sample.labels
            position_ids[row_index, start:end] = torch.arange(sample.length)
            segment_ids[row_index, start:end] = segment
            sample_ids[row_index, start:end] = sample_index
            if sample.regions is not None:
                regions.append((num_images, sample.regions))
            if sample.num_images:
                image_inputs.append(sample.image_inputs)
                num_images += sample.num_images
            start, sample_index = end, sample_index + 1
        # Padding continues the positions from 0 like one more (unsupervised) sequence.
        position_ids[row_index, start:] = torch.arange(row_len - start)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "sample_ids": sample_ids,
    }
    if regions:
        batch.update(
            region_boxes=torch.cat([r["boxes"] for _, r in regions]),
            region_box_image=torch.cat([torch.full((len(r["boxes"]),), first) for first, r in regions]),
            # The original (width, height) of every image of the batch ((1, 1) where no box refers to it).
            region_image_sizes=torch.ones(num_images, 2, dtype=torch.long).index_put_((torch.tensor([first for first, _ in regions]),),
                                                                       torch.stack([r["image_size"] for _, r in regions])),
            region_crop_pixel_values=torch.cat([r["crop_pixel_values"] for _, r in regions]),
            region_crop_image_grid_thw=torch.cat([r["crop_image_grid_thw"] for _, r in regions]),
        )
    if image_inputs:
        batch.update({key: torch.cat([inputs[key] for inputs in image_inputs]) for key in image_inputs[0]})
    else:
        batch.update(dummy_image)
        batch["image_token_weight"] = torch.zeros(())
    return batch


def filler_batch(pad_token_id: int, dummy_image: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unsupervised two-token row with the dummy image: lets a rank with less data run the same number of
    forwards as the others (ZeRO-3 / FSDP gather parameters in every forward) without changing the loss."""
    pads = torch.tensor([pad_token_id, pad_token_id])
    return collate_rows([[EncodedSample(pads, torch.full_like(pads, IGNORE_INDEX))]], pad_token_id, dummy_image)


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_INPUT_NAMES",
    "EncodedSample",
    "RegionCrops",
    "SampleEncoder",
    "SampleTooLongError",
    "assistant_spans",
    "collate_rows",
    "crop_regions",
    "dummy_image_inputs",
    "filler_batch",
    "record_boxes",
]
