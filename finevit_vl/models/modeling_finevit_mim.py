# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""PyTorch FineViT Stage I: masked image modeling over packed, variable-size images."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput

from .configuration_finevit_mim import FineViTMaskedImageModelingConfig
from .modeling_finevit import (
    FineViTBlock,
    FineViTModel,
    FineViTPreTrainedModel,
    FineViTRMSNorm,
    FineViTRotaryEmbedding,
    equal_length_runs,
    get_vision_cu_seqlens,
    get_vision_position_ids,
)


@dataclass
class FineViTMaskedImageModelingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*): mean of `patch_losses` (when targets were available).
    patch_losses (`torch.FloatTensor` of shape `(num_masked,)`, *optional*): the loss of every masked patch, fp32, so
        that a trainer can normalise over a whole global batch.
    predictions (`torch.FloatTensor` of shape `(num_masked, target_size)`): the decoder's output at the masked patches,
        in packed order.
    """

    loss: torch.Tensor | None = None
    patch_losses: torch.Tensor | None = None
    predictions: torch.Tensor | None = None


def normalized_patch_pixels(pixel_values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's `norm_pix_loss` target: each patch's values standardised by their own mean and variance."""
    pixels = pixel_values.float()
    mean, var = pixels.mean(-1, keepdim=True), pixels.var(-1, keepdim=True)
    return (pixels - mean) / (var + eps).sqrt()


class FineViTMaskedDecoder(nn.Module):
    """FineViT blocks over every patch of each image: the encoder's visible features and a learned mask token at the
    hidden patches, each at its own 2D-RoPE position."""

    def __init__(self, config: FineViTMaskedImageModelingConfig) -> None:
        super().__init__()
        decoder_config = config.decoder_config
        decoder_config._attn_implementation = config.vision_config._attn_implementation
        self.embed = nn.Linear(config.vision_config.hidden_size, decoder_config.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(decoder_config.hidden_size))
        self.rotary_pos_emb = FineViTRotaryEmbedding(decoder_config)
        self.blocks = nn.ModuleList([FineViTBlock(decoder_config) for _ in range(decoder_config.num_hidden_layers)])
        self.norm = FineViTRMSNorm(decoder_config.hidden_size, eps=decoder_config.rms_norm_eps)
        self.head = nn.Linear(decoder_config.hidden_size, config.target_size)
        self.merge_size = decoder_config.spatial_merge_size

    def forward(self, visible_features: torch.Tensor, visible_mask: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """`(num_visible, D)` encoder features -> predictions `(num_masked, target_size)` at the hidden patches."""
        embedded = self.embed(visible_features)
        hidden_states = self.mask_token.to(embedded.dtype).expand(visible_mask.shape[0], -1)
        hidden_states = hidden_states.masked_scatter(visible_mask[:, None], embedded)
        cu_seqlens = get_vision_cu_seqlens(grid_thw)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        position_ids = get_vision_position_ids(grid_thw.cpu(), self.merge_size).to(hidden_states.device)
        position_embeddings = self.rotary_pos_emb(position_ids)
        segment_runs = equal_length_runs(lengths)
        for block in self.blocks:
            hidden_states = block(hidden_states, cu_seqlens, position_embeddings, segment_runs, max(lengths))
        return self.head(self.norm(hidden_states[~visible_mask]))


class FineViTForMaskedImageModeling(FineViTPreTrainedModel):
    r"""
    FineViT with a masked-modeling decoder (Stage I). The encoder runs on the visible patches only (the speed-up of
    MAE: a quarter of the tokens at the default 75% ratio); the decoder predicts the hidden ones. The encoder's
    attention-pooling head is not used in this stage (it is trained in Stage II).

    Hand-off: `vision_model` is a plain [`FineViTModel`]; Stage II and the VL model take its weights
    (`finevit_vl.train.handoff`) and drop the decoder.
    """

    config: FineViTMaskedImageModelingConfig
    _no_split_modules = ["FineViTBlock"]

    def __init__(self, config: FineViTMaskedImageModelingConfig) -> None:
        super().__init__(config)
        self.vision_model = FineViTModel(config.vision_config)
        self.decoder = FineViTMaskedDecoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FineViTMaskedDecoder):
            init.normal_(module.mask_token, std=self.config.initializer_range)

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        visible_mask: torch.Tensor,
        target_features: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | FineViTMaskedImageModelingOutput:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(total_patches, C * p * p)`): every patch, packed (processor order).
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`).
            visible_mask (`torch.BoolTensor` of shape `(total_patches,)`): `True` where the encoder sees the patch.
            target_features (`torch.Tensor` of shape `(total_patches, target_hidden_size)`, *optional*): the
                teacher's features at every patch, on the student's grid and in its order (`target="features"`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.vision_model(pixel_values, image_grid_thw, return_pooled=False, visible_mask=visible_mask,
                                    **kwargs).last_hidden_state
        predictions = self.decoder(encoded, visible_mask, image_grid_thw)
        patch_losses = None
        masked = ~visible_mask
        if self.config.target == "pixels":
            target = pixel_values[masked].float()
            target = normalized_patch_pixels(target) if self.config.normalize_target else target
        else:
            target = None if target_features is None else target_features[masked].float()
            if target is not None and self.config.normalize_target and self.config.feature_loss == "l2":
                target = F.layer_norm(target, target.shape[-1:])
        if target is not None:
            predicted = predictions.float()
            if self.config.target == "features" and self.config.feature_loss == "cosine":
                patch_losses = 1.0 - F.cosine_similarity(predicted, target, dim=-1)
            else:
                patch_losses = (predicted - target).pow(2).mean(-1)
        loss = None if patch_losses is None else patch_losses.mean()
        if not return_dict:
            return tuple(v for v in (loss, patch_losses, predictions) if v is not None)
        return FineViTMaskedImageModelingOutput(loss=loss, patch_losses=patch_losses, predictions=predictions)


__all__ = ["FineViTForMaskedImageModeling", "FineViTMaskedImageModelingOutput", "normalized_patch_pixels"]
