"""Opening a record's images: from disk or from bytes carried by the record, with the model's one image decoder.

Decoding is `finevit_vl.models.image_processing_finevit.to_rgb_image`, the function the processor runs at inference, so
training sees the same pixels as inference and evaluation (EXIF orientation, transparency on white, 16-bit scaling,
first frame of animations, decompression-bomb limit). Every failure (missing file, undecodable bytes, size mismatch, box
outside the image) raises `BadRecordError` naming the record's location and the file, so a trainer can count and skip
the record.
"""

import os
from pathlib import Path

from PIL import Image

from ..models.image_processing_finevit import MAX_IMAGE_PIXELS, FineViTImageError, to_rgb_image
from .schema import BadRecordError, Record, record_images, record_location, validate_record


def open_image(
    source: str | os.PathLike | bytes, where: str, max_image_pixels: int | None = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode an image file path or encoded bytes into an upright RGB image with `to_rgb_image`.

    Raises `BadRecordError` naming ``where`` on failure. ``max_image_pixels`` is the decoder's decompression-bomb limit
    (the processor's default).
    """
    if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
        raise BadRecordError(where, f"image file not found: {source}")
    try:
        return to_rgb_image(source, where, max_image_pixels=max_image_pixels)
    except FineViTImageError as err:
        raise BadRecordError(where, err.reason) from None


def _missing_image_reason(root: Path, path: str) -> str:
    reason = f"image file not found: {root / path}"
    if Path(path).is_absolute():
        return reason
    # Sources set _image_root from their `image_root` setting, by default the data file's folder.
    return (
        f"{reason} (relative image paths resolve against image_root {root.absolute()}; set image_root in the source "
        "config or write absolute paths)"
    )


def load_record_images(
    record: Record, location: str, max_image_pixels: int | None = MAX_IMAGE_PIXELS
) -> list[Image.Image]:
    """Open the images of ``record`` (from ``_image_bytes`` or files under ``_image_root``) and validate the record.

    ``max_image_pixels`` is the decompression-bomb limit, normally the image processor's own.

    Fills ``width``/``height`` from the first image; if the record already states a size that differs, its boxes were
    annotated on another image and the record is rejected. Raises `BadRecordError` for any problem.
    """
    validate_record(record, location)  # structure first; boxes are checked against the real size below
    where = record_location(record, location)
    paths = record_images(record)
    encoded = record.get("_image_bytes") or [None] * len(paths)
    if len(encoded) != len(paths):
        raise BadRecordError(where, f"{len(encoded)} encoded image(s) for {len(paths)} image path(s)")
    root = Path(record.get("_image_root") or "")
    images = []
    for path, data in zip(paths, encoded):
        image_where = f"{where} image {path!r}"
        if data is None and not (root / path).exists():
            raise BadRecordError(image_where, _missing_image_reason(root, path))
        images.append(open_image(data if data is not None else root / path, image_where, max_image_pixels))
    if images and "width" in record:
        if (record["width"], record["height"]) != images[0].size:
            raise BadRecordError(
                where,
                f"record says {record['width']}x{record['height']} but image {paths[0]!r} is "
                f"{images[0].width}x{images[0].height}; boxes must be pixels of this image "
                "(fix width/height or rescale the boxes)",
            )
    elif images:
        record["width"], record["height"] = images[0].size
        validate_record(record, location)  # now the boxes can be checked against the image
    return images


__all__ = ["load_record_images", "open_image"]
