"""Vision encoders by name: matched-size presets of every supported tower, their image processors, and loading.

A preset is `<family>-<size>`, where `size` is a FineViT preset suffix (`test`, `tiny`, `small`, `base`, `0.86b`): the
tower gets that preset's width, depth and heads, so encoders compared in one recipe differ in architecture and input
convention, not in size. Families:

| family           | tower (transformers model type) | input                                  | patch | prefix tokens |
|------------------|---------------------------------|----------------------------------------|-------|---------------|
| `finevit`        | `finevit`                       | native resolution, packed, 2D RoPE     | 14    | 0             |
| `qwen2-vl`       | `qwen2_vl_vision`               | native resolution, packed, 2D RoPE     | 14    | 0             |
| `qwen2.5-vl`     | `qwen2_5_vl_vision`             | native, packed, window attention       | 14    | 0             |
| `siglip2-naflex` | `siglip2_vision_model`          | native resolution, padded + mask       | 16    | 0             |
| `siglip`         | `siglip_vision_model`           | fixed size (squashed)                  | 16    | 0             |
| `clip`           | `clip_vision_model`             | fixed size (squashed)                  | 14    | 1 (CLS)       |
| `dinov2`         | `dinov2`                        | fixed size (squashed)                  | 14    | 1 (CLS)       |

Fixed-size towers get the square side nearest to `sqrt(max_pixels)` that is a multiple of `patch * merge`, so they see
about as many pixels as the native-resolution towers at the same budget.
"""

import math
import os

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Dinov2Config,
    PreTrainedConfig,
    Qwen2VLImageProcessor,
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    SiglipImageProcessor,
    SiglipVisionConfig,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

from .models import FINEVIT_PRESETS, FineViTConfig, FineViTImageProcessor
from .models.vision_adapters import build_vision_tower, freeze_unused_modules, vision_tower_class
from .models.vision_tower_specs import VISION_TOWER_SPECS, vision_tower_spec


ENCODER_FAMILIES = ("finevit", "qwen2-vl", "qwen2.5-vl", "siglip2-naflex", "siglip", "clip", "dinov2")
SIZES = tuple(name.removeprefix("finevit-") for name in FINEVIT_PRESETS)


# model_type -> what the tower is and how it takes images
TOWER_DESCRIPTIONS = {
    "finevit": "FineViT: native resolution, packed, 2D RoPE",
    "qwen2_vl_vision": "Qwen2-VL tower: native resolution, packed, 2D RoPE",
    "qwen2_5_vl_vision": "Qwen2.5-VL tower: native resolution, packed, window attention",
    "siglip2_vision_model": "SigLIP2 NaFlex: native resolution, padded + mask",
    "siglip_vision_model": "SigLIP: fixed size (squashed)",
    "clip_vision_model": "CLIP: fixed size (squashed), CLS dropped",
    "dinov2": "DINOv2: fixed size (squashed), CLS dropped",
    "dinov2_with_registers": "DINOv2 with registers: fixed size (squashed), CLS + registers dropped",
}


def describe_encoder(config: PreTrainedConfig) -> str:
    """One line on a vision tower: kind, input convention, depth, width, patch."""
    spec = vision_tower_spec(config.model_type)
    kind = TOWER_DESCRIPTIONS.get(config.model_type, config.model_type)
    size = f" {config.image_size}px" if spec.input_kind == "fixed" else ""
    return (f"{kind}{size} ({spec.num_layers(config)} layers, width {spec.hidden_size(config)}, patch "
            f"{config.patch_size})")


def encoder_presets() -> list[str]:
    return [f"{family}-{size}" for family in ENCODER_FAMILIES for size in SIZES]


def _split_preset(name: str) -> tuple[str, str]:
    for family in sorted(ENCODER_FAMILIES, key=len, reverse=True):
        size = name.removeprefix(f"{family}-")
        if name.startswith(f"{family}-") and size in SIZES:
            return family, size
    raise ValueError(f"unknown encoder preset {name!r}; presets are <family>-<size> with family in "
                     f"{list(ENCODER_FAMILIES)} and size in {list(SIZES)}")


def fixed_side(max_pixels: int, patch_size: int, merge_size: int) -> int:
    """The square input side of a fixed-size tower at a native towers' pixel budget."""
    unit = patch_size * merge_size
    return max(unit, round(math.sqrt(max_pixels) / unit) * unit)


# The family's own patch size (its released checkpoints').
NATIVE_PATCH_SIZES = {"finevit": 14, "qwen2-vl": 14, "qwen2.5-vl": 14, "siglip2-naflex": 16, "siglip": 16, "clip": 14,
                      "dinov2": 14}


def preset_config(name: str, max_pixels: int = 224 * 224, merge_size: int = 2, patch_size: int | None = None) -> PreTrainedConfig:
    """The vision config of a preset (random initialisation when built); `patch_size` replaces the family's own."""
    family, size = _split_preset(name)
    shape = FineViTConfig.from_preset(f"finevit-{size}")
    width, depth, heads = shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads
    patch = patch_size or NATIVE_PATCH_SIZES[family]
    # Two-matrix MLPs get 4x width: about the parameters of FineViT's gated 3x MLP.
    if family == "finevit":
        shape.patch_size = patch
        return shape
    if family == "qwen2-vl":
        return Qwen2VLVisionConfig(depth=depth, embed_dim=width, hidden_size=width, num_heads=heads, mlp_ratio=4,
                                   patch_size=patch, spatial_merge_size=merge_size, temporal_patch_size=2)
    if family == "qwen2.5-vl":
        return Qwen2_5_VLVisionConfig(depth=depth, hidden_size=width, out_hidden_size=width, num_heads=heads,
                                      intermediate_size=shape.intermediate_size, patch_size=patch,
                                      spatial_merge_size=merge_size, temporal_patch_size=2, window_size=112,
                                      fullatt_block_indexes=list(range(depth - 1, -1, -max(1, depth // 2)))[::-1])
    common = {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads}
    if family == "siglip2-naflex":
        # The learned position table is square (resized to each image's grid): about the budget's patch grid.
        side = max(4, round(math.sqrt(max_pixels) / patch))
        return Siglip2VisionConfig(**common, intermediate_size=4 * width, patch_size=patch, num_patches=side * side)
    if family == "siglip":
        return SiglipVisionConfig(**common, intermediate_size=4 * width, patch_size=patch,
                                  image_size=fixed_side(max_pixels, patch, merge_size))
    if family == "clip":
        return CLIPVisionConfig(**common, intermediate_size=4 * width, patch_size=patch,
                                image_size=fixed_side(max_pixels, patch, merge_size))
    return Dinov2Config(**common, mlp_ratio=4, patch_size=patch, image_size=fixed_side(max_pixels, patch, merge_size))


def tower_image_processor(config: PreTrainedConfig, max_pixels: int, min_pixels: int, merge_size: int):
    """The tower's own image processor, set to the pixel budget (native towers) or to its input size (fixed)."""
    model_type = config.model_type
    vision_tower_spec(model_type)  # a clear error for unsupported towers
    if model_type == "finevit":
        return FineViTImageProcessor(patch_size=config.patch_size, merge_size=merge_size, max_pixels=max_pixels,
                                     min_pixels=min_pixels)
    if model_type in ("qwen2_vl_vision", "qwen2_5_vl_vision"):
        return Qwen2VLImageProcessor(patch_size=config.patch_size, merge_size=merge_size,
                                     temporal_patch_size=config.temporal_patch_size,
                                     size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    if model_type == "siglip2_vision_model":
        return Siglip2ImageProcessor(patch_size=config.patch_size, max_num_patches=max(1, max_pixels // config.patch_size**2))
    side = {"height": config.image_size, "width": config.image_size}
    if model_type == "siglip_vision_model":
        return SiglipImageProcessor(size=side)
    if model_type == "clip_vision_model":
        return CLIPImageProcessor(size=side, do_center_crop=False)
    if model_type in ("dinov2", "dinov2_with_registers"):
        return BitImageProcessor(size=side, do_center_crop=False)
    raise ValueError(f"no default image processor for vision model type {model_type!r}; save one next to the tower")


def _tower_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """A full CLIP / SigLIP / SigLIP2 / Qwen-VL / FineViT-VL config -> its vision tower's config."""
    if config.model_type in VISION_TOWER_SPECS:
        return config
    vision = getattr(config, "vision_config", None)
    if vision is not None and vision.model_type in VISION_TOWER_SPECS:
        return vision
    vision_tower_spec(config.model_type)  # raises, naming the supported towers
    return config


def load_encoder(vision: str, max_pixels: int = 1008 * 1008, min_pixels: int = 56 * 56, merge_size: int = 2):
    """`(tower, image_processor)` from a checkpoint directory (a tower, a full CLIP / SigLIP model or a FineViT-VL,
    whose encoder is taken) or, randomly initialised, from a preset name."""
    if not os.path.isdir(vision):
        try:
            config = preset_config(vision, max_pixels, merge_size)
        except ValueError:
            raise ValueError(f"--vision {vision!r} is neither a directory nor an encoder preset "
                             f"(e.g. {', '.join(encoder_presets()[:: len(SIZES)])} at any size)") from None
        tower = build_vision_tower(config)
        return tower, tower_image_processor(config, max_pixels, min_pixels, merge_size)
    import finevit_vl  # noqa: F401  (registers FineViT with the Auto classes)

    full_config = AutoConfig.from_pretrained(vision)
    config = _tower_config_of(full_config)
    if full_config.model_type == "finevit_vl":
        from transformers import AutoModelForImageTextToText

        tower = AutoModelForImageTextToText.from_pretrained(vision).model.vision_tower
    else:
        tower, info = vision_tower_class(config).from_pretrained(vision, config=config, output_loading_info=True)
        if info["missing_keys"]:
            raise ValueError(f"{vision}: these encoder weights are not in the checkpoint: "
                             f"{sorted(info['missing_keys'])[:8]} (is it a {config.model_type} checkpoint?)")
        freeze_unused_modules(tower)
    has_processor = any(os.path.exists(os.path.join(vision, f)) for f in ("preprocessor_config.json", "processor_config.json"))
    if has_processor and full_config.model_type != "finevit_vl":
        image_processor = AutoImageProcessor.from_pretrained(vision)
    else:
        image_processor = tower_image_processor(tower.config, max_pixels, min_pixels, merge_size)
    return tower, image_processor


__all__ = ["ENCODER_FAMILIES", "TOWER_DESCRIPTIONS", "describe_encoder", "encoder_presets", "fixed_side", "load_encoder", "preset_config", "tower_image_processor"]
