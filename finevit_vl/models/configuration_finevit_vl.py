# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""FineViT-VL configuration: a vision encoder (FineViT or a supported transformers tower), a projector and any causal
LLM."""

from typing import ClassVar

from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from .configuration_finevit import FineViTConfig
from .vision_tower_specs import vision_tower_spec


class FineViTVLConfig(PreTrainedConfig):
    r"""
    Configuration of a FineViT-VL model: `vision_config` is a [`FineViTConfig`] or the config of a supported
    transformers vision tower (SigLIP, SigLIP2 NaFlex, Qwen2-VL / Qwen2.5-VL, CLIP, DINOv2: see
    `vision_tower_specs.py`), `text_config` is the config of ANY causal language model known to `AutoConfig`.

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*): the encoder configuration; a dict keeps its own
            `model_type` (FineViT when it has none).
        text_config (`PreTrainedConfig` or `dict`, *optional*): the LLM configuration (`model_type` selects the class).
        image_token_id (`int`, *optional*): vocabulary id of the image placeholder token.
        vision_feature_layer (`int` or `list[int]`, *optional*, defaults to -1): encoder layer(s) fed to the
            projector. -1 is the tower's `last_hidden_state` (FineViT: the final, normed output); other indices select
            `hidden_states[i]` (0: patch embeddings, i: output of block i); several layers are concatenated along the
            channel axis.
        spatial_merge_size (`int`, *optional*, defaults to 2): side of the patch group merged into one LLM token
            (1 disables merging).
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`): activation of the 2-layer MLP projector.
        projector_intermediate_size (`int`, *optional*): hidden size of the projector MLP; defaults to the LLM width.
        projector_position_frequencies (`int`, *optional*, defaults to 0): when > 0, the projector adds a learned
            projection of Fourier features (this many frequencies per axis) of each image token's normalised (row,
            col) centre. Off by default (the paper's projector is a plain 2-layer MLP); it makes absolute box
            coordinates much easier to learn for small LLMs.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): copied from `text_config` when it ties.

    Example:

    ```python
    >>> from transformers import AutoConfig
    >>> from finevit_vl import FineViTConfig, FineViTVLConfig
    >>> config = FineViTVLConfig(vision_config=FineViTConfig.from_preset("finevit-0.86b"),
    ...                          text_config=AutoConfig.for_model("qwen3"))
    ```"""

    model_type: ClassVar[str] = "finevit_vl"
    sub_configs_defaults: ClassVar[dict] = {
        "vision_config": FineViTConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    vision_feature_layer: int | list[int] = -1
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    projector_intermediate_size: int | None = None
    projector_position_frequencies: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict) and self.vision_config.get("model_type", "finevit") != "finevit":
            vision = dict(self.vision_config)
            self.vision_config = AutoConfig.for_model(vision.pop("model_type"), **vision)
        super().__post_init__(**kwargs)
        spec = vision_tower_spec(self.vision_config.model_type)
        # The v5 tying code reads the OUTER config; text configs of many LLMs carry the flag themselves.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.spatial_merge_size < 1:
            raise ValueError(f"spatial_merge_size must be >= 1, got {self.spatial_merge_size}")
        if spec.merge_size_key and getattr(self.vision_config, spec.merge_size_key) != self.spatial_merge_size:
            # The encoder orders patches by merge group; both sides must agree for the merge to be a reshape.
            setattr(self.vision_config, spec.merge_size_key, self.spatial_merge_size)
        layers = [self.vision_feature_layer] if isinstance(self.vision_feature_layer, int) else self.vision_feature_layer
        num_layers = spec.num_layers(self.vision_config)
        for layer in layers:
            if not -num_layers - 1 <= layer <= num_layers:
                raise ValueError(f"vision_feature_layer {layer} out of range for a {num_layers}-layer encoder")


__all__ = ["FineViTVLConfig"]
