# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Image processor for FineViT: native-resolution smart resize and packing into merge-group-major patches."""

import io
import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import logging


logger = logging.get_logger(__name__)

RESAMPLE_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 1008 * 1008,
    max_aspect_ratio: float = 200.0, name: str = "image",
) -> tuple[int, int]:
    """Target `(height, width)`: multiples of `factor`, aspect ratio kept, area within `[min_pixels, max_pixels]`.

    Raises:
        `ValueError` naming `name` when the aspect ratio exceeds `max_aspect_ratio` or a side is empty.
    """
    if height < 1 or width < 1:
        raise ValueError(f"{name}: empty image of size {width}x{height}")
    if max(height, width) / min(height, width) > max_aspect_ratio:
        raise ValueError(
            f"{name}: aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} image exceeds "
            f"{max_aspect_ratio:g}; crop or pad it first"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb_image(image: Any, name: str = "image") -> Image.Image:
    """Decode `image` (PIL image, path, bytes, HWC uint8 array or CHW tensor) into an upright 8-bit RGB PIL image.

    EXIF orientation is applied; grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit/float images are
    converted. Undecodable inputs raise `ValueError` naming `name`.
    """
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        try:
            image = Image.open(image)
        except FileNotFoundError as error:
            raise ValueError(f"{name}: image file not found") from error
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{name}: cannot decode image ({error})") from error
    elif isinstance(image, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(image))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{name}: cannot decode image bytes ({error})") from error
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.dim() == 3 and array.shape[0] in (1, 3, 4):
            array = array.permute(1, 2, 0)  # CHW -> HWC
        array = array.numpy()
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8) if array.max() <= 1.0 else array.astype(np.uint8)
        image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8) if array.max() <= 1.0 else np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name}: unsupported image type {type(image).__name__}")
    try:
        image = ImageOps.exif_transpose(image)
        image.load()
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{name}: cannot decode image ({error})") from error
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: rescale the actual range into 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float32)
        high = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array / high, 0, 1) * 255).round().astype(np.uint8), mode="L")
        return image.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


class FineViTImageProcessor(BaseImageProcessor):
    r"""
    Turns images of any size into FineViT's packed input.

    Each image is smart-resized so both sides are multiples of `patch_size * merge_size` and its area lies within
    `[min_pixels, max_pixels]` (aspect ratio kept), normalised, and cut into `patch_size` patches ordered so that each
    `merge_size x merge_size` group is contiguous. All images of a call are concatenated.

    Args:
        patch_size (`int`, *optional*, defaults to 14)
        merge_size (`int`, *optional*, defaults to 2): must equal the model's `spatial_merge_size`.
        min_pixels (`int`, *optional*, defaults to `56 * 56`)
        max_pixels (`int`, *optional*, defaults to `1008 * 1008`): the pixel budget (~1000x1000, Stage III's input).
        max_aspect_ratio (`float`, *optional*, defaults to 200)
        image_mean, image_std (`list[float]`, *optional*, defaults to 0.5): per-channel normalisation.
        resample (`str`, *optional*, defaults to `"bicubic"`): `"bicubic"`, `"bilinear"` or `"lanczos"`.
        backend (`str`, *optional*, defaults to `"pil"`): `"pil"` resizes with Pillow; `"torchvision"` resizes
            tensors with torchvision (antialiased) when it is installed.

    Returns (from `__call__`): `BatchFeature` with `pixel_values` `(total_patches, 3 * patch_size**2)` and
    `image_grid_thw` `(num_images, 3)`.
    """

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(
        self,
        patch_size: int = 14,
        merge_size: int = 2,
        min_pixels: int = 56 * 56,
        max_pixels: int = 1008 * 1008,
        max_aspect_ratio: float = 200.0,
        image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        resample: str = "bicubic",
        backend: str = "pil",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}")
        if backend not in ("pil", "torchvision"):
            raise ValueError(f"backend must be 'pil' or 'torchvision', got {backend!r}")
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.resample = resample
        self.backend = backend

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def get_resized_size(self, height: int, width: int, name: str = "image") -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels, self.max_aspect_ratio, name)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Patches the encoder sees for an image of this size (vLLM-style helper)."""
        resized_height, resized_width = self.get_resized_size(height, width)
        return (resized_height // self.patch_size) * (resized_width // self.patch_size)

    def get_number_of_image_tokens(self, height: int, width: int) -> int:
        """LLM tokens one image of this size becomes after the `merge_size x merge_size` merge."""
        return self.get_number_of_image_patches(height, width) // self.merge_size**2

    def _resize(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """-> `(height, width, 3)` uint8."""
        if self.backend == "torchvision":
            from torchvision.transforms.v2 import functional as tvF  # optional dependency, imported on use

            tensor = tvF.pil_to_tensor(image)  # (C, H, W) uint8
            mode = {"bicubic": tvF.InterpolationMode.BICUBIC, "bilinear": tvF.InterpolationMode.BILINEAR,
                    "lanczos": tvF.InterpolationMode.LANCZOS}[self.resample]
            tensor = tvF.resize(tensor, [height, width], interpolation=mode, antialias=True)
            return tensor.permute(1, 2, 0)
        if image.size != (width, height):
            image = image.resize((width, height), RESAMPLE_FILTERS[self.resample])
        return torch.from_numpy(np.array(image))  # a writable copy: torch refuses read-only buffers

    def _patchify(self, image: torch.Tensor) -> torch.Tensor:
        """`(H, W, C)` -> view `(H/pm, W/pm, m, m, C, p, p)` (no copy): merge groups contiguous, `(C, p, p)` per patch."""
        p, m = self.patch_size, self.merge_size
        height, width, channels = image.shape
        patches = image.view(height // (p * m), m, p, width // (p * m), m, p, channels)
        # (bh, mh, ph, bw, mw, pw, C) -> (bh, bw, mh, mw, C, ph, pw)
        return patches.permute(0, 3, 1, 4, 6, 2, 5)

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        image_names: list[str] | None = None,
        **kwargs,
    ) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        flat: list[Any] = []
        for item in images:  # a batch may be given per sample: [[img, img], [img]]
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        if not flat:
            raise ValueError("FineViTImageProcessor got no images")
        rgbs, grids = [], []
        for index, image in enumerate(flat):
            name = image_names[index] if image_names else (str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}")
            rgb = to_rgb_image(image, name)
            height, width = self.get_resized_size(rgb.height, rgb.width, name)
            rgbs.append(rgb)
            grids.append((1, height // self.patch_size, width // self.patch_size))

        # Sizes are known before any resize, so every image is written straight into one preallocated fp32 pack:
        # resize -> one permuting copy that also converts uint8 to fp32 -> normalise in place while it is in cache.
        # x * 1/(255 std) - mean/std, per channel of each (C, p, p) patch.
        p2 = self.patch_size**2
        std, mean = torch.tensor(self.image_std), torch.tensor(self.image_mean)
        scale = (1.0 / (255.0 * std)).repeat_interleave(p2)
        offset = (-mean / std).repeat_interleave(p2)
        pixel_values = torch.empty(sum(h * w for _, h, w in grids), len(self.image_mean) * p2, dtype=torch.float32)
        start = 0
        for rgb, (_, grid_h, grid_w) in zip(rgbs, grids):
            patches = self._patchify(self._resize(rgb, grid_h * self.patch_size, grid_w * self.patch_size))
            block = pixel_values[start : start + grid_h * grid_w]  # (h*w, C*p*p)
            block.view(patches.shape).copy_(patches)
            torch.addcmul(offset, block, scale, out=block)
            start += grid_h * grid_w
        data = {"pixel_values": pixel_values, "image_grid_thw": torch.tensor(grids, dtype=torch.long)}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images: Any, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["FineViTImageProcessor", "smart_resize", "to_rgb_image"]
