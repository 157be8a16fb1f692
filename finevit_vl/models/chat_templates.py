# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Chat templates per LLM family. Each emits one image token per `{"type": "image"}` item (the processor expands it)
and wraps assistant turns in `{% generation %}` so `return_assistant_tokens_mask=True` works."""

# `{{ image_token }}` is substituted when the template is built, so one template serves any image token string.
_CONTENT = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or item['type'] == 'image_url' -%}IMAGE_TOKEN"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}" + _CONTENT + "{{ '<|im_end|>' }}{% endgeneration %}"
    "{%- else -%}" + _CONTENT + "{{ '<|im_end|>' }}{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}" + _CONTENT + "{{ '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}" + _CONTENT + "{{ '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

# family -> (template, end-of-turn token, special tokens the tokenizer must know)
CHAT_FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "chatml": (CHATML_TEMPLATE, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": (LLAMA3_TEMPLATE, "<|eot_id|>", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}

# LLM model_type -> chat format; anything unknown falls back to ChatML (override with `chat_format=`).
MODEL_TYPE_TO_CHAT_FORMAT: dict[str, str] = {
    "qwen2": "chatml", "qwen2_moe": "chatml", "qwen3": "chatml", "qwen3_moe": "chatml", "qwen3_next": "chatml",
    "llama": "llama3", "smollm3": "chatml",
}


def chat_format_for(model_type: str, override: str | None = None) -> str:
    """The chat format of an LLM family: `override` if given, else by `model_type`, else ChatML."""
    chat_format = override or MODEL_TYPE_TO_CHAT_FORMAT.get(model_type, "chatml")
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"Unknown chat format {chat_format!r}; available: {sorted(CHAT_FORMATS)}")
    return chat_format


def build_chat_template(chat_format: str, image_token: str) -> str:
    return CHAT_FORMATS[chat_format][0].replace("IMAGE_TOKEN", image_token)


__all__ = ["CHAT_FORMATS", "MODEL_TYPE_TO_CHAT_FORMAT", "build_chat_template", "chat_format_for"]
