"""Assemble a FineViT-VL from a vision encoder (FineViT or any supported tower: a checkpoint or a preset) and any
Hugging Face causal-LM checkpoint.

    finevit-vl build --vision path/to/finevit --llm path/to/Qwen3-1.7B --out path/to/finevit-vl
    finevit-vl build --vision path/to/siglip2-naflex --llm path/to/Qwen3-1.7B --out path/to/siglip2-vl

The LLM's weights are renamed on load (`<base_model_prefix>.*` -> `model.language_model.*`), the image token (and the
chat format's turn tokens, if missing) are added to the tokenizer, the embeddings are resized, and the result is saved
with its processor and chat template, ready for `AutoModelForImageTextToText.from_pretrained`.
"""

import argparse
import contextlib
import logging
import os
import re

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as hf_logging

from .cli import report_user_error
from .encoders import load_encoder
from .models import FineViTVLConfig, FineViTVLForConditionalGeneration, FineViTVLProcessor
from .models.chat_templates import (
    CHAT_FORMATS,
    OWN_TEMPLATE,
    build_chat_template,
    chat_format_for,
    with_image_placeholder,
)
from .models.processing_finevit_vl import DEFAULT_IMAGE_TOKEN


logger = logging.getLogger(__name__)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_format: str, image_token: str = DEFAULT_IMAGE_TOKEN) -> int:
    """Add the image token and the chat format's special tokens when missing. Returns how many tokens were added."""
    _, end_of_turn, format_tokens = CHAT_FORMATS.get(chat_format, ("", None, ()))
    vocab = tokenizer.get_vocab()
    missing = [t for t in (image_token, end_of_turn, *format_tokens) if t is not None and t not in vocab]
    missing = list(dict.fromkeys(missing))
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return len(missing)


@contextlib.contextmanager
def _quiet_transformers():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def llm_key_mapping(llm_class: type, text_config) -> dict[str, str]:
    """Checkpoint key renames from a causal LM to a FineViT-VL: the LLM class's own checkpoint renames first (GPT-NeoX
    checkpoints call the head `embed_out`), then its base model (`<base_model_prefix>.*`) to `model.language_model.*`
    and its head to `lm_head.*`. Checked on a meta-device skeleton of the LLM class, so nothing is loaded twice."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    with torch.device("meta"):
        skeleton = llm_class._from_config(text_config)
    head = skeleton.get_output_embeddings()
    head_name = next((name for name, module in skeleton.named_modules() if module is head), None)
    if head_name != "lm_head" or not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"{text_config.model_type}: the LLM's output head ({head_name}) is not a bias-free linear "
                         "`lm_head`; not supported as a FineViT-VL language model")
    mapping = {}
    for transform in get_checkpoint_conversion_mapping(llm_class.__name__) or []:
        if not isinstance(transform, WeightRenaming) or len(transform.source_patterns) != 1:
            raise ValueError(f"{llm_class.__name__} checkpoints need weight conversions FineViT-VL cannot apply")
        mapping[transform.source_patterns[0]] = transform.target_patterns[0]
    mapping[rf"^{re.escape(skeleton.base_model_prefix)}\."] = "model.language_model."
    return mapping


def build_finevit_vl(
    vision: str,
    llm: str,
    out_dir: str | None = None,
    chat_format: str | None = None,
    vision_feature_layer: int | list[int] = -1,
    spatial_merge_size: int = 2,
    max_pixels: int = 1008 * 1008,
    min_pixels: int = 56 * 56,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[FineViTVLForConditionalGeneration, FineViTVLProcessor]:
    """Build a FineViT-VL from parts; save it to `out_dir` when given.

    Args:
        vision: a vision tower checkpoint directory (FineViT, SigLIP / SigLIP2, CLIP, DINOv2, Qwen2-VL tower; a full
            CLIP / SigLIP model or a FineViT-VL, whose encoder is taken), or an encoder preset (`finevit_vl.encoders`).
        llm: any Hugging Face causal-LM checkpoint directory with its tokenizer.
        chat_format: `"own"` (the LLM's chat template, given the image placeholder), `"chatml"` or `"llama3"`; when
            omitted, the LLM's own template if its tokenizer has one, else by the LLM's `model_type`.
    """
    if not os.path.isdir(llm):
        raise ValueError(f"--llm {llm!r} is not a directory (download the checkpoint first; no hub access at build time)")
    text_config = AutoConfig.from_pretrained(llm)
    if type(text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{llm}: model_type {text_config.model_type!r} is not a causal language model")
    llm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    tokenizer = AutoTokenizer.from_pretrained(llm)
    own_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    chat_format = chat_format_for(text_config.model_type, chat_format, own_template)
    logger.info("chat template: %s", "the LLM's own, with the image placeholder" if chat_format == OWN_TEMPLATE else
                f"{chat_format} (the LLM has none of its own)" if not own_template else f"{chat_format}, as asked")
    prepare_tokenizer(tokenizer, chat_format)

    vision_tower, image_processor = load_encoder(vision, max_pixels, min_pixels, spatial_merge_size)
    config = FineViTVLConfig(
        vision_config=vision_tower.config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        spatial_merge_size=spatial_merge_size,
    )
    with _quiet_transformers():  # its load report would list the encoder and projector as MISSING; ours follows
        model, info = FineViTVLForConditionalGeneration.from_pretrained(
            llm, config=config, key_mapping=llm_key_mapping(llm_class, text_config), dtype=dtype, output_loading_info=True
        )
    # transformers remembers a user key_mapping and reverses it on save; our checkpoint must keep our own key names.
    model._weight_conversions = None
    not_from_llm = sorted(k for k in info["missing_keys"] if not k.startswith(("model.vision_tower.", "model.multi_modal_projector.")))
    if not_from_llm or info["unexpected_keys"]:
        raise ValueError(f"{llm}: the LLM's weights do not map onto the FineViT-VL: missing {not_from_llm[:8]}, unused "
                         f"{sorted(info['unexpected_keys'])[:8]} ({text_config.model_type} is not supported as it is)")
    model.model.vision_tower.load_state_dict(vision_tower.state_dict())
    new = ("model.vision_tower.", "model.multi_modal_projector.")
    from_llm = [k for k in model.state_dict() if k not in info["missing_keys"] and not k.startswith(new)]
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    logger.info("loaded: language model and head from %s (%d tensors); encoder from %s (%d tensors); projector newly "
                "initialised (%d parameters)", llm, len(from_llm), vision, len(vision_tower.state_dict()), projector)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # New rows start at the mean embedding (as resize does by default): a sane start for LoRA with saved embeddings.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    # Generation stops at the LLM's own end-of-sequence tokens (its generation config), and at our format's end of turn.
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if chat_format == OWN_TEMPLATE:
        template = with_image_placeholder(own_template, DEFAULT_IMAGE_TOKEN)
        stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    else:
        template = build_chat_template(chat_format, DEFAULT_IMAGE_TOKEN)
        stops = [tokenizer.convert_tokens_to_ids(CHAT_FORMATS[chat_format][1])]
    model.generation_config.eos_token_id = list(dict.fromkeys([*stops, *eos]))
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    processor = FineViTVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
        patch_size=vision_tower.config.patch_size, merge_size=spatial_merge_size,
    )
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finevit-vl build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision", required=True,
                        help="vision tower checkpoint dir (FineViT, SigLIP/SigLIP2, CLIP, DINOv2, Qwen2-VL tower) or an "
                             "encoder preset such as finevit-tiny or siglip2-naflex-tiny")
    parser.add_argument("--llm", required=True, help="HF causal-LM checkpoint dir (with tokenizer)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--chat-format", choices=[OWN_TEMPLATE, *sorted(CHAT_FORMATS)], default=None,
                        help="chat template: the LLM's own (default when it has one) or ours (ChatML / Llama 3)")
    parser.add_argument("--vision-feature-layer", type=int, nargs="+", default=[-1],
                        help="encoder layer(s) fed to the projector (-1: the last; several are concatenated)")
    parser.add_argument("--merge-size", type=int, default=2, help="side of the patch group merged into one LLM token")
    parser.add_argument("--max-pixels", type=int, default=1008 * 1008,
                        help="pixel budget per image of native-resolution encoders (fixed-size ones: their input size)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype the model is saved in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layer = args.vision_feature_layer[0] if len(args.vision_feature_layer) == 1 else args.vision_feature_layer
    try:
        model, _ = build_finevit_vl(
            args.vision, args.llm, args.out, chat_format=args.chat_format, vision_feature_layer=layer,
            spatial_merge_size=args.merge_size, max_pixels=args.max_pixels, dtype=getattr(torch, args.dtype),
        )
    except (ValueError, OSError) as error:  # a user's mistake (paths, unsupported parts): a message, no traceback
        return report_user_error("build", error)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved FineViT-VL ({n_params / 1e6:.1f}M parameters) to {args.out}")
    return 0


__all__ = ["build_finevit_vl", "llm_key_mapping", "prepare_tokenizer"]
