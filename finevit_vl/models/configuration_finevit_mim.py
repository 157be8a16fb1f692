# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""Configuration of FineViT Stage I: masked image modeling with a light decoder, onto teacher features or pixels."""

from typing import ClassVar

from transformers.configuration_utils import PreTrainedConfig

from .configuration_finevit import FineViTConfig


MIM_TARGETS = ("features", "pixels")
FEATURE_LOSSES = ("l2", "cosine")


class FineViTMaskedImageModelingConfig(PreTrainedConfig):
    r"""
    Configuration of [`FineViTForMaskedImageModeling`]: the FineViT encoder sees only the visible patches of each
    image; a light decoder (FineViT blocks with 2D RoPE over the full grid, a learned mask token at every hidden
    patch) predicts, at the masked positions, either a frozen teacher's patch features (`target="features"`, the
    paper's Stage I; the teacher is not part of this model) or the patch pixels (`target="pixels"`, classic MAE).

    Args:
        vision_config (`FineViTConfig` or `dict`, *optional*): the encoder being pretrained.
        target (`str`, *optional*, defaults to `"features"`): `"features"` or `"pixels"`.
        target_hidden_size (`int`, *optional*): width of the teacher's features (required for `"features"`).
        mask_ratio (`float`, *optional*, defaults to 0.75): fraction of each image's patches hidden from the encoder.
        feature_loss (`str`, *optional*, defaults to `"l2"`): `"l2"` (the paper) or `"cosine"` (EVA-02's negative
            cosine, as `1 - cos`).
        normalize_target (`bool`, *optional*, defaults to `True`): features: layer-normalise each teacher token
            (no affine) before the L2 loss; pixels: per-patch normalised pixels (MAE's `norm_pix_loss`).
        decoder_hidden_size, decoder_num_layers, decoder_num_attention_heads, decoder_intermediate_size: the decoder
            (defaults 256 / 2 / 4 / 3x width; MAE's is 512 wide and 8 deep for ViT-L).
        initializer_range (`float`, *optional*, defaults to 0.02).
    """

    model_type: ClassVar[str] = "finevit_mim"
    sub_configs_defaults: ClassVar[dict] = {"vision_config": FineViTConfig}

    vision_config: dict | PreTrainedConfig | None = None
    target: str = "features"
    target_hidden_size: int | None = None
    mask_ratio: float = 0.75
    feature_loss: str = "l2"
    normalize_target: bool = True
    decoder_hidden_size: int = 256
    decoder_num_layers: int = 2
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.target not in MIM_TARGETS:
            raise ValueError(f"target must be one of {MIM_TARGETS}, got {self.target!r}")
        if self.target == "features" and not self.target_hidden_size:
            raise ValueError("target='features' needs target_hidden_size (the teacher's feature width)")
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES}, got {self.feature_loss!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")

    @property
    def decoder_config(self) -> FineViTConfig:
        """The decoder's blocks as a FineViT config (same patch, merge and RoPE settings as the encoder)."""
        vision = self.vision_config
        return FineViTConfig(
            hidden_size=self.decoder_hidden_size,
            intermediate_size=self.decoder_intermediate_size or 3 * self.decoder_hidden_size,
            num_hidden_layers=self.decoder_num_layers,
            num_attention_heads=self.decoder_num_attention_heads,
            patch_size=vision.patch_size,
            spatial_merge_size=vision.spatial_merge_size,
            num_channels=vision.num_channels,
            rope_theta=vision.rope_theta,
            rms_norm_eps=vision.rms_norm_eps,
            hidden_act=vision.hidden_act,
        )

    @property
    def target_size(self) -> int:
        """Values predicted per masked patch."""
        if self.target == "pixels":
            return self.vision_config.num_channels * self.vision_config.patch_size**2
        return self.target_hidden_size


__all__ = ["FEATURE_LOSSES", "MIM_TARGETS", "FineViTMaskedImageModelingConfig"]
