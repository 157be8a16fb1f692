"""Opening a record's images: from disk or from bytes carried by the record, upright (EXIF) and RGB.

Every failure (missing file, undecodable bytes, size mismatch, box outside the image) raises `BadRecordError` naming
the record's location and the file, so a trainer can count and skip the record.
"""

import io
import os
from pathlib import Path

from PIL import Image, ImageOps

from .schema import BadRecordError, Record, record_images, record_location, validate_record


def open_image(source: str | os.PathLike | bytes, where: str) -> Image.Image:
    """Decode an image file path or encoded bytes into an upright RGB image; `BadRecordError` naming ``where`` on failure."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            # Phone photos store their rotation in EXIF; boxes are annotated on the upright image.
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except FileNotFoundError:
        raise BadRecordError(where, f"image file not found: {source}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadRecordError(where, f"cannot decode image: {err}") from None


def load_record_images(record: Record, location: str) -> list[Image.Image]:
    """Open the images of ``record`` (from ``_image_bytes`` or files under ``_image_root``) and validate the record.

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
    images = [
        open_image(data if data is not None else root / path, f"{where} image {path!r}")
        for path, data in zip(paths, encoded)
    ]
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
