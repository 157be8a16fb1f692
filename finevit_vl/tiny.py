"""Tiny FineViT-VL models and tokenizers built locally (no downloads), for tests, the demo and benchmarks.

The loading path stays the real one: `save_tiny_checkpoint` writes an ordinary checkpoint directory that
`AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` read, exactly as for real weights.
"""

import os
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from . import prompts
from .encoders import preset_config, tower_image_processor
from .models import (
    FineViTVLConfig,
    FineViTVLForConditionalGeneration,
    FineViTVLProcessor,
)
from .models.chat_templates import CHAT_FORMATS, build_chat_template, chat_format_for
from .models.processing_finevit_vl import DEFAULT_IMAGE_TOKEN


# Every tiny tokenizer knows the special tokens of all chat formats, so one tokenizer serves Qwen- and Llama-style LLMs.
TINY_SPECIAL_TOKENS: list[str] = ["<|endoftext|>", DEFAULT_IMAGE_TOKEN] + sorted(
    {token for _, end, tokens in CHAT_FORMATS.values() for token in (end, *tokens)}
)

TINY_TEXT_CONFIGS: dict[str, dict] = {
    "qwen3": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "rope_theta": 10000.0},
}

_DEFAULT_CORPUS = [
    prompts.CAPTION, prompts.BOX_TO_CAPTION, prompts.CAPTION_TO_BOX, prompts.BOX_TO_OCR, prompts.OCR_TO_BOX,
    prompts.READ_ALL_TEXT, prompts.SHORT_ANSWER, prompts.COUNT_QUESTION, prompts.NUMBER_ANSWER,
    "user assistant system the a an of in on and is are there how many what which where red green blue yellow",
    "circle square triangle circles squares triangles bar chart document total date invoice value text word",
    "0 1 2 3 4 5 6 7 8 9 [ ] , . : ? ! ( ) - + / = % $ # @ & * ' \"",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, digits split one by one (coordinates and counts tokenise
    uniformly), with the chat and image special tokens. Every byte is in the vocabulary, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(corpus or []) + _DEFAULT_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|begin_of_text|>",
        additional_special_tokens=[t for t in TINY_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|begin_of_text|>")],
        add_bos_token=False,
    )


def build_tiny_model(
    text_model_type: str = "qwen3",
    vision_preset: str = "finevit-test",
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
    tie_word_embeddings: bool = False,
    max_pixels: int = 224 * 224,
    min_pixels: int = 56 * 56,
    chat_format: str | None = None,
    **vl_overrides,
) -> tuple[FineViTVLForConditionalGeneration, FineViTVLProcessor]:
    """A randomly initialised tiny FineViT-VL and its processor. `vision_preset` names any encoder preset
    (`finevit_vl.encoders`: `finevit-test`, `siglip2-naflex-tiny`, `qwen2-vl-tiny`, ...)."""
    if text_model_type not in TINY_TEXT_CONFIGS and text_overrides is None:
        raise ValueError(f"No tiny text config for {text_model_type!r}; known: {sorted(TINY_TEXT_CONFIGS)}")
    tokenizer = tokenizer or build_tokenizer()
    chat_format = chat_format_for(text_model_type, chat_format)
    end_of_turn = CHAT_FORMATS[chat_format][1]
    text_config = AutoConfig.for_model(
        text_model_type,
        **{**TINY_TEXT_CONFIGS.get(text_model_type, {}), **(text_overrides or {})},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(end_of_turn),
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    merge_size = vl_overrides.get("spatial_merge_size", 2)
    vision_overrides = dict(vision_overrides or {})
    vision_config = preset_config(vision_preset, max_pixels, merge_size, vision_overrides.pop("patch_size", None))
    for key, value in vision_overrides.items():
        setattr(vision_config, key, value)
    config = FineViTVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        tie_word_embeddings=tie_word_embeddings,
        **vl_overrides,
    )
    torch.manual_seed(seed)
    model = FineViTVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(end_of_turn), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = tower_image_processor(vision_config, max_pixels, min_pixels, config.spatial_merge_size)
    processor = FineViTVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=build_chat_template(chat_format, DEFAULT_IMAGE_TOKEN),
        patch_size=vision_config.patch_size, merge_size=config.spatial_merge_size,
    )
    return model.eval(), processor


def save_tiny_checkpoint(out_dir: str | os.PathLike, text_model_type: str = "qwen3", seed: int = 0, **kwargs) -> str:
    """Build a tiny random FineViT-VL (see `build_tiny_model`) and save model + processor to `out_dir`."""
    model, processor = build_tiny_model(text_model_type=text_model_type, seed=seed, **kwargs)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


__all__ = ["TINY_SPECIAL_TOKENS", "TINY_TEXT_CONFIGS", "build_tiny_model", "build_tokenizer", "save_tiny_checkpoint"]
