# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Processor for FineViT-VL: image processor + tokenizer + chat template, with image-token expansion."""

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import logging

from .vision_tower_specs import image_grid_thw_of, num_image_tokens


logger = logging.get_logger(__name__)

DEFAULT_IMAGE_TOKEN = "<|image|>"


class FineViTVLProcessor(ProcessorMixin):
    r"""
    Wraps the vision tower's own image processor ([`FineViTImageProcessor`], SigLIP2's NaFlex processor, Qwen2-VL's,
    CLIP's, ...) and any tokenizer. Each image token in the text is expanded into as many image tokens as the image
    yields after the spatial merge, computed from what the image processor emitted (`t * ceil(h / m) * ceil(w / m)`
    for a patch grid `(t, h, w)`), and the outputs always carry that `image_grid_thw`.

    Args:
        image_processor: the tower's image processor.
        tokenizer ([`PreTrainedTokenizerBase`]): the LLM's tokenizer, with `image_token` added as a special token.
        chat_template (`str`, *optional*): Jinja template emitting one `image_token` per `{"type": "image"}` item.
        image_token (`str`, *optional*, defaults to `"<|image|>"`).
        patch_size (`int`, *optional*): the tower's patch size; defaults to the image processor's `patch_size`
            (needed for fixed-size towers, whose processors do not know it).
        merge_size (`int`, *optional*): the model's `spatial_merge_size`; defaults to the image processor's
            `merge_size`, else 2.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str | None = None,
        patch_size: int | None = None,
        merge_size: int | None = None,
        **kwargs,
    ):
        self.patch_size = patch_size or getattr(image_processor, "patch_size", None)
        self.merge_size = merge_size or getattr(image_processor, "merge_size", None) or 2
        self.image_token = image_token or getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token) if tokenizer is not None else None
        if tokenizer is not None and (self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id):
            raise ValueError(
                f"The tokenizer does not know the image token {self.image_token!r}; add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{self.image_token!r}]}})"
            )
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def num_image_tokens(self, image_grid_thw: torch.Tensor) -> list[int]:
        """LLM tokens per image for a `(num_images, 3)` patch grid."""
        return num_image_tokens(image_grid_thw, self.merge_size)

    def set_pixel_budget(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """Bound the pixels per image the way the tower's image processor understands it: FineViT's `min_pixels` /
        `max_pixels`, Qwen2-VL's `size` edges, NaFlex's `max_num_patches`. Fixed-size towers have no budget (a
        warning says the value is ignored)."""
        processor = self.image_processor
        if min_pixels is None and max_pixels is None:
            return
        if hasattr(processor, "max_pixels") and hasattr(processor, "min_pixels"):
            processor.min_pixels = processor.min_pixels if min_pixels is None else int(min_pixels)
            processor.max_pixels = processor.max_pixels if max_pixels is None else int(max_pixels)
            low, high = processor.min_pixels, processor.max_pixels
        elif hasattr(processor, "max_num_patches"):
            if max_pixels is not None:
                processor.max_num_patches = max(1, int(max_pixels) // self.patch_size**2)
            return
        elif getattr(processor, "size", None) is not None and getattr(processor.size, "longest_edge", None) is not None:
            size = dict(processor.size)  # Qwen2-VL: the edges are pixel counts
            size["shortest_edge"] = size["shortest_edge"] if min_pixels is None else int(min_pixels)
            size["longest_edge"] = size["longest_edge"] if max_pixels is None else int(max_pixels)
            processor.size = type(processor.size)(**size)
            low, high = size["shortest_edge"], size["longest_edge"]
        else:
            logger.warning("%s makes fixed-size images; the pixel budget (%s, %s) does not apply and is ignored",
                           type(processor).__name__, min_pixels, max_pixels)
            return
        if low > high:
            raise ValueError(f"min_pixels ({low}) exceeds max_pixels ({high})")

    def process_images(self, images: Any, **images_kwargs) -> dict[str, torch.Tensor]:
        """The image processor's outputs plus the `image_grid_thw` of what the tower will see."""
        image_inputs = dict(self.image_processor(images, return_tensors="pt", **images_kwargs))
        image_inputs["image_grid_thw"] = image_grid_thw_of(image_inputs, self.patch_size)
        return image_inputs

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        images_kwargs: dict | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            images: one image, a list of images, or a per-sample nested list; taken in order of the image tokens.
            text (`str` or `list[str]`): prompts containing one `image_token` per image.
            return_tensors (`str`, *optional*, defaults to `"pt"`).
            images_kwargs (`dict`, *optional*): extra arguments for the image processor.
            **kwargs: tokenizer arguments (`padding`, `padding_side`, `max_length`, `truncation`, ...).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, with images, `pixel_values` and `image_grid_thw`.
        """
        if text is None:
            raise ValueError("FineViTVLProcessor needs `text` (use the image processor alone for images only)")
        texts = [text] if isinstance(text, str) else list(text)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        image_inputs: dict[str, torch.Tensor] = {}
        if images is not None and not (isinstance(images, (list, tuple)) and len(images) == 0):
            image_inputs = self.process_images(images, **(images_kwargs or {}))
        n_images = 0 if not image_inputs else image_inputs["image_grid_thw"].shape[0]
        if n_placeholders != n_images:
            raise ValueError(
                f"The text contains {n_placeholders} image tokens ({self.image_token!r}) but {n_images} images were "
                f"given; put exactly one image token (or one {{'type': 'image'}} chat item) per image."
            )
        if n_images:
            # Expand each placeholder via a sentinel so already-expanded tokens are not matched again.
            counts = iter(self.num_image_tokens(image_inputs["image_grid_thw"]))
            sentinel = "\x00FINEVIT_IMAGE\x00"
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                pieces = [parts[0]]
                for part in parts[1:]:
                    pieces.append(sentinel * next(counts))
                    pieces.append(part)
                expanded.append("".join(pieces).replace(sentinel, self.image_token))
            texts = expanded

        bos = getattr(self.tokenizer, "bos_token", None)
        if "add_special_tokens" not in kwargs and bos and all(t.startswith(bos) for t in texts):
            kwargs["add_special_tokens"] = False  # the chat template already wrote BOS
        text_inputs = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        if n_images:
            expected = sum(self.num_image_tokens(image_inputs["image_grid_thw"]))
            ids = text_inputs["input_ids"]
            found = int((torch.as_tensor(ids) == self.image_token_id).sum()) if return_tensors == "pt" else sum(
                row.count(self.image_token_id) for row in ids
            )
            if found != expected:
                raise ValueError(
                    f"Tokenized text keeps {found} of {expected} image tokens: truncation (max_length) cut into an "
                    f"image. Raise max_length or lower the image processor's max_pixels."
                )
        return BatchFeature(data={**text_inputs, **image_inputs}, tensor_type=return_tensors)

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs) -> MultiModalData:
        """Image tokens and patches for images of the given `(height, width)` sizes, without processing them."""
        vision_data = {}
        if image_sizes is not None:
            # Processing a blank image of each size is exact for every tower (and cheap next to encoding it).
            grids = [self.process_images([Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))])["image_grid_thw"]
                     for h, w in image_sizes]
            vision_data = {"num_image_tokens": [self.num_image_tokens(g)[0] for g in grids],
                           "num_image_patches": [int(g.prod()) for g in grids]}
        return MultiModalData(**vision_data)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


__all__ = ["FineViTVLProcessor"]
