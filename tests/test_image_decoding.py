"""One image decoder: a generated bad-input corpus decodes (or is refused) the same way in training and at inference.

Training path: `SampleEncoder.encode_record` (JSONL record -> `load_record_images` -> `open_image` -> processor).
Inference path: the processor given the file path (`FineViTImageProcessor` -> `to_rgb_image`). Both must produce the
same pixels, or the same refusal naming the file.
"""

import importlib.util
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from finevit_vl.data import BadRecordError, load_record_images, open_image
from finevit_vl.data.collator import SampleEncoder
from finevit_vl.models.image_processing_finevit import (
    MAX_IMAGE_PIXELS,
    FineViTImageError,
    FineViTImageProcessor,
    smart_resize,
    to_rgb_image,
)


LOCATION = "data.jsonl:1"
WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _halves(width: int, height: int, mode: str, left, right) -> Image.Image:
    image = Image.new(mode, (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims `width x height` (CRC fixed), i.e. a decompression bomb's header."""
    png = _encode(Image.new("L", (8, 8)), "PNG")
    # signature (8) | IHDR length (4) | "IHDR" width height (8) depth colour compression filter interlace (5) | CRC (4)
    body = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + body + struct.pack(">I", zlib.crc32(body)) + png[33:]


def _jpeg_with_exif(tags: dict[int, object]) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[tag] = value
    return _encode(_halves(60, 30, "RGB", RED, BLUE), "JPEG", exif=exif, quality=95)


def _corrupt_exif_jpeg() -> bytes:
    # Orientation 6 next to a Make tag retyped as ImageWidth (0x0100) holding text: Pillow reads the orientation, but
    # its ImageOps.exif_transpose crashes re-encoding the EXIF (struct.error).
    data = _jpeg_with_exif({0x010F: "Maker", 0x0112: 6})
    assert data.count(b"\x01\x0f\x00\x02") == 1
    return data.replace(b"\x01\x0f\x00\x02", b"\x01\x00\x00\x02")


def _garbage_exif_jpeg() -> bytes:
    data = _encode(_halves(60, 30, "RGB", RED, BLUE), "JPEG", quality=95)
    segment = b"Exif\x00\x00" + b"II*\x00\xff\xff\xff\x00" + bytes(range(40))
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[2:]


def _palette_alpha() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30, 255, 0, 0] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    return image


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), color) for color in (RED, (0, 255, 0), BLUE)]


def _animated(fmt: str) -> bytes:
    frames = _frames()
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:])


CORPUS = {
    "rgb.png": lambda: _encode(_noise(64, 48), "PNG"),
    "rgb.jpg": lambda: _encode(_noise(64, 48), "JPEG"),
    "truncated.jpg": lambda: _encode(_noise(64, 64), "JPEG")[:600],
    "truncated.png": lambda: _encode(_noise(64, 64), "PNG")[:300],
    "empty.jpg": lambda: b"",
    "text.jpg": lambda: b"this is a caption, not a JPEG\n",
    "tiny.png": lambda: _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
    "strip_within.png": lambda: _encode(Image.new("RGB", (150, 1), (0, 128, 0)), "PNG"),
    "strip_beyond.png": lambda: _encode(Image.new("RGB", (300, 1), (0, 128, 0)), "PNG"),
    "bomb.png": lambda: _png_claiming(100_000, 100_000),
    "large.png": lambda: _encode(_noise(200, 200), "PNG"),
    "cmyk.jpg": lambda: _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
    "grey16.png": lambda: _encode(Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)), "PNG"),
    "palette_alpha.png": lambda: _encode(_palette_alpha(), "PNG", transparency=0),
    "rgba.png": lambda: _encode(_halves(16, 16, "RGBA", (0, 0, 0, 0), (0, 0, 255, 255)), "PNG"),
    "la.png": lambda: _encode(_halves(16, 16, "LA", (0, 0), (100, 255)), "PNG"),
    "one_bit.png": lambda: _encode(_halves(16, 16, "1", 0, 1), "PNG"),
    "animated.gif": lambda: _animated("GIF"),
    "animated.png": lambda: _animated("PNG"),
    "pages.tiff": lambda: _animated("TIFF"),
    "rotated.jpg": lambda: _jpeg_with_exif({0x0112: 6}),
    "corrupt_exif.jpg": _corrupt_exif_jpeg,
    "garbage_exif.jpg": _garbage_exif_jpeg,
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image_corpus")
    for name, build in CORPUS.items():
        (root / name).write_bytes(build())
    return root


@pytest.fixture(scope="module")
def encoder(tiny_qwen3) -> SampleEncoder:
    return SampleEncoder(tiny_qwen3[1], max_length=4096)


def _record(root: Path, name: str) -> dict:
    return {"id": name, "image": name, "task": "caption", "caption": "a test image", "_image_root": str(root)}


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)  # signed, so differences below do not wrap


def _same_in_training_and_inference(root: Path, name: str, encoder: SampleEncoder) -> Image.Image:
    """Decode `name` both ways, assert equal pixels and equal model input, return the decoded image."""
    sample = encoder.encode_record(_record(root, name), LOCATION)
    (trained,) = load_record_images(_record(root, name), LOCATION)
    inferred = to_rgb_image(str(root / name))
    assert trained.mode == inferred.mode == "RGB"
    assert np.array_equal(_array(trained), _array(inferred))
    inference_input = encoder.image_processor([str(root / name)])
    assert torch.equal(sample.image_grid_thw, inference_input["image_grid_thw"])
    assert torch.equal(sample.pixel_values, inference_input["pixel_values"])
    processor = encoder.image_processor
    _, grid_h, grid_w = inference_input["image_grid_thw"][0].tolist()
    assert processor.min_pixels <= grid_h * grid_w * processor.patch_size**2 <= processor.max_pixels
    return inferred


def _check_rgb(image: Image.Image, path: Path) -> None:
    # Ordinary RGB files: exactly what Pillow decodes, so scores of existing runs do not move.
    assert np.array_equal(_array(image), _array(Image.open(path).convert("RGB")))


def _check_tiny(image: Image.Image, path: Path) -> None:
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (10, 20, 30)


def _check_strip(image: Image.Image, path: Path) -> None:
    assert image.size == (150, 1)


def _check_cmyk(image: Image.Image, path: Path) -> None:
    assert np.abs(_array(image) - RED).max() <= 8


def _check_grey16(image: Image.Image, path: Path) -> None:
    assert (_array(image) == 128).all()  # 32768 / 65535 * 255, not clipped to 255


def _check_left_white(right: tuple[int, int, int]):
    def check(image: Image.Image, path: Path) -> None:
        pixels = _array(image)
        assert (pixels[:, : image.width // 2] == WHITE).all()  # transparent -> the white background
        assert (pixels[:, image.width // 2 :] == right).all()

    return check


def _check_one_bit(image: Image.Image, path: Path) -> None:
    pixels = _array(image)
    assert (pixels[:, :8] == 0).all() and (pixels[:, 8:] == 255).all()


def _check_first_frame(image: Image.Image, path: Path) -> None:
    assert (_array(image) == RED).all()


def _check_rotated(image: Image.Image, path: Path) -> None:
    assert image.size == (30, 60)  # stored 60x30, orientation 6: displayed rotated 90 degrees clockwise
    assert np.array_equal(_array(image), _array(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))


def _check_corrupt_exif(image: Image.Image, path: Path) -> None:
    with pytest.raises(struct.error):  # the case is real: Pillow's own helper crashes on this file
        ImageOps.exif_transpose(Image.open(path))
    assert image.size == (30, 60)  # the readable orientation is still applied
    assert np.array_equal(_array(image), _array(Image.open(path).convert("RGB").transpose(Image.Transpose.ROTATE_270)))


def _check_unrotated(image: Image.Image, path: Path) -> None:
    assert image.size == (60, 30)
    assert np.array_equal(_array(image), _array(Image.open(path).convert("RGB")))


def _case(name: str, check, description: str, outcome: str):
    return pytest.param(name, check, id=name, marks=pytest.mark.reliability("images", description, outcome))


@pytest.mark.parametrize(
    ("name", "check"),
    [
        _case("rgb.png", _check_rgb, "ordinary RGB PNG", "pixels exactly Pillow's; training = inference"),
        _case("rgb.jpg", _check_rgb, "ordinary RGB JPEG", "pixels exactly Pillow's; training = inference"),
        _case("tiny.png", _check_tiny, "1x1 image", "decoded, upscaled to min_pixels; training = inference"),
        _case("strip_within.png", _check_strip, "1x150 image (aspect ratio within max_aspect_ratio 200)",
              "decoded and resized within max_pixels; training = inference"),
        _case("cmyk.jpg", _check_cmyk, "CMYK JPEG", "converted to RGB (red stays red); training = inference"),
        _case("grey16.png", _check_grey16, "16-bit grey PNG (value 32768)",
              "scaled by the bit depth to 128; training = inference"),
        _case("palette_alpha.png", _check_left_white(RED), "palette PNG with a transparent index",
              "transparent pixels on white; training = inference"),
        _case("rgba.png", _check_left_white(BLUE), "RGBA PNG, half transparent black",
              "transparent pixels on white (not black); training = inference"),
        _case("la.png", _check_left_white((100, 100, 100)), "grey + alpha (LA) PNG",
              "transparent pixels on white; training = inference"),
        _case("one_bit.png", _check_one_bit, "1-bit PNG", "black and white RGB; training = inference"),
        _case("animated.gif", _check_first_frame, "animated GIF (red, green, blue frames)",
              "first frame; training = inference"),
        _case("animated.png", _check_first_frame, "animated PNG (APNG)", "first frame; training = inference"),
        _case("pages.tiff", _check_first_frame, "multi-page TIFF", "first page; training = inference"),
        _case("rotated.jpg", _check_rotated, "JPEG with EXIF orientation 6",
              "rotated upright (60x30 -> 30x60); training = inference"),
        _case("corrupt_exif.jpg", _check_corrupt_exif, "JPEG with corrupt EXIF (a tag of the wrong type)",
              "no crash, the readable orientation applied; training = inference"),
        _case("garbage_exif.jpg", _check_unrotated, "JPEG with an unparseable EXIF block",
              "no crash, used as stored; training = inference"),
    ],
)
def test_file_decodes_the_same_in_training_and_inference(corpus, encoder, name, check):
    image = _same_in_training_and_inference(corpus, name, encoder)
    check(image, corpus / name)


def _refusal(name: str, reason: str, description: str):
    return pytest.param(name, reason, id=name, marks=pytest.mark.reliability(
        "images", description, f"refused, file named, same reason in training and inference ('{reason}')"))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        _refusal("truncated.jpg", "cannot decode image", "truncated JPEG"),
        _refusal("truncated.png", "cannot decode image", "truncated PNG"),
        _refusal("empty.jpg", "cannot decode image", "0-byte file"),
        _refusal("text.jpg", "cannot decode image", "text file named .jpg"),
        _refusal("bomb.png", "decompression bomb", "decompression bomb (PNG header claiming 100000x100000)"),
    ],
)
def test_bad_file_is_refused_the_same_way(corpus, encoder, name, reason):
    with pytest.raises(BadRecordError, match=reason) as trained:
        encoder.encode_record(_record(corpus, name), LOCATION)
    assert trained.value.location == f"{LOCATION} (id={name}) image {name!r}"
    with pytest.raises(FineViTImageError, match=reason) as inferred:
        encoder.image_processor([str(corpus / name)])
    assert inferred.value.image == str(corpus / name)
    assert trained.value.reason == inferred.value.reason


@pytest.mark.reliability("images", "truncated JPEG/PNG after `import lmms_eval` (it sets Pillow's "
                         "LOAD_TRUNCATED_IMAGES=True process-wide)", "still refused; the process-wide setting restored")
@pytest.mark.parametrize("name", ["truncated.jpg", "truncated.png"])
def test_truncated_files_are_refused_whatever_pillows_global_says(corpus, encoder, name, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(FineViTImageError, match="cannot decode image"):
        encoder.image_processor([str(corpus / name)])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


@pytest.mark.reliability("images", "1x300 image (aspect ratio beyond max_aspect_ratio 200)",
                         "refused in both paths with the aspect ratio; the record is named in training")
def test_aspect_ratio_beyond_the_limit_is_refused_in_both_paths(corpus, encoder):
    with pytest.raises(BadRecordError, match="aspect ratio 300.0") as trained:
        encoder.encode_record(_record(corpus, "strip_beyond.png"), LOCATION)
    assert trained.value.location == f"{LOCATION} (id=strip_beyond.png)"
    with pytest.raises(ValueError, match=r"strip_beyond.png: aspect ratio 300.0 of a 300x1 image exceeds 200"):
        encoder.image_processor([str(corpus / "strip_beyond.png")])


@pytest.mark.reliability("images", "image over max_image_pixels (a lowered limit; Pillow's own guard off)",
                         "refused from the header, before decoding, naming the file, in both paths")
def test_pixel_limit_is_checked_from_the_header_in_both_paths(corpus, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # only our check stands between the header and the decoder
    with pytest.raises(FineViTImageError, match=r"bomb.png: .*100000x100000 = 10,000,000,000 pixels exceeds "
                       r"max_image_pixels=178,956,970"):
        FineViTImageProcessor()([str(corpus / "bomb.png")])
    with pytest.raises(BadRecordError, match=r"^here: refused as a possible decompression bomb: 200x200"):
        open_image(corpus / "large.png", "here", max_image_pixels=10_000)
    with pytest.raises(FineViTImageError, match=r"large.png: refused .* 40,000 pixels exceeds max_image_pixels=10,000"):
        FineViTImageProcessor(max_image_pixels=10_000)([str(corpus / "large.png")])
    assert FineViTImageProcessor().max_image_pixels == MAX_IMAGE_PIXELS


@pytest.mark.reliability("images", "relative image path that does not exist",
                         "refused naming the resolved path and the image_root it resolved against")
def test_missing_relative_image_names_the_image_root(tmp_path):
    record = _record(tmp_path / "data", "img/missing.png")
    with pytest.raises(BadRecordError, match="image file not found") as info:
        load_record_images(record, LOCATION)
    assert str(tmp_path / "data" / "img/missing.png") in info.value.reason
    assert f"resolve against image_root {tmp_path / 'data'}; set image_root in the source config" in info.value.reason


@pytest.mark.reliability("images", "a decoded image decoded again (training decodes, then the processor does)",
                         "same pixels: no EXIF rotation applied twice")
def test_decoding_is_idempotent(corpus):
    once = to_rgb_image(str(corpus / "rotated.jpg"))
    assert once.info == {} and np.array_equal(_array(to_rgb_image(once)), _array(once))


@pytest.mark.reliability("images", "EXIF parser raising while reading the orientation",
                         "image used as stored, with a warning, no crash")
def test_unreadable_exif_falls_back_to_the_stored_image(corpus, monkeypatch):
    def broken(self):
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert to_rgb_image(str(corpus / "rotated.jpg")).size == (60, 30)


@pytest.mark.reliability("images", "lmms-eval task hands the dataset's PIL image to the model",
                         "decoded by the processor: same pixels as training on the same file")
def test_lmms_eval_visuals_reach_the_one_decoder(corpus, encoder):
    path = Path(__file__).parents[1] / "eval_tasks" / "utils.py"
    spec = importlib.util.spec_from_file_location("finevit_eval_utils", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    (visual,) = utils.doc_to_visual({"image": Image.open(corpus / "rgba.png")})
    sample = encoder.encode_record(_record(corpus, "rgba.png"), LOCATION)
    assert torch.equal(encoder.image_processor([visual])["pixel_values"], sample.pixel_values)


# ---------------------------------------------------------------------------------------------------------------------
# Arrays and tensors (inference only: records carry files)


def _processor_error(image, **kwargs) -> str:
    with pytest.raises(FineViTImageError) as info:
        FineViTImageProcessor()([np.zeros((28, 28, 3), dtype=np.uint8), image], **kwargs)
    assert info.value.image == "image 1"
    return info.value.reason


@pytest.mark.reliability("images", "float array with one NaN / one inf", "refused naming dtype, shape and the count")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_arrays_are_refused(bad):
    array = np.full((28, 28, 3), 0.5, dtype=np.float32)
    array[3, 4, 1] = bad
    assert _processor_error(array) == "float32 array of shape (28, 28, 3) contains 1 NaN or infinite value(s)"


@pytest.mark.reliability("images", "float array outside [0, 1] (1.01, 300.0, -0.2)",
                         "refused naming dtype, shape, min/max and value_range; never clipped or wrapped")
@pytest.mark.parametrize("bad", [1.01, 300.0, -0.2])
def test_out_of_range_float_arrays_are_refused(bad):
    array = np.full((28, 28, 3), 0.5, dtype=np.float64)
    array[0, 0, 0] = bad
    reason = _processor_error(array)
    assert reason.startswith(f"float64 array of shape (28, 28, 3) has values in [{min(bad, 0.5):g}, {max(bad, 0.5):g}]")
    assert "outside its value range [0, 1]" in reason and "value_range=(low, high)" in reason


@pytest.mark.reliability("images", "float array with rounding overshoot (1.001) and a declared 0-255 float range",
                         "1.001 accepted as 255; value_range=(0, 255) decodes float/int64 like uint8; "
                         "values outside a declared range refused")
def test_float_rounding_slack_and_declared_range():
    array = np.full((8, 8, 3), 0.5, dtype=np.float32)
    array[0, 0] = 1.001
    rgb = _array(to_rgb_image(array))
    assert (rgb[0, 0] == 255).all() and (rgb[1:] == 128).all()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    declared = to_rgb_image(pixels.astype(np.float32), value_range=(0, 255))
    assert np.array_equal(_array(declared), _array(to_rgb_image(pixels)))
    assert np.array_equal(_array(to_rgb_image(pixels.astype(np.int64), value_range=(0, 255))), pixels)
    outside = rf"values in \[0, {pixels.max()}\], outside its value range \[0, 100\]$"
    with pytest.raises(FineViTImageError, match=outside):
        to_rgb_image(pixels.astype(np.float32), value_range=(0, 100))


@pytest.mark.reliability("images", "integer arrays: int64 without a declared range, uint16, bool",
                         "int64 refused (no implied range); uint16 scaled by 65535; bool -> 0/255")
def test_integer_array_ranges():
    assert "dtype int64 has no implied value range" in _processor_error(np.full((28, 28), 200, dtype=np.int64))
    assert (_array(to_rgb_image(np.full((4, 4), 32768, dtype=np.uint16))) == 128).all()
    assert (_array(to_rgb_image(np.ones((4, 4), dtype=bool))) == 255).all()


@pytest.mark.reliability("images", "1-D, 4-D (batch), 0-size and 2-channel arrays",
                         "refused naming the shape; a batch is told to pass a list")
def test_arrays_without_an_image_layout_are_refused():
    assert "uint8 array of shape (784,) is not an image" in _processor_error(np.zeros(784, dtype=np.uint8))
    batch = torch.zeros(2, 3, 28, 28)
    batch_reason = "float32 array of shape (2, 3, 28, 28) looks like a batch; pass a list of images instead"
    assert _processor_error(batch) == batch_reason
    assert _processor_error(np.zeros((0, 28, 3), dtype=np.uint8)) == "empty uint8 array of shape (0, 28, 3)"
    assert "no channel axis of size 1, 3 or 4" in _processor_error(np.zeros((28, 28, 2), dtype=np.uint8))


@pytest.mark.reliability("images", "array of shape (3, 28, 3): both axes could be channels",
                         "refused unless input_data_format says which; declared layouts decode correctly")
def test_ambiguous_layout_needs_a_declared_format():
    array = np.random.default_rng(0).integers(0, 256, (3, 28, 3), dtype=np.uint8)
    assert "ambiguous" in _processor_error(array) and "input_data_format" in _processor_error(array)
    last = to_rgb_image(array, input_data_format="channels_last")
    first = to_rgb_image(array, input_data_format="channels_first")
    assert last.size == (28, 3) and np.array_equal(_array(last), array)
    assert first.size == (3, 28) and np.array_equal(_array(first), array.transpose(1, 2, 0))
    processor = FineViTImageProcessor()
    declared = processor([array], input_data_format="channels_last")
    assert torch.equal(declared["pixel_values"], processor([last])["pixel_values"])


@pytest.mark.reliability("images", "bf16 and fp16 CHW tensors", "converted to float32 first: same pixels as float32")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_decode_like_float32(dtype):
    tensor = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0)).to(dtype)
    reference = _array(to_rgb_image(tensor.float()))
    assert np.array_equal(_array(to_rgb_image(tensor)), reference)  # (C, H, W)
    assert np.array_equal(_array(to_rgb_image(tensor.permute(1, 2, 0))), reference)  # (H, W, C)
    assert reference.shape == (20, 30, 3)


# ---------------------------------------------------------------------------------------------------------------------
# max_pixels


@pytest.mark.reliability("images", "resize over a sweep of sizes and aspect ratios up to 200, down to tiny budgets",
                         "h*w <= max_pixels always (hard cap), sides multiples of the factor and >= factor")
@pytest.mark.parametrize(("factor", "min_pixels", "max_pixels"),
                         [(28, 56 * 56, 1008 * 1008), (28, 56 * 56, 56 * 56), (28, 28 * 28, 28 * 28),
                          (28, 56 * 56, 224 * 224), (32, 64 * 64, 3 * 32 * 32)])
def test_max_pixels_is_a_hard_cap(factor, min_pixels, max_pixels):
    sides = [1, 2, 5, 13, 27, 28, 29, 56, 100, 199, 200, 333, 1007, 1009, 2000, 5600, 20000]
    for height in sides:
        for width in sides:
            if max(height, width) / min(height, width) > 200:
                continue
            h, w = smart_resize(height, width, factor, min(min_pixels, max_pixels), max_pixels)
            assert h * w <= max_pixels and min(h, w) >= factor and h % factor == 0 and w % factor == 0, (height, width)
    # The extreme allowed aspect ratio used to land at 7x the budget (the `factor` floor on the short side).
    assert smart_resize(28, 5600, 28, 56 * 56, 56 * 56) == (28, 112)
    with pytest.raises(ValueError, match="below one merge group"):
        FineViTImageProcessor(min_pixels=100, max_pixels=700)
