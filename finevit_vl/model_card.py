"""Model cards for FineViT-VL checkpoints: Hugging Face front matter, usage, training summary and a results section
that `finevit-vl eval --model-card` (or the demo) fills between the `<!-- results:start/end -->` markers."""

from pathlib import Path

from .parameters import count_parameters


CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: image-text-to-text
license: apache-2.0
tags:
- finevit-vl
- vision-language
- native-resolution
---

# {name}

{description}

## Architecture

| part | configuration |
|---|---|
| vision encoder | FineViT ({vision_layers} layers, width {vision_width}, patch {patch_size}, 2D RoPE, native resolution up to {max_pixels} pixels) |
| projector | {merge}x{merge} patch merge + 2-layer MLP{position_note} |
| language model | {text_model_type} ({text_layers} layers, width {text_width}, vocabulary {vocab_size}) |
| parameters | {n_params} |

## Usage

```python
import finevit_vl  # or pass trust_remote_code=True without the package
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{path}")
processor = AutoProcessor.from_pretrained("{path}")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "How many red circles are there in the image?\\nAnswer with a single number."}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[image], text=[text], return_tensors="pt")
answer = processor.batch_decode(model.generate(**inputs, max_new_tokens=24)[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
```

Boxes are written as integers 0-1000 relative to the image size, `[x1, y1, x2, y2]`.

## Training

{training}

## Results

<!-- results:start -->
(not evaluated yet: run `finevit-vl eval --model {path} --model-card {path}/README.md`)
<!-- results:end -->
"""


def render_model_card(model, path: str, name: str, description: str, training: str) -> str:
    config = model.config
    vision, text = config.vision_config, config.text_config
    processor_pixels = getattr(model, "_finevit_max_pixels", None)
    return CARD_TEMPLATE.format(
        name=name,
        description=description,
        vision_layers=vision.num_hidden_layers,
        vision_width=vision.hidden_size,
        patch_size=vision.patch_size,
        max_pixels=processor_pixels or "the processor's budget",
        merge=config.spatial_merge_size,
        position_note=(
            f" + normalised-position features ({config.projector_position_frequencies} frequencies)"
            if config.projector_position_frequencies else ""
        ),
        text_model_type=text.model_type,
        text_layers=text.num_hidden_layers,
        text_width=text.hidden_size,
        vocab_size=text.vocab_size,
        n_params=f"{count_parameters(model) / 1e6:.2f}M",
        path=path,
        training=training,
    )


def write_model_card(model, model_dir: str | Path, name: str, description: str, training: str) -> Path:
    card = Path(model_dir) / "README.md"
    card.write_text(render_model_card(model, str(model_dir), name, description, training))
    return card


__all__ = ["CARD_TEMPLATE", "render_model_card", "write_model_card"]
