# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Configuration of FineViT Stage II: image-text contrastive learning against any transformers text encoder."""

import math
from typing import ClassVar

from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from .configuration_finevit import FineViTConfig


CONTRASTIVE_LOSS_TYPES = ("sigmoid", "softmax")
TEXT_POOLING = ("auto", "mean", "first", "last")


class FineViTContrastiveConfig(PreTrainedConfig):
    r"""
    Configuration of [`FineViTContrastiveModel`]: the FineViT encoder with its attention-pooling head, a text tower
    (the config of ANY transformers text encoder: SigLIP's or SigLIP2's text model, CLIP's, a BERT), a linear
    projection of each into a shared space, and the learnable temperature (and bias) of the loss.

    Args:
        vision_config (`FineViTConfig` or `dict`, *optional*).
        text_config (`PreTrainedConfig` or `dict`, *optional*): `model_type` selects the class (default SigLIP's).
        projection_dim (`int`, *optional*, defaults to 512): width of the shared embedding space.
        loss_type (`str`, *optional*, defaults to `"sigmoid"`): `"sigmoid"` (SigLIP, the paper) or `"softmax"`
            (CLIP); `finevit_vl.train.contrastive_loss` computes both exactly over all processes.
        logit_scale_init (`float`, *optional*): initial log temperature; defaults to log(10) for sigmoid (SigLIP)
            and log(1 / 0.07) for softmax (CLIP).
        logit_bias_init (`float`, *optional*, defaults to -10.0): initial bias of the sigmoid loss (unused by softmax).
        text_pooling (`str`, *optional*, defaults to `"auto"`): how a caption becomes one vector before the
            projection: `"auto"` takes the tower's `pooler_output` when it has one (SigLIP: its head on the last
            token; CLIP: the EOS token; BERT: the pooled CLS) and the masked mean otherwise; `"mean"`, `"first"` and
            `"last"` (the last non-padding token) choose explicitly.
        initializer_range (`float`, *optional*, defaults to 0.02).
    """

    model_type: ClassVar[str] = "finevit_contrastive"
    sub_configs_defaults: ClassVar[dict] = {
        "vision_config": FineViTConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_text_model"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    loss_type: str = "sigmoid"
    logit_scale_init: float | None = None
    logit_bias_init: float = -10.0
    text_pooling: str = "auto"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.loss_type not in CONTRASTIVE_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {CONTRASTIVE_LOSS_TYPES}, got {self.loss_type!r}")
        if self.text_pooling not in TEXT_POOLING:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLING}, got {self.text_pooling!r}")
        if self.logit_scale_init is None:
            self.logit_scale_init = math.log(10.0) if self.loss_type == "sigmoid" else math.log(1 / 0.07)


__all__ = ["CONTRASTIVE_LOSS_TYPES", "FineViTContrastiveConfig"]
