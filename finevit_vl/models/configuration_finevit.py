# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""FineViT vision encoder configuration."""

from typing import ClassVar

from transformers.configuration_utils import PreTrainedConfig


# Named presets. `finevit-0.86b` follows the paper (28 layers, width 1536, gated MLP 4608, 16 heads of 96);
# the tiny presets exist for tests, demos and benchmarks on CPU.
FINEVIT_PRESETS: dict[str, dict] = {
    "finevit-0.86b": {"hidden_size": 1536, "intermediate_size": 4608, "num_hidden_layers": 28, "num_attention_heads": 16},
    "finevit-base": {"hidden_size": 768, "intermediate_size": 2304, "num_hidden_layers": 12, "num_attention_heads": 12},
    "finevit-small": {"hidden_size": 384, "intermediate_size": 1152, "num_hidden_layers": 12, "num_attention_heads": 6},
    "finevit-tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4},
    "finevit-test": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
}


class FineViTConfig(PreTrainedConfig):
    r"""
    Configuration of the FineViT native-resolution vision encoder: a pre-norm ViT/14 with 2D rotary position
    embeddings over (row, col) patch coordinates, a gated (SwiGLU) MLP and RMSNorm, and an attention-pooling head.

    Args:
        hidden_size (`int`, *optional*, defaults to 1536): width of the transformer.
        intermediate_size (`int`, *optional*, defaults to 4608): hidden size of the gated MLP.
        num_hidden_layers (`int`, *optional*, defaults to 28): number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 16): attention heads per block.
        num_channels (`int`, *optional*, defaults to 3): input channels.
        patch_size (`int`, *optional*, defaults to 14): side of a square patch in pixels.
        spatial_merge_size (`int`, *optional*, defaults to 2): side of the patch group merged by the VL projector;
            patches arrive grouped so that each merge group is contiguous, and positions follow that order.
        native_image_size (`int`, *optional*, defaults to 448): the side the encoder was trained at (documentation
            and default processor budget only; the encoder itself accepts any multiple of the patch size).
        hidden_act (`str`, *optional*, defaults to `"silu"`): activation of the gated MLP.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of the RMSNorm layers.
        attention_dropout (`float`, *optional*, defaults to 0.0): dropout on attention probabilities in training.
        rope_theta (`float`, *optional*, defaults to 10000.0): base of the 2D rotary embedding.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal initializer.

    Example:

    ```python
    >>> from finevit_vl import FineViTConfig, FineViTModel
    >>> config = FineViTConfig.from_preset("finevit-0.86b")
    >>> model = FineViTModel(config)
    ```"""

    model_type: ClassVar[str] = "finevit"
    base_config_key: ClassVar[str] = "vision_config"

    hidden_size: int = 1536
    intermediate_size: int = 4608
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    native_image_size: int = 448
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        # 2D RoPE splits each head into a row half and a column half, each rotated in pairs.
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(f"head dim {self.hidden_size // self.num_attention_heads} must be a multiple of 4 for 2D RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FineViTConfig":
        """Build a config from a named preset (see `FINEVIT_PRESETS`), with optional field overrides."""
        if name not in FINEVIT_PRESETS:
            raise ValueError(f"Unknown FineViT preset {name!r}; available: {sorted(FINEVIT_PRESETS)}")
        return cls(**{**FINEVIT_PRESETS[name], **overrides})


__all__ = ["FINEVIT_PRESETS", "FineViTConfig"]
