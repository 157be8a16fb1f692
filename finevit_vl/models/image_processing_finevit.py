# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Image processor for FineViT: the one image decoder, native-resolution smart resize, and packing into
merge-group-major patches."""

import contextlib
import io
import math
import os
import struct
import threading
import zlib
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import logging


logger = logging.get_logger(__name__)

RESAMPLE_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}

# Pillow's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS), checked from the header before any pixel is decoded.
MAX_IMAGE_PIXELS = 178_956_970
# Transparent pixels are composited on white: documents, charts and screenshots, most of what has alpha, are on white.
BACKGROUND = (255, 255, 255)
# Slack on a value range: half an 8-bit step (e.g. 1.001 after a float resize) rounds to the same output byte.
_RANGE_TOLERANCE = 0.5 / 255
_CHANNEL_COUNTS = (1, 3, 4)
_DATA_FORMATS = ("channels_first", "channels_last")
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# What Pillow's decoders raise for broken files (truncated data, bad chunks, bad headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class FineViTImageError(ValueError):
    """An image that cannot be used; `image` names it (a path or `image {index}`), `reason` says what is wrong."""

    def __init__(self, image: str, reason: str) -> None:
        super().__init__(f"{image}: {reason}")
        self.image = image
        self.reason = reason


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 1008 * 1008,
    max_aspect_ratio: float = 200.0, name: str = "image",
) -> tuple[int, int]:
    """Target `(height, width)`: multiples of `factor`, aspect ratio kept, area within `[min_pixels, max_pixels]`.

    `max_pixels` is a hard cap: `height * width <= max_pixels` and both sides `>= factor` always hold (where the two
    bounds conflict, `max_pixels` wins).

    Raises:
        `ValueError` naming `name` when the aspect ratio exceeds `max_aspect_ratio` or a side is empty, and when
        `max_pixels < factor**2` (not even one merge group fits).
    """
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels ({max_pixels}) is below one {factor}x{factor} merge group ({factor * factor})")
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
    if h_bar * w_bar > max_pixels:
        # The `factor` floor on the short side (extreme aspect ratios) or the ceil of the upscale can overshoot: shrink
        # the long side to fit, then the other if the long one reached the floor.
        if h_bar >= w_bar:
            h_bar = max(factor, max_pixels // w_bar // factor * factor)
            w_bar = min(w_bar, max_pixels // h_bar // factor * factor)
        else:
            w_bar = max(factor, max_pixels // h_bar // factor * factor)
            h_bar = min(h_bar, max_pixels // w_bar // factor * factor)
    return h_bar, w_bar


def to_rgb_image(
    image: Any,
    name: str | None = None,
    *,
    input_data_format: str | None = None,
    value_range: tuple[float, float] | None = None,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode `image` into an upright 8-bit RGB PIL image: the one decoder for training, inference and evaluation.

    Files (a path, or encoded `bytes`) and PIL images:
        - the first frame of an animation (GIF, APNG, multi-frame TIFF; a PIL image passed in is used at its current
          frame);
        - EXIF (or XMP) orientation is applied; EXIF that cannot be parsed is ignored (the image is used as stored,
          with a warning), since the pixels themselves are intact;
        - transparency (RGBA, LA, PA, palette or colour-key `transparency`) is composited on white (`BACKGROUND`);
        - 16-bit modes (`I;16*`, and `I`, read as 16-bit) are scaled by 255/65535 (mid-grey 32768 -> 128); an `I` image
          with values outside [0, 65535] is refused; mode `F` follows the float rule below;
        - `1`, `L`, `P`, `CMYK`, `YCbCr`, ... are converted by Pillow; RGB is returned unchanged (a copy);
        - an image with more than `max_image_pixels` pixels (`None`: no limit) is refused from its header, before
          decoding, as a possible decompression bomb. Pillow's own guard (2 x `PIL.Image.MAX_IMAGE_PIXELS`) also
          applies: raise that too to allow larger images.

    Arrays and tensors (numpy or torch; torch bf16/fp16 are converted to float32 first):
        - layout `(H, W)` grayscale, or `(H, W, C)` / `(C, H, W)` with C in (1, 3, 4) (4: RGBA, composited on white);
          the channel axis is inferred when only one of the first and last axes has size 1, 3 or 4, otherwise
          `input_data_format` (`"channels_first"` / `"channels_last"`, as `transformers.image_utils.ChannelDimension`)
          must say which. Other ranks (1-D, a 4-D batch: pass a list of images instead) and empty arrays are refused;
        - value range: uint8 is [0, 255], uint16 [0, 65535], bool {False, True}, floats [0, 1]; other integer dtypes
          have no implied range. `value_range=(low, high)` declares it explicitly for any dtype (e.g. `(0, 255)` for a
          float or int64 image). Values are mapped linearly to [0, 255] and rounded; values outside the range by
          more than half an output step, NaN and inf are refused, never clipped or wrapped.

    The result carries no metadata (`info` is empty), so decoding it again returns the same pixels.

    Raises:
        `FineViTImageError` (a `ValueError`) naming the image (its path, else `name`, else "image") and what is wrong:
        missing or undecodable file, decompression bomb, unsupported type, layout or range.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        return _decode_file(image, name, max_image_pixels)
    name = name or "image"
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        # numpy has no bfloat16; float32 holds bf16 and fp16 exactly.
        image = (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_image(image, name, input_data_format, value_range)
    if not isinstance(image, Image.Image):
        raise FineViTImageError(
            name,
            f"unsupported image type {type(image).__name__}; pass a path, bytes, a PIL image, an array or a tensor",
        )
    return _decode_pil(image, name, max_image_pixels)


_strict_lock = threading.Lock()
_strict_users = 0
_saved_load_truncated = False


@contextlib.contextmanager
def _refuse_truncated_files():
    """Pillow's process-wide `LOAD_TRUNCATED_IMAGES` off while we decode a file (lmms-eval turns it on at import).

    A truncated file must be refused, not silently padded with grey. Reference-counted, so overlapping decodes in
    several threads restore the caller's setting once, when the last one ends.
    """
    global _strict_users, _saved_load_truncated
    with _strict_lock:
        if _strict_users == 0:
            _saved_load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_load_truncated


def _decode_file(
    source: str | os.PathLike | bytes | bytearray, name: str | None, max_image_pixels: int | None
) -> Image.Image:
    is_path = isinstance(source, (str, os.PathLike))
    name = name or (str(source) if is_path else "image")
    try:
        with _refuse_truncated_files(), Image.open(source if is_path else io.BytesIO(source)) as image:
            return _decode_pil(image, name, max_image_pixels)
    except FileNotFoundError:
        raise FineViTImageError(name, "image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise FineViTImageError(name, f"refused as a possible decompression bomb ({error})") from None
    except FineViTImageError:
        raise
    except (UnidentifiedImageError, *_DECODE_ERRORS) as error:
        raise FineViTImageError(name, f"cannot decode image{'' if is_path else ' bytes'} ({error})") from None


def _decode_pil(image: Image.Image, name: str, max_image_pixels: int | None) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise FineViTImageError(name, f"empty image of size {width}x{height}")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise FineViTImageError(
            name, f"refused as a possible decompression bomb: {width}x{height} = {width * height:,} pixels exceeds "
            f"max_image_pixels={max_image_pixels:,}",
        )
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise FineViTImageError(name, f"cannot decode image ({error})") from None
    orientation = _exif_orientation(image, name)  # read before converting: PNG/TIFF keep EXIF on the file object
    rgb = _to_rgb(image, name)
    if orientation in _ORIENTATIONS:
        rgb = rgb.transpose(_ORIENTATIONS[orientation])
    elif rgb is image:
        rgb = image.copy()  # never hand back (and strip the metadata of) the caller's or the open file's object
    rgb.info = {}  # no EXIF left to apply twice when the result is decoded again (training decodes, then the processor)
    return rgb


def _exif_orientation(image: Image.Image, name: str) -> int:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as error:  # noqa: BLE001 - corrupt EXIF raises assorted types in Pillow; the pixels are intact
        logger.warning(f"{name}: unreadable EXIF ({type(error).__name__}: {error}); using the image as stored")
        return 1
    return orientation if isinstance(orientation, int) else 1


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        described = f"mode {mode} image of size {image.width}x{image.height}"
        pixels = _to_uint8(np.asarray(image), name, described, (0, 65535))
        return Image.fromarray(pixels).convert("RGB")  # (H, W) uint8 -> "L"
    if mode == "F":
        described = f"mode F image of size {image.width}x{image.height}"
        pixels = _to_uint8(np.asarray(image), name, described, None, "; scale it to [0, 1] first")
        return Image.fromarray(pixels).convert("RGB")  # (H, W) uint8 -> "L"
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if mode == "RGB" else image.convert("RGB")


def _array_to_image(
    array: np.ndarray, name: str, input_data_format: str | None, value_range: tuple[float, float] | None
) -> Image.Image:
    described = f"{array.dtype} array of shape {tuple(array.shape)}"
    if array.size == 0:
        raise FineViTImageError(name, f"empty {described}")
    if array.ndim == 4:
        raise FineViTImageError(name, f"{described} looks like a batch; pass a list of images instead")
    if array.ndim not in (2, 3):
        raise FineViTImageError(name, f"{described} is not an image: expected (H, W), (H, W, C) or (C, H, W)")
    if array.ndim == 3:
        data_format = getattr(input_data_format, "value", input_data_format)  # a ChannelDimension or its string
        if data_format is None:
            first, last = array.shape[0] in _CHANNEL_COUNTS, array.shape[-1] in _CHANNEL_COUNTS
            if first and last:
                raise FineViTImageError(
                    name, f"{described} is ambiguous: the first and the last axis could both be channels; pass "
                    "input_data_format='channels_first' or 'channels_last'",
                )
            if not first and not last:
                raise FineViTImageError(name, f"{described} has no channel axis of size 1, 3 or 4 (first or last)")
            data_format = "channels_first" if first else "channels_last"
        if data_format not in _DATA_FORMATS:
            raise FineViTImageError(
                name, f"input_data_format must be one of {_DATA_FORMATS}, got {input_data_format!r}"
            )
        if data_format == "channels_first":
            array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if array.shape[-1] not in _CHANNEL_COUNTS:
            raise FineViTImageError(
                name, f"{described} ({data_format}) has {array.shape[-1]} channels; expected 1, 3 or 4"
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    hint = "" if value_range is not None else "; rescale it or pass value_range=(low, high), e.g. (0, 255)"
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array, name, described, value_range, hint)))


def _to_uint8(
    array: np.ndarray, name: str, described: str, value_range: tuple[float, float] | None, hint: str = ""
) -> np.ndarray:
    """Map `array` from its declared or implied range to uint8; refuse values outside it rather than clip or wrap."""
    if value_range is None:
        if array.dtype == np.uint8:
            return array
        if array.dtype == np.bool_:
            return array.astype(np.uint8) * 255
        if array.dtype == np.uint16:
            value_range = (0, 65535)
        elif np.issubdtype(array.dtype, np.floating):
            value_range = (0.0, 1.0)
        else:
            raise FineViTImageError(
                name, f"{described}: dtype {array.dtype} has no implied value range; convert to uint8 ([0, 255]) or "
                "float ([0, 1]), or pass value_range=(low, high)",
            )
    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        raise FineViTImageError(name, f"value_range must be (low, high) with low < high, got {value_range!r}")
    values = array.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        raise FineViTImageError(name, f"{described} contains {int((~finite).sum())} NaN or infinite value(s)")
    slack = _RANGE_TOLERANCE * (high - low)
    vmin, vmax = float(values.min()), float(values.max())
    if vmin < low - slack or vmax > high + slack:
        raise FineViTImageError(
            name, f"{described} has values in [{vmin:g}, {vmax:g}], outside its value range [{low:g}, {high:g}]{hint}"
        )
    return (np.clip((values - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)


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
        max_pixels (`int`, *optional*, defaults to `1008 * 1008`): the pixel budget (~1000x1000, Stage III's input), a
            hard cap on the resized area.
        max_aspect_ratio (`float`, *optional*, defaults to 200)
        max_image_pixels (`int`, *optional*, defaults to `MAX_IMAGE_PIXELS` = 178,956,970): inputs with more pixels are
            refused before decoding, as possible decompression bombs (`None`: no limit beyond Pillow's own).
        image_mean, image_std (`list[float]`, *optional*, defaults to 0.5): per-channel normalisation.
        resample (`str`, *optional*, defaults to `"bicubic"`): `"bicubic"`, `"bilinear"` or `"lanczos"`.
        backend (`str`, *optional*, defaults to `"pil"`): `"pil"` resizes with Pillow; `"torchvision"` resizes
            tensors with torchvision (antialiased) when it is installed.

    Images are decoded by [`to_rgb_image`] (its docstring states the accepted inputs, ranges and layouts); the
    `preprocess` kwargs `input_data_format` and `value_range` declare the layout and range of array/tensor inputs.

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
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
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
        if max_pixels < (patch_size * merge_size) ** 2:
            group = (patch_size * merge_size) ** 2
            raise ValueError(f"max_pixels ({max_pixels}) is below one merge group ({group} pixels)")
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.max_image_pixels = max_image_pixels
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
        input_data_format: str | None = None,
        value_range: tuple[float, float] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """`input_data_format` (`"channels_first"`/`"channels_last"`) and `value_range` (`(low, high)`) declare the
        layout and range of array/tensor inputs; see [`to_rgb_image`]."""
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
            rgb = to_rgb_image(
                image, name, input_data_format=input_data_format, value_range=value_range,
                max_image_pixels=self.max_image_pixels,
            )
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


__all__ = [
    "BACKGROUND",
    "MAX_IMAGE_PIXELS",
    "FineViTImageError",
    "FineViTImageProcessor",
    "smart_resize",
    "to_rgb_image",
]
