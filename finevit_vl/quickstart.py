"""`finevit-vl quickstart`: the demo (placeholder until the full pipeline lands): build a tiny FineViT-VL, save it,
reload it through the Auto classes and generate from an image."""

import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finevit-vl quickstart")
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    import finevit_vl  # noqa: F401  (registers the Auto classes)
    from finevit_vl.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint(os.path.join(args.out, "model"), seed=args.seed)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    image = Image.new("RGB", (168, 112), "white")
    draw = ImageDraw.Draw(image)
    for i in range(3):
        draw.ellipse((10 + 50 * i, 40, 40 + 50 * i, 70), fill="red")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text])
    torch.manual_seed(args.seed)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    print(f"saved a tiny random FineViT-VL to {path}; reloaded via AutoModelForImageTextToText; generated: {answer!r}")
    return 0
