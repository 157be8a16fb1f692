"""Build the parts of a run: model + processor (tiny or from a checkpoint), the stage's pixel budget, 4-bit
quantization, gradient checkpointing, and the trainable set (freeze policy or LoRA)."""

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from .config import MODULES, Config


logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Kept in full precision under 4/8-bit loading: the encoder, the projector and the head (pain point: quantized ViTs).
QUANTIZATION_SKIP_MODULES = ["vision_tower", "multi_modal_projector", "lm_head"]


def tokenizer_corpus_of(config: Config) -> list[str]:
    """The tokenizer corpus (`finevit_vl.corpus`) of the first `model.tokenizer_corpus_records` training records."""
    from itertools import islice

    from ..corpus import tokenizer_corpus
    from ..data import build_source

    records = (record for record, _ in build_source(config.data.train))
    return tokenizer_corpus(islice(records, config.model.tokenizer_corpus_records))


def build_once(folder: Path, accelerator, build) -> str:
    """`build(tmp_dir)` on the main process unless `folder` holds a model already (a resumed run reuses it), then
    renamed into place; every rank waits and gets the path."""
    if accelerator.is_main_process and not (folder / "config.json").exists():
        tmp_dir = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        build(tmp_dir)
        tmp_dir.rename(folder)
    accelerator.wait_for_everyone()
    return str(folder)


def ensure_tiny_init(config: Config, accelerator) -> str:
    """Build the tiny model once (main process) into `run_dir/init` and return that path; resumed runs reuse it."""
    init_dir = Path(config.run_dir) / "init"

    def build(tmp_dir: Path) -> None:
        from ..tiny import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer(tokenizer_corpus_of(config), config.model.vocab_size)
        model, processor = build_tiny_model(
            text_model_type=config.model.text_model_type,
            vision_preset=config.model.vision_preset,
            tokenizer=tokenizer,
            seed=config.seed,
            text_overrides=config.model.text_overrides or None,
            # Fixed-size encoders take their input side from the budget (native ones get it again at load).
            max_pixels=config.data.max_pixels or 224 * 224,
        )
        model.save_pretrained(tmp_dir)
        processor.save_pretrained(tmp_dir)
        logger.info("built a tiny model (%s + %s, vocab %d) into %s", config.model.vision_preset,
                    config.model.text_model_type, len(tokenizer), init_dir)

    return build_once(init_dir, accelerator, build)


ATTENTION_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                           "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def attn_implementation_for(path: str, requested: str) -> str | dict[str, str]:
    """`requested` for the whole model, except that an LLM without it (Gemma-2 has no SDPA) runs eager, with a
    warning saying so; the encoder keeps `requested`."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    text_config = AutoConfig.from_pretrained(path).get_text_config()
    flag = ATTENTION_SUPPORT_FLAGS.get(requested)
    llm_class = MODEL_MAPPING.get(type(text_config), None)
    if flag is None or llm_class is None or getattr(llm_class, flag, False):
        return requested
    logger.warning("model.attn_implementation %s: %s does not support it; its LLM runs with eager attention (the "
                   "encoder with %s)", requested, llm_class.__name__, requested)
    return {"text_config": "eager", "vision_config": requested}


def quantization_config(config: Config):
    if config.model.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if config.model.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=QUANTIZATION_SKIP_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANTIZATION_SKIP_MODULES)


def load_model(config: Config, accelerator) -> tuple[nn.Module, object, str]:
    """Model, processor and the path they were loaded from (the base for merging LoRA)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import finevit_vl  # noqa: F401  (registers the Auto classes)

    path = config.model.path if config.model.path else ensure_tiny_init(config, accelerator)
    if not (Path(path) / "config.json").exists():
        raise ValueError(f"model.path {path!r} is not a checkpoint folder (no config.json); build one with `finevit-vl build`")
    processor = AutoProcessor.from_pretrained(path)
    try:
        processor.set_pixel_budget(config.data.min_pixels, config.data.max_pixels)
    except ValueError as err:
        raise ValueError(f"data.min_pixels / data.max_pixels: {err}") from None
    kwargs = {"dtype": DTYPES[config.model.dtype]}
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = attn_implementation_for(path, config.model.attn_implementation)
    quantization = quantization_config(config)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": accelerator.local_process_index}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if quantization is not None and not torch.cuda.is_available():
        # bitsandbytes 0.50 on CPU repacks 4-bit weights for AVX512-BF16 inference the first time a layer runs in eval
        # mode; that layout has no autograd, so gradients would stop flowing after the first held-out evaluation.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model, processor, path


def prepare_trainable(model: nn.Module, config: Config) -> nn.Module:
    """Gradient checkpointing, then the trainable set: LoRA adapters (+ `modules_to_save`) or the freeze policy."""
    from .freeze import apply_freeze

    if config.model.quantization:
        from peft import prepare_model_for_kbit_training

        # Checkpointing is enabled below, non-reentrant (the reentrant variant loses gradients of frozen inputs).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
    if not config.lora.enabled:
        apply_freeze(model, config.modules)
        return model
    from peft import LoraConfig, get_peft_model

    full = [name for name in MODULES if name != "language_model" and getattr(config.modules, name).train]
    lora = LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules, modules_to_save=full or None,
    )
    model = get_peft_model(model, lora)
    apply_freeze(model)  # modules_to_save copies the encoder's unused pooling head too
    return model


__all__ = ["QUANTIZATION_SKIP_MODULES", "build_once", "ensure_tiny_init", "load_model", "prepare_trainable", "tokenizer_corpus_of"]
