"""Image processor and processor: smart resize, image modes, errors, token expansion, chat templates, round trips."""

import io

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from finevit_vl import FineViTImageProcessor
from finevit_vl.models.image_processing_finevit import smart_resize, to_rgb_image


@pytest.mark.parametrize("size", [(100, 150), (28, 28), (3000, 20), (1000, 1000), (5, 7), (2000, 3000)])
def test_smart_resize_respects_budget_factor_and_aspect(size):
    height, width = size
    h, w = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=1008 * 1008)
    assert h % 28 == 0 and w % 28 == 0
    assert h * w <= 1008 * 1008
    assert h * w >= 56 * 56  # min_pixels holds too: it only yields where it conflicts with max_pixels
    if 56 * 56 <= height * width <= 1008 * 1008 and min(height, width) >= 28:
        assert abs(h - height) <= 14 and abs(w - width) <= 14  # in budget: only rounding to the factor
    elif height * width > 1008 * 1008:
        assert abs(h / w - height / width) / (height / width) < 0.05  # large images keep their aspect ratio


def test_absurd_aspect_ratio_and_empty_images_raise_naming_the_input():
    with pytest.raises(ValueError, match="scan.png: aspect ratio"):
        smart_resize(10, 5000, name="scan.png")
    processor = FineViTImageProcessor()
    with pytest.raises(ValueError, match="image 1: aspect ratio"):
        processor([random_image(50, 50), Image.new("RGB", (6000, 20))])


def test_undecodable_and_missing_images_raise_naming_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    processor = FineViTImageProcessor()
    with pytest.raises(ValueError, match="broken.jpg: cannot decode"):
        processor([str(bad)])
    with pytest.raises(ValueError, match="missing.png: image file not found"):
        processor([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="cannot decode image bytes"):
        to_rgb_image(b"\x89PNG garbage")


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    upright = to_rgb_image(buffer.getvalue())
    assert upright.size == (30, 60)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 40), 128),
        Image.new("1", (40, 40), 1),
        Image.new("P", (40, 40), 3),
        Image.new("RGBA", (40, 40), (0, 0, 0, 0)),
        Image.new("LA", (40, 40), (0, 255)),
        Image.new("CMYK", (40, 40), (0, 255, 255, 0)),
        Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)),
        Image.new("I", (40, 40), 40000),
        Image.new("F", (40, 40), 0.5),
    ],
    ids=["L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F"],
)
def test_image_modes_become_rgb(image):
    rgb = to_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size


def test_specific_conversions_are_correct():
    assert to_rgb_image(Image.new("RGBA", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)  # on white
    assert to_rgb_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb_image(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))).getpixel((0, 0)) == (255, 255, 255)
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[..., 1] = 200
    assert to_rgb_image(array).getpixel((0, 0)) == (0, 200, 0)
    assert to_rgb_image(torch.from_numpy(array).permute(2, 0, 1)).getpixel((0, 0)) == (0, 200, 0)


def test_output_layout_and_normalisation():
    processor = FineViTImageProcessor(max_pixels=224 * 224)
    out = processor([Image.new("RGB", (150, 100), (255, 255, 255)), random_image(300, 300)])
    grids = out["image_grid_thw"]
    assert out["pixel_values"].shape == (int(grids.prod(-1).sum()), 3 * 14 * 14)
    assert (grids[:, 1:] % 2 == 0).all() and (grids[:, 1] * grids[:, 2] * 196 <= 224 * 224).all()
    n_first = int(grids[0].prod())
    torch.testing.assert_close(out["pixel_values"][:n_first], torch.ones(n_first, 588))  # white -> +1 with mean=std=0.5


def test_pil_and_torchvision_backends_agree():
    pytest.importorskip("torchvision")
    images = [random_image(100, 150, 3), random_image(300, 200, 4)]
    pil = FineViTImageProcessor(max_pixels=224 * 224)(images)
    tv = FineViTImageProcessor(max_pixels=224 * 224, backend="torchvision")(images)
    assert torch.equal(pil["image_grid_thw"], tv["image_grid_thw"])
    # Different resize kernels: close on average, not bitwise.
    assert (pil["pixel_values"] - tv["pixel_values"]).abs().mean() < 0.05


def test_processor_expands_image_tokens(tiny_qwen3, images):
    _, processor = tiny_qwen3
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert text.count(processor.image_token) == 2
    out = processor(images=[images[0], images[2]], text=[text])
    expected = (out["image_grid_thw"].prod(-1) // processor.image_processor.merge_size**2).tolist()
    assert int((out["input_ids"] == processor.image_token_id).sum()) == sum(expected)
    sizes = [(im.height, im.width) for im in (images[0], images[2])]
    assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == expected
    # Image tokens of each image are contiguous and in order.
    positions = (out["input_ids"][0] == processor.image_token_id).nonzero().flatten()
    assert positions[-1] - positions[0] + 1 == sum(expected)


def test_truncation_that_cuts_an_image_raises(tiny_qwen3, images):
    _, processor = tiny_qwen3
    text = f"{processor.image_token} describe"
    with pytest.raises(ValueError, match="truncation"):
        processor(images=[images[0]], text=[text], truncation=True, max_length=5)


def test_chat_templates_per_family(tiny_qwen3, tiny_llama):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
    ]
    chatml = tiny_qwen3[1].apply_chat_template(messages, tokenize=False)
    assert chatml == "<|im_start|>user\n<|image|>Q?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    llama = tiny_llama[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert llama == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Q?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA.<|eot_id|>"
    )
    # A Llama-3 prompt already carries BOS; the processor must not add a second one.
    ids = tiny_llama[1](text=[llama.replace("<|image|>", "")])["input_ids"][0].tolist()
    assert ids.count(tiny_llama[1].tokenizer.bos_token_id) == 1


def test_processor_save_load_round_trip(tiny_qwen3, tmp_path, images):
    from transformers import AutoProcessor

    _, processor = tiny_qwen3
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.image_processor.max_pixels == processor.image_processor.max_pixels
    text = f"{processor.image_token}hello"
    a, b = processor(images=[images[0]], text=[text]), reloaded(images=[images[0]], text=[text])
    assert all(torch.equal(a[k], b[k]) for k in a)
