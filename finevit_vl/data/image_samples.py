"""Records -> encoder inputs for the encoder's pretraining stages (I: masked image modeling, II: contrastive).

The path of one sample mirrors Stage III's (`finevit_vl.data.collator`), without a chat template::

    (record, location) --load_record_images--> first image        BadRecordError on any problem
        --FineViT image processor-->          packed patches + grid (native resolution, the stage's pixel budget)
        Stage I:  + the visible-patch mask (exactly `mask_ratio` of each image hidden, seeded by record and pass)
                  + the teacher's view of the same image (resized to its patch size, its own normalisation)
        Stage II: + the caption, tokenized and cut to the stage's text length (the cut is counted, never silent)

`collate_image_samples` concatenates samples into one micro-batch: the images are one packed sequence (attention
never crosses images), so an encoder micro-batch is packed by construction.
"""

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .images import load_record_images
from .schema import BadRecordError, Record, record_location


@dataclass
class ImageSample:
    """One image for the encoder, with what its stage needs.

    Attributes:
        image_inputs: the image processor's outputs for the one image (`pixel_values`, `image_grid_thw`).
        visible_mask (`torch.BoolTensor` of shape `(num_patches,)`, *optional*): Stage I: patches the encoder sees.
        teacher_pixel_values (`torch.Tensor` of shape `(3, H, W)`, *optional*): Stage I, feature target: the image as
            the teacher takes it (H, W multiples of its patch size, covering the student's grid).
        input_ids (`torch.LongTensor` of shape `(text_len,)`, *optional*): Stage II: the caption, already cut.
        caption_truncated (`bool`): the caption was longer than the text length and was cut.
    """

    image_inputs: dict[str, torch.Tensor]
    visible_mask: torch.Tensor | None = None
    teacher_pixel_values: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    caption_truncated: bool = False
    location: str = ""

    @property
    def num_images(self) -> int:
        return int(self.image_inputs["image_grid_thw"].shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.image_inputs["image_grid_thw"].prod(-1).sum())

    @property
    def length(self) -> int:
        """Text tokens (Stage II), for throughput."""
        return 0 if self.input_ids is None else int(self.input_ids.shape[0])


def random_visible_mask(num_patches: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly `round(mask_ratio * num_patches)` patches hidden (at least one kept), uniformly at random."""
    hidden = min(num_patches - 1, round(mask_ratio * num_patches))
    mask = torch.ones(num_patches, dtype=torch.bool)
    mask[torch.randperm(num_patches, generator=generator)[:hidden]] = False
    return mask


@dataclass
class TeacherView:
    """How the Stage I teacher takes an image: its patch size and normalisation (from its image processor)."""

    patch_size: int
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __call__(self, image: Image.Image, grid_hw: tuple[int, int], student_patch: int) -> torch.Tensor:
        """The image at the student's resized extent, rounded to whole teacher patches, normalised: `(3, H, W)`."""
        height, width = (max(1, round(side * student_patch / self.patch_size)) * self.patch_size for side in grid_hw)
        pixels = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class _ImageRecordEncoder:
    """What Stage I and II share: open the record's first image and run the image processor."""

    def __init__(self, image_processor, seed: int = 0) -> None:
        self.image_processor = image_processor
        self.seed = seed
        side = image_processor.patch_size * image_processor.merge_size
        self.dummy_image_inputs = dict(image_processor([Image.new("RGB", (side, side))], return_tensors="pt"))

    def _image(self, record: Record, location: str) -> tuple[Image.Image, dict[str, torch.Tensor], str]:
        images = load_record_images(record, location, getattr(self.image_processor, "max_image_pixels", None))
        where = record_location(record, location)
        if not images:
            raise BadRecordError(where, "the encoder's pretraining stages need an image in every record", "schema")
        try:
            inputs = dict(self.image_processor([images[0]], return_tensors="pt"))
        except ValueError as err:  # e.g. an aspect ratio the processor refuses
            raise BadRecordError(where, str(err), "cannot encode") from None
        return images[0], inputs, where

    def _rng(self, record: Record, location: str, epoch: int) -> torch.Generator:
        # Seeded by the record's id (else its file name and line) and the pass, never by a path or the rank split.
        key = record.get("id") or os.path.basename(location)
        return torch.Generator().manual_seed(random.Random(f"{self.seed}:{epoch}:{key}").getrandbits(63))


class MaskedImageEncoder(_ImageRecordEncoder):
    """Stage I: any record with an image -> `ImageSample` with its visible-patch mask (and the teacher's view)."""

    def __init__(self, image_processor, mask_ratio: float, seed: int = 0, teacher_view: TeacherView | None = None) -> None:
        super().__init__(image_processor, seed)
        self.mask_ratio = mask_ratio
        self.teacher_view = teacher_view

    def encode_record(self, record: Record, location: str, epoch: int = 0) -> ImageSample:
        image, inputs, where = self._image(record, location)
        _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
        mask = random_visible_mask(grid_h * grid_w, self.mask_ratio, self._rng(record, location, epoch))
        teacher = None
        if self.teacher_view is not None:
            teacher = self.teacher_view(image, (grid_h, grid_w), self.image_processor.patch_size)
        return ImageSample(inputs, visible_mask=mask, teacher_pixel_values=teacher, location=where)


class CaptionEncoder(_ImageRecordEncoder):
    """Stage II: a `caption` record -> `ImageSample` with the caption's tokens, cut to `text_max_length`."""

    def __init__(self, image_processor, tokenizer, text_max_length: int, seed: int = 0) -> None:
        super().__init__(image_processor, seed)
        self.tokenizer = tokenizer
        self.text_max_length = text_max_length

    def encode_record(self, record: Record, location: str, epoch: int = 0) -> ImageSample:
        if not isinstance(record.get("caption"), str) or not record["caption"].strip():
            raise BadRecordError(record_location(record, location),
                                 "Stage II needs a non-empty 'caption' (a record of task 'caption')", "schema")
        _, inputs, where = self._image(record, location)
        ids = self.tokenizer(record["caption"], add_special_tokens=True)["input_ids"]
        truncated = len(ids) > self.text_max_length
        if truncated and self.tokenizer.eos_token_id is not None and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[: self.text_max_length - 1] + ids[-1:]  # keep the end-of-text token a tower may pool on
        ids = ids[: self.text_max_length]
        return ImageSample(inputs, input_ids=torch.tensor(ids, dtype=torch.long), caption_truncated=truncated,
                           location=where)


def collate_image_samples(samples: list[ImageSample], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Samples -> one micro-batch: image inputs concatenated (one packed sequence), masks and teacher views kept
    per sample, captions right-padded with an `attention_mask`."""
    if not samples:
        raise ValueError("collate_image_samples needs at least one sample")
    batch = {key: torch.cat([s.image_inputs[key] for s in samples]) for key in samples[0].image_inputs}
    if samples[0].visible_mask is not None:
        batch["visible_mask"] = torch.cat([s.visible_mask for s in samples])
    if samples[0].teacher_pixel_values is not None:
        batch["teacher_pixel_values"] = [s.teacher_pixel_values for s in samples]
    if samples[0].input_ids is not None:
        length = max(s.length for s in samples)
        input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            input_ids[row, : sample.length] = sample.input_ids
            attention_mask[row, : sample.length] = 1
        batch.update(input_ids=input_ids, attention_mask=attention_mask,
                     captions_truncated=torch.tensor(sum(s.caption_truncated for s in samples)))
    return batch


@dataclass
class ImageBatcher:
    """A rank's share of one step -> micro-batches of `micro_batch_size` images (the `TrainStream` batcher of the
    encoder's pretraining stages); a step's targets are its masked patches (Stage I) or its pairs (Stage II)."""

    micro_batch_size: int
    pad_token_id: int = 0

    def micro_batches(self, samples: list[ImageSample]) -> list[dict]:
        return [collate_image_samples(samples[i : i + self.micro_batch_size], self.pad_token_id)
                for i in range(0, len(samples), self.micro_batch_size)]

    @staticmethod
    def num_targets(samples: list[ImageSample], micro_batches: list[dict]) -> int:
        if samples and samples[0].visible_mask is not None:
            return sum(int((~s.visible_mask).sum()) for s in samples)
        return len(samples)

    @staticmethod
    def num_slots(micro_batches: list[dict]) -> int:
        return sum(int(mb["input_ids"].numel()) if "input_ids" in mb else 0 for mb in micro_batches)

    @staticmethod
    def step_counts(samples: list[ImageSample]) -> dict[str, int]:
        """Logged by the trainer (summed over ranks, cumulative): Stage II's captions cut to the text length."""
        if samples and samples[0].input_ids is not None:
            return {"captions_truncated": sum(s.caption_truncated for s in samples)}
        return {}


__all__ = [
    "CaptionEncoder",
    "ImageBatcher",
    "ImageSample",
    "MaskedImageEncoder",
    "TeacherView",
    "collate_image_samples",
    "random_visible_mask",
]
