# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Build a vision tower from its config, and run it: any tower's output -> packed patch features on a known grid.

Every adapter returns `(features, grid_thw)`: features of shape `(sum_i t_i * H_i * W_i, D)` in merge-group-major
order (each `m x m` group contiguous, groups row-major), where `(t_i, H_i, W_i)` is the image's patch grid padded to
a multiple of the merge size `m` (zero features fill the padding). The projector's merge is then a reshape, whatever
the tower.
"""

import importlib

import torch
from torch.nn import functional as F
from transformers.models.auto import AutoModel

from .vision_tower_specs import VisionTowerSpec, merged_grid_thw, vision_tower_spec


def vision_tower_class(config) -> type:
    """FineViT, the class the spec names, or the class `AutoModel` maps the config to."""
    spec = vision_tower_spec(config.model_type)
    if config.model_type == "finevit":
        from .modeling_finevit import FineViTModel

        return FineViTModel
    if spec.model_class is not None:
        module_name, class_name = spec.model_class.split(":")
        return getattr(importlib.import_module(module_name), class_name)
    return AutoModel._model_mapping[type(config)]


def freeze_unused_modules(tower: torch.nn.Module) -> torch.nn.Module:
    """Freeze what the spec says a VL model never runs (so DDP / FSDP see no parameter without a gradient)."""
    for name in vision_tower_spec(tower.config.model_type).unused_modules:
        parent, _, leaf = name.rpartition(".")
        unused = getattr(tower.get_submodule(parent) if parent else tower, leaf, None)
        if unused is not None:  # absent in some configurations (SigLIP without `vision_use_head`)
            unused.requires_grad_(False)
    return tower


def build_vision_tower(config) -> torch.nn.Module:
    """A randomly initialised tower for a vision config, its unused modules frozen."""
    tower_class = vision_tower_class(config)
    tower = tower_class(config) if config.model_type == "finevit" else tower_class._from_config(config)
    return freeze_unused_modules(tower)


def _select(outputs, layers: list[int], spec: VisionTowerSpec) -> torch.Tensor:
    """Features of the requested layers (-1: the tower's `last_hidden_state`), concatenated along channels."""
    selected = []
    for layer in layers:
        if layer == -1:
            selected.append(outputs.last_hidden_state)
            continue
        hidden_states = outputs.hidden_states
        index = layer if spec.hidden_states_include_embeddings or layer < 0 else layer - 1
        if index < -len(hidden_states) or index >= len(hidden_states):
            raise ValueError(f"vision_feature_layer {layer} is out of range for this tower's hidden states")
        selected.append(hidden_states[index])
    return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)


def _grid_to_merge_order(features: torch.Tensor, height: int, width: int, merge_size: int) -> torch.Tensor:
    """Row-major `(h * w, D)` patch features -> zero-padded to multiples of `m`, merge-group-major `(H * W, D)`."""
    grid = features.reshape(height, width, -1)
    pad_h, pad_w = -height % merge_size, -width % merge_size
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = grid.shape[0] // merge_size, grid.shape[1] // merge_size
    grid = grid.reshape(rows, merge_size, cols, merge_size, -1).permute(0, 2, 1, 3, 4)
    return grid.reshape(rows * cols * merge_size * merge_size, -1)


def _qwen2_5_window_order_restored(tower, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    # Qwen2.5-VL's tower permutes merge groups into attention windows and only un-permutes its own merger output.
    from transformers.vision_utils import get_vision_window_index

    config = tower.config
    window_index, _ = get_vision_window_index(grid_thw, config.spatial_merge_size, config.window_size, config.patch_size)
    unit = config.spatial_merge_size**2
    groups = features.reshape(-1, unit, features.shape[-1])
    return groups[torch.argsort(window_index)].reshape(-1, features.shape[-1])


def encode_images(
    tower: torch.nn.Module,
    image_inputs: dict[str, torch.Tensor],
    layers: list[int],
    merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `tower` on what its processor emitted; returns `(features, padded grid_thw)` (see the module docstring).

    Args:
        image_inputs: `pixel_values` and `image_grid_thw`, plus `pixel_attention_mask` / `spatial_shapes` (NaFlex).
        layers: feature layers (-1: the tower's `last_hidden_state`).
        merge_size: side `m` of the projector's merge.
    """
    config = tower.config
    spec = vision_tower_spec(config.model_type)
    pixel_values, grid_thw = image_inputs["pixel_values"], image_inputs["image_grid_thw"]
    hidden = any(layer != -1 for layer in layers)
    if spec.input_kind == "packed":
        if config.model_type == "finevit":
            outputs = tower(pixel_values, grid_thw, output_hidden_states=hidden, return_pooled=False, return_dict=True)
        else:
            outputs = tower(hidden_states=pixel_values, grid_thw=grid_thw, output_hidden_states=hidden)
        features = _select(outputs, layers, spec)
        if config.model_type == "qwen2_5_vl_vision":
            features = _qwen2_5_window_order_restored(tower, features, grid_thw)
        if not torch.equal(merged_grid_thw(grid_thw, merge_size), grid_thw):
            raise ValueError(f"packed grids must be multiples of the merge size {merge_size}, got {grid_thw.tolist()}")
        return features, grid_thw

    if spec.input_kind == "naflex":
        outputs = tower(
            pixel_values=pixel_values,
            pixel_attention_mask=image_inputs["pixel_attention_mask"],
            spatial_shapes=image_inputs["spatial_shapes"],
            output_hidden_states=hidden,
        )
        per_image = _select(outputs, layers, spec)  # (num_images, max_patches, D), valid patches first
    else:
        outputs = tower(pixel_values=pixel_values, output_hidden_states=hidden)
        per_image = _select(outputs, layers, spec)[:, spec.prefix_tokens(config):]
    pieces = []
    for image_features, (_, height, width) in zip(per_image, grid_thw.tolist()):
        if image_features.shape[0] < height * width:
            raise ValueError(f"the tower returned {image_features.shape[0]} patch tokens for a {height}x{width} grid")
        pieces.append(_grid_to_merge_order(image_features[: height * width], height, width, merge_size))
    return torch.cat(pieces, dim=0), merged_grid_thw(grid_thw, merge_size)


__all__ = ["build_vision_tower", "encode_images", "freeze_unused_modules", "vision_tower_class"]
