# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Which vision towers a FineViT-VL can hold, and what each one declares.

A tower is a transformers vision model (or FineViT) known by its config's `model_type`. Its spec says how it takes
images (`input_kind`), which config keys give its width and depth, how many prefix (CLS / register) tokens precede
its patch tokens, and which of its modules a VL model never uses (pooling heads, its own merger), so they are frozen.

Input kinds, one adapter each (`vision_adapters.py`):

- `"packed"`: native resolution, every image's patches concatenated with a `(num_images, 3)` `image_grid_thw`, in
  merge-group-major order (FineViT, Qwen2-VL and Qwen2.5-VL towers);
- `"naflex"`: native resolution in a padded batch, `pixel_attention_mask` + `spatial_shapes` (SigLIP2 NaFlex);
- `"fixed"`: fixed-size `(num_images, C, H, W)` pixels (SigLIP, CLIP, DINOv2), images squashed to that size by the
  tower's own image processor.

Whatever the kind, the processor emits `image_grid_thw` (the patch grid the tower sees), and an image yields
`t * ceil(h / m) * ceil(w / m)` LLM tokens for an `m x m` merge: odd grids are zero-padded at the bottom / right to a
multiple of `m` before the merge (SigLIP-384/14's 27 x 27 grid gives 14 x 14 tokens).

To add a tower, call `register_vision_tower("my_model_type", VisionTowerSpec(...))` before building the model (and
register its config / model with `AutoConfig` / `AutoModel` if transformers does not know it).
"""

from dataclasses import dataclass

import torch


INPUT_KINDS = ("packed", "naflex", "fixed")


@dataclass(frozen=True)
class VisionTowerSpec:
    """What a vision tower declares.

    Args:
        input_kind (`str`): one of `"packed"`, `"naflex"`, `"fixed"` (see the module docstring).
        hidden_size_key (`str`): config key of the width of its patch features.
        num_layers_key (`str`): config key of its number of blocks.
        num_prefix_tokens (`int`): CLS / register tokens before the patch tokens (dropped before the projector).
        register_tokens_key (`str`, *optional*): config key adding that many more prefix tokens (DINOv2 registers).
        unused_modules (`tuple[str]`): submodule or parameter names (relative to the tower) that the VL model never
            uses; their parameters are frozen.
        merge_size_key (`str`, *optional*): config key of the merge size the tower orders its patches by; kept equal
            to the VL model's `spatial_merge_size`.
        hidden_states_include_embeddings (`bool`): whether `hidden_states[0]` is the patch embedding (the transformers
            convention) or the first block's output (Qwen-VL towers record block outputs only).
        model_class (`str`, *optional*): `"module:Class"` for towers that `AutoModel` does not map.
    """

    input_kind: str
    hidden_size_key: str = "hidden_size"
    num_layers_key: str = "num_hidden_layers"
    num_prefix_tokens: int = 0
    register_tokens_key: str | None = None
    unused_modules: tuple[str, ...] = ()
    merge_size_key: str | None = None
    hidden_states_include_embeddings: bool = True
    model_class: str | None = None

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")

    def hidden_size(self, config) -> int:
        return int(getattr(config, self.hidden_size_key))

    def num_layers(self, config) -> int:
        return int(getattr(config, self.num_layers_key))

    def prefix_tokens(self, config) -> int:
        extra = int(getattr(config, self.register_tokens_key, 0) or 0) if self.register_tokens_key else 0
        return self.num_prefix_tokens + extra


VISION_TOWER_SPECS: dict[str, VisionTowerSpec] = {
    "finevit": VisionTowerSpec("packed", unused_modules=("head",), merge_size_key="spatial_merge_size"),
    "qwen2_vl_vision": VisionTowerSpec(
        "packed", hidden_size_key="embed_dim", num_layers_key="depth", unused_modules=("merger",),
        merge_size_key="spatial_merge_size", hidden_states_include_embeddings=False,
        model_class="transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel",
    ),
    "qwen2_5_vl_vision": VisionTowerSpec(
        "packed", num_layers_key="depth", unused_modules=("merger",), merge_size_key="spatial_merge_size",
        hidden_states_include_embeddings=False,
    ),
    "siglip2_vision_model": VisionTowerSpec("naflex", unused_modules=("head",)),
    "siglip_vision_model": VisionTowerSpec("fixed", unused_modules=("head",)),
    "clip_vision_model": VisionTowerSpec("fixed", num_prefix_tokens=1, unused_modules=("post_layernorm",)),
    "dinov2": VisionTowerSpec("fixed", num_prefix_tokens=1, unused_modules=("embeddings.mask_token",)),
    "dinov2_with_registers": VisionTowerSpec(
        "fixed", num_prefix_tokens=1, register_tokens_key="num_register_tokens", unused_modules=("embeddings.mask_token",)
    ),
}


def register_vision_tower(model_type: str, spec: VisionTowerSpec, exist_ok: bool = False) -> None:
    """Make a FineViT-VL accept a vision config of `model_type`."""
    if model_type in VISION_TOWER_SPECS and not exist_ok:
        raise ValueError(f"vision tower {model_type!r} is already registered")
    VISION_TOWER_SPECS[model_type] = spec


def vision_tower_spec(model_type: str) -> VisionTowerSpec:
    """The spec of a vision `model_type`; a clear error naming the supported ones otherwise."""
    try:
        return VISION_TOWER_SPECS[model_type]
    except KeyError:
        raise ValueError(
            f"vision model type {model_type!r} is not supported as a FineViT-VL encoder; supported: "
            f"{sorted(VISION_TOWER_SPECS)} (add one with finevit_vl.models.register_vision_tower)"
        ) from None


def image_grid_thw_of(image_inputs: dict, patch_size: int) -> torch.Tensor:
    """The `(num_images, 3)` patch grid the tower sees, from what its image processor emitted."""
    if "image_grid_thw" in image_inputs:
        return torch.as_tensor(image_inputs["image_grid_thw"], dtype=torch.long)
    if "spatial_shapes" in image_inputs:  # NaFlex: (h, w) in patches per image
        shapes = torch.as_tensor(image_inputs["spatial_shapes"], dtype=torch.long)
        return torch.cat([torch.ones_like(shapes[:, :1]), shapes], dim=-1)
    pixel_values = torch.as_tensor(image_inputs["pixel_values"])
    if pixel_values.ndim != 4:
        raise ValueError(f"cannot tell the patch grid of pixel_values of shape {tuple(pixel_values.shape)}")
    n, _, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"fixed-size images of {height}x{width} are not a whole number of {patch_size}px patches")
    return torch.tensor([[1, height // patch_size, width // patch_size]] * n, dtype=torch.long)


def merged_grid_thw(image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """The grid after zero-padding each side to a multiple of `merge_size`."""
    padded = image_grid_thw.clone()
    padded[:, 1:] = (padded[:, 1:] + merge_size - 1) // merge_size * merge_size
    return padded


def num_image_tokens(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """LLM tokens per image: `t * ceil(h / m) * ceil(w / m)`."""
    return (merged_grid_thw(image_grid_thw, merge_size).prod(-1) // merge_size**2).tolist()


__all__ = [
    "VISION_TOWER_SPECS",
    "VisionTowerSpec",
    "image_grid_thw_of",
    "merged_grid_thw",
    "num_image_tokens",
    "register_vision_tower",
    "vision_tower_spec",
]
