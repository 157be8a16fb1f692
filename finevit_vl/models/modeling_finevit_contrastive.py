# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""PyTorch FineViT Stage II: a CLIP / SigLIP-style dual encoder with FineViT as the image tower."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, CLIPTextModel, SiglipTextModel
from transformers.modeling_outputs import ModelOutput

from .configuration_finevit_contrastive import FineViTContrastiveConfig
from .modeling_finevit import FineViTModel, FineViTPreTrainedModel


# Text towers that `AutoModel` does not map (their configs belong to a dual-encoder checkpoint).
TEXT_TOWER_CLASSES: dict[str, type] = {"siglip_text_model": SiglipTextModel, "clip_text_model": CLIPTextModel}
try:  # transformers builds without SigLIP2 still load the others
    from transformers import Siglip2TextModel

    TEXT_TOWER_CLASSES["siglip2_text_model"] = Siglip2TextModel
except ImportError:  # pragma: no cover
    pass


def build_text_tower(text_config) -> nn.Module:
    """The text encoder for `text_config`: SigLIP / SigLIP2 / CLIP text models, or whatever `AutoModel` maps."""
    tower_class = TEXT_TOWER_CLASSES.get(text_config.model_type)
    return tower_class(text_config) if tower_class is not None else AutoModel.from_config(text_config)


@dataclass
class FineViTContrastiveOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*): this batch's contrastive loss (one process; training uses
        `finevit_vl.train.contrastive_loss` for negatives from every process).
    logits_per_image (`torch.FloatTensor` of shape `(num_images, num_texts)`): scaled (and biased) similarities.
    image_embeds, text_embeds (`torch.FloatTensor` of shape `(batch, projection_dim)`): L2-normalised embeddings.
    logit_scale, logit_bias (`torch.FloatTensor` of shape `()`): the log temperature and the bias, returned so that a
        loss over all processes (computed outside `forward`) takes them through the wrapped model's forward (DDP).
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None


class FineViTContrastiveModel(FineViTPreTrainedModel):
    r"""
    FineViT (patch features -> attention-pooling head) and a text tower, each projected into a shared space, with a
    learnable log temperature `logit_scale` and bias `logit_bias` (SigLIP). Follows the CLIP / SigLIP interface of
    transformers: `get_image_features`, `get_text_features`, `forward(..., return_loss=True)`.
    """

    config: FineViTContrastiveConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _no_split_modules = ["FineViTBlock"]

    def __init__(self, config: FineViTContrastiveConfig) -> None:
        super().__init__(config)
        self.vision_model = FineViTModel(config.vision_config)
        self.text_model = build_text_tower(config.text_config)
        text_width = config.text_config.projection_size if getattr(config.text_config, "projection_size", None) else (
            config.text_config.hidden_size)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            from transformers import initialization as init

            init.constant_(self.logit_scale, float(self.config.logit_scale_init))
            init.constant_(self.logit_bias, float(self.config.logit_bias_init))

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs) -> torch.Tensor:
        """Packed images -> `(num_images, projection_dim)` (not normalised)."""
        pooled = self.vision_model(pixel_values, image_grid_thw, **kwargs).pooler_output
        return self.visual_projection(pooled)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids -> `(batch, projection_dim)` (not normalised), pooled as `config.text_pooling` says."""
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooling = self.config.text_pooling
        pooled = getattr(outputs, "pooler_output", None) if pooling == "auto" else None
        if pooled is None:
            hidden = outputs.last_hidden_state
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            if pooling == "first":
                pooled = hidden[:, 0]
            elif pooling == "last":
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]
            else:
                weights = mask.to(hidden.dtype)[..., None]
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.text_projection(pooled)

    def batch_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The loss of one batch on one process (row i pairs with column i); training computes it over all processes
        with `finevit_vl.train.contrastive_loss`, which gives the same value on one process (tested)."""
        if self.config.loss_type == "sigmoid":
            labels = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
            return -F.logsigmoid(labels * logits).sum() / logits.shape[0]
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | FineViTContrastiveOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, text_len)`, *optional*): captions.
            pixel_values (`torch.Tensor` of shape `(total_patches, C * p * p)`, *optional*): packed images.
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*).
            return_loss (`bool`): compute this batch's loss (row i of images pairs with row i of texts).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        image_embeds = text_embeds = logits = loss = None
        if pixel_values is not None:
            image_embeds = F.normalize(self.get_image_features(pixel_values, image_grid_thw, **kwargs), dim=-1)
        if input_ids is not None:
            text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        if image_embeds is not None and text_embeds is not None:
            logits = image_embeds @ text_embeds.T * self.logit_scale.exp()
            if self.config.loss_type == "sigmoid":
                logits = logits + self.logit_bias
            if return_loss:
                loss = self.batch_loss(logits.float())
        if not return_dict:
            return tuple(v for v in (loss, logits, image_embeds, text_embeds) if v is not None)
        return FineViTContrastiveOutput(loss=loss, logits_per_image=logits, image_embeds=image_embeds,
                                        text_embeds=text_embeds, logit_scale=self.logit_scale, logit_bias=self.logit_bias)


__all__ = ["FineViTContrastiveModel", "FineViTContrastiveOutput", "build_text_tower"]
