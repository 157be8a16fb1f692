# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Chat templates: the LLM's own, given the image placeholder; ChatML / Llama 3 for LLMs that have none.

Every template emits one image token per `{"type": "image"}` item (the processor expands it). Ours wrap assistant turns
in `{% generation %}` (so `return_assistant_tokens_mask=True` works); an LLM's own template usually does not, and the
sample encoder then finds the assistant turns by rendering the conversation turn by turn.
"""

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


# The LLM's own chat template (its tokenizer's), given the image placeholder.
OWN_TEMPLATE = "own"


def chat_format_for(model_type: str, override: str | None = None, own_template: str | None = None) -> str:
    """`override` if given; else the LLM's own template when it has one (`"own"`); else ChatML or Llama 3 by
    `model_type` (ChatML for families not listed)."""
    if override == OWN_TEMPLATE and not own_template:
        raise ValueError("chat format 'own' needs an LLM whose tokenizer has a chat template; this one has none")
    chat_format = override or (OWN_TEMPLATE if own_template else MODEL_TYPE_TO_CHAT_FORMAT.get(model_type, "chatml"))
    if chat_format not in (OWN_TEMPLATE, *CHAT_FORMATS):
        raise ValueError(f"Unknown chat format {chat_format!r}; available: {[OWN_TEMPLATE, *sorted(CHAT_FORMATS)]}")
    return chat_format


def build_chat_template(chat_format: str, image_token: str) -> str:
    return CHAT_FORMATS[chat_format][0].replace("IMAGE_TOKEN", image_token)


# Put before an LLM's own template: list contents become strings, an image item becoming the image token, so any
# template (most only print string contents) places the image where the user put it.
_FLATTEN_CONTENT = (
    "{%- set flattened = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string or message['content'] is none -%}"
    "{%- set flattened.messages = flattened.messages + [message] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or item['type'] == 'image_url' -%}{%- set text.value = text.value + 'IMAGE_TOKEN' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set text.value = text.value + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flattened.messages = flattened.messages + [dict(message, content=text.value)] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = flattened.messages -%}"
)


def with_image_placeholder(template: str, image_token: str) -> str:
    """An LLM's own chat template, taking `{"type": "image"}` content items as the image token."""
    return _FLATTEN_CONTENT.replace("IMAGE_TOKEN", image_token) + template


__all__ = [
    "CHAT_FORMATS",
    "MODEL_TYPE_TO_CHAT_FORMAT",
    "OWN_TEMPLATE",
    "build_chat_template",
    "chat_format_for",
    "with_image_placeholder",
]
