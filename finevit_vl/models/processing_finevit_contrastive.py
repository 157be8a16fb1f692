# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Processor of the FineViT dual encoder (Stage II and zero-shot evaluation): image processor + text tokenizer."""

from typing import Any

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


class FineViTContrastiveProcessor(ProcessorMixin):
    r"""
    [`FineViTImageProcessor`] (native resolution, aspect ratio kept, no crop) and the text tower's tokenizer.

    Args:
        image_processor ([`FineViTImageProcessor`]).
        tokenizer ([`PreTrainedTokenizerBase`]): the text tower's tokenizer.
        text_max_length (`int`, *optional*, defaults to 64): captions are truncated to this many tokens (the Stage II
            schedule raises it, 64 -> 256); `__call__` counts what it truncated in `truncated_texts`.
    """

    def __init__(self, image_processor=None, tokenizer=None, text_max_length: int = 64, **kwargs) -> None:
        self.text_max_length = text_max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def tokenize(self, texts: list[str], max_length: int | None = None, padding: str | bool = "longest") -> tuple[dict, int]:
        """Captions -> (`input_ids` + `attention_mask` tensors, how many were longer than `max_length` and cut)."""
        max_length = max_length or self.text_max_length
        full_lengths = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
        encoded = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length,
                                 return_tensors="pt")
        return dict(encoded), sum(length > max_length for length in full_lengths)

    def __call__(self, images: Any = None, text: str | list[str] | None = None, **kwargs) -> BatchFeature:
        """Images -> `pixel_values` + `image_grid_thw` (packed); text -> `input_ids` + `attention_mask`."""
        data: dict = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors="pt"))
        if text is not None:
            encoded, truncated = self.tokenize([text] if isinstance(text, str) else text, kwargs.get("max_length"),
                                               kwargs.get("padding", "longest"))
            data.update(encoded)
            self.truncated_texts = truncated
        return BatchFeature(data)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]


__all__ = ["FineViTContrastiveProcessor"]
