# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""PyTorch FineViT: a native-resolution ViT/14 with 2D RoPE over packed, variable-size images."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .configuration_finevit import FineViTConfig


logger = logging.get_logger(__name__)


@dataclass
class FineViTModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.Tensor` of shape `(total_patches, hidden_size)`):
        Final-norm features of every patch of every image, packed in processor order.
    pooler_output (`torch.Tensor` of shape `(num_images, hidden_size)`):
        One attention-pooled embedding per image (the contrastive embedding).
    hidden_states (`tuple[torch.Tensor]`, *optional*, returned with `output_hidden_states=True`):
        `num_hidden_layers + 1` tensors of shape `(total_patches, hidden_size)`: the patch embeddings, then the output
        of each block (before the final norm).
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class FineViTRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # `F.rms_norm` normalises in fp32 whatever the input dtype (bf16 sums of squares lose too much precision at
        # width 1536) and rounds once to the input dtype: bitwise equal to `x.float() * rsqrt(mean(x.float()**2) +
        # eps)` then `.to(dtype)`, in one call (a fused kernel where torch has one).
        normed = F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normed


class FineViTMLP(nn.Module):
    """Gated (SwiGLU-style) MLP: three matrices, as the 0.86B parameter count implies."""

    def __init__(self, config: FineViTConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class FineViTPatchEmbed(nn.Module):
    """Flattened `(C, p, p)` patches -> embeddings. A Linear equals a stride-p Conv2d on packed patches, and is faster."""

    def __init__(self, config: FineViTConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class FineViTRotaryEmbedding(nn.Module):
    """Axial 2D RoPE: half of each head rotates with the patch row, half with the patch column."""

    inv_freq: torch.Tensor

    def __init__(self, config: FineViTConfig) -> None:
        super().__init__()
        self.axis_dim = config.head_dim // 2
        self.theta = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.axis_dim, 2, dtype=torch.float32) / self.axis_dim))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`position_ids` `(num_patches, 2)` of (row, col) -> `cos, sin`, each `(num_patches, 1, 1, head_dim)`, fp32.

        `sin` carries the sign of `rotate_half` (`[-sin, sin]`), so applying RoPE is `x * cos + swap_halves(x) * sin`;
        the singleton dims broadcast over (query/key, heads)."""
        # Angles are computed in fp32 whatever the model dtype: bf16 cannot represent row*freq precisely.
        freqs = position_ids.to(torch.float32)[:, :, None] * self.inv_freq.to(position_ids.device)[None, None, :]
        freqs = freqs.flatten(1)[:, None, None, :]  # (N, 2, head_dim/4) -> (N, 1, 1, head_dim/2): [rows..., cols...]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def get_vision_position_ids(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's merge-group-major order.

    Args:
        grid_thw (`torch.Tensor` of shape `(num_images, 3)`): (t, h, w) patch grid of each image.
        merge_size (`int`): side of a merge group; patches of one group are contiguous.

    Returns:
        `torch.LongTensor` of shape `(total_patches, 2)`.
    """
    position_ids = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge_size, merge_size, 1, 1).expand(-1, -1, w // merge_size, merge_size)
        cols = torch.arange(w).view(1, 1, w // merge_size, merge_size).expand(h // merge_size, merge_size, -1, -1)
        # (h/m, m, w/m, m) -> (h/m, w/m, m, m): the same permutation the processor applies to the pixels.
        rows = rows.permute(0, 2, 1, 3).reshape(-1)
        cols = cols.permute(0, 2, 1, 3).reshape(-1)
        position_ids.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(position_ids, dim=0).to(grid_thw.device)


def get_vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence lengths `(num_images + 1,)` int32, one segment per image (per frame for t > 1)."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def is_flash_attention_requested(config: FineViTConfig) -> bool:
    # Local check (not imported) so the file works across transformers 5.x minor versions.
    implementation = config._attn_implementation or ""
    return "flash_attention" in implementation or "flash-attn" in implementation


def apply_rotary_pos_emb_vision(query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries and keys together: `x * cos + rotate_half(x) * sin`, with `rotate_half(x) = [-x2, x1]` written
    as `[x2, x1] * [-sin, sin]` (the sign lives in `sin`, see [`FineViTRotaryEmbedding`]).

    Args:
        query_key (`torch.Tensor` of shape `(N, 2, heads, head_dim)`): queries and keys (a view into the qkv output).
        cos, sin (`torch.Tensor` of shape `(N, 1, 1, head_dim)`): fp32, from [`FineViTRotaryEmbedding`].

    Returns:
        `torch.Tensor` of shape `(N, 2, heads, head_dim)`, in the dtype of `query_key`: the angles and their cos/sin
        are exact fp32 values rounded once to that dtype, and a bf16 model rotates in bf16 (an fp32 round trip of
        q and k in every layer costs more than the rest of the rotation; see `benchmarks/BENCHMARKS.md`).
    """
    cos, sin = cos.to(query_key.dtype), sin.to(query_key.dtype)
    x1, x2 = query_key.chunk(2, dim=-1)
    return query_key * cos + torch.cat((x2, x1), dim=-1) * sin


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Group consecutive equal lengths: `[4, 4, 9, 4]` -> `[(4, 2), (9, 1), (4, 1)]` as (length, count)."""
    runs: list[tuple[int, int]] = []
    for length in lengths:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    return runs


class FineViTAttention(nn.Module):
    """Bidirectional self-attention over a pack of images; no token attends across images."""

    def __init__(self, config: FineViTConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        segment_runs: list[tuple[int, int]],
        max_seqlen: int,
        **kwargs,
    ) -> torch.Tensor:
        seq_length = hidden_states.shape[0]
        # (N, 3*D) -> (N, 3, heads, head_dim); queries and keys are rotated in one pass, values stay a view.
        # `split`/`unbind`, not indexing: their backward is one concatenation, where the backward of every slice would
        # zero-fill a gradient the size of the whole input.
        query_key, value = self.qkv(hidden_states).view(seq_length, 3, self.num_heads, self.head_dim).split([2, 1], 1)
        query, key = apply_rotary_pos_emb_vision(query_key, *position_embeddings).unbind(1)
        value = value.squeeze(1)
        dropout = self.attention_dropout if self.training else 0.0

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if is_flash_attention_requested(self.config):
            # One varlen kernel call over the whole pack: cu_seqlens keeps images apart.
            query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            attn_output, _ = attention_interface(
                self, query, key, value, attention_mask=None, scaling=self.scaling, dropout=dropout,
                cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen,
                is_causal=False, **kwargs,
            )
            attn_output = attn_output.reshape(seq_length, -1)
        else:
            # CPU / sdpa / eager: attend within each image. Consecutive images of equal size share one batched call,
            # which is exact (no mask) and much faster than a per-image loop for uniform batches.
            if attention_interface is sdpa_attention_forward:
                attention_interface = self._sdpa_forward
            sizes = [length * count for length, count in segment_runs]
            outputs = []
            for (length, count), *run in zip(segment_runs, query.split(sizes), key.split(sizes), value.split(sizes)):
                # (count*L, heads, hd) -> (count, heads, L, hd)
                q, k, v = (t.view(count, length, self.num_heads, self.head_dim).transpose(1, 2) for t in run)
                out, _ = attention_interface(
                    self, q, k, v, attention_mask=None, scaling=self.scaling, dropout=dropout, is_causal=False, **kwargs
                )
                outputs.append(out.reshape(length * count, -1))  # (count, L, heads, hd) -> (count*L, D)
            attn_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        return self.proj(attn_output)

    def _sdpa_forward(self, module, q, k, v, attention_mask, scaling, dropout=0.0, is_causal=False, **kwargs):
        # Direct SDPA call: the generic wrapper's mask/GQA bookkeeping is not needed for mask-free vision attention.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=False)
        return out.transpose(1, 2), None


class FineViTBlock(GradientCheckpointingLayer):
    def __init__(self, config: FineViTConfig) -> None:
        super().__init__()
        self.norm1 = FineViTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = FineViTAttention(config)
        self.norm2 = FineViTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = FineViTMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        segment_runs: list[tuple[int, int]],
        max_seqlen: int,
        **kwargs,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(
            self.norm1(hidden_states), cu_seqlens, position_embeddings, segment_runs, max_seqlen, **kwargs
        )
        return hidden_states + self.mlp(self.norm2(hidden_states))


class FineViTAttentionPoolingHead(nn.Module):
    """Multi-head attention pooling with one learned probe per image (a SigLIP-style MAP head without its MLP, which
    would add 21M parameters at 0.86B scale for no contrastive gain we know of)."""

    def __init__(self, config: FineViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.probe = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size, bias=True)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.norm = FineViTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, segment_runs: list[tuple[int, int]]) -> torch.Tensor:
        """`(total_patches, D)` -> `(num_images, D)`."""
        query = self.q_proj(self.probe).view(1, self.num_heads, 1, self.head_dim)
        key, value = self.kv_proj(hidden_states).view(-1, 2, self.num_heads, self.head_dim).unbind(1)
        sizes = [length * count for length, count in segment_runs]
        pooled = []
        for (length, count), *run in zip(segment_runs, key.split(sizes), value.split(sizes)):
            k, v = (t.view(count, length, self.num_heads, self.head_dim).transpose(1, 2) for t in run)
            out = F.scaled_dot_product_attention(query.expand(count, -1, -1, -1).to(k.dtype), k, v)
            pooled.append(out.reshape(count, -1))  # (count, heads, 1, hd) -> (count, D)
        return self.norm(self.o_proj(torch.cat(pooled, dim=0)))


class FineViTPreTrainedModel(PreTrainedModel):
    config: FineViTConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["FineViTBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FineViTAttentionPoolingHead):
            init.normal_(module.probe, std=self.config.initializer_range)
        elif isinstance(module, FineViTRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())


class FineViTModel(FineViTPreTrainedModel):
    r"""
    The FineViT encoder. Inputs are packed: all patches of all images in one sequence, with `grid_thw` giving each
    image's patch grid; attention never crosses images, so an image's features do not depend on its pack.
    """

    def __init__(self, config: FineViTConfig) -> None:
        super().__init__(config)
        self.patch_embed = FineViTPatchEmbed(config)
        self.rotary_pos_emb = FineViTRotaryEmbedding(config)
        self.blocks = nn.ModuleList([FineViTBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = FineViTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = FineViTAttentionPoolingHead(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_pooled: bool = True,
        return_dict: bool | None = None,
        visible_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | FineViTModelOutput:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(total_patches, num_channels * patch_size**2)`):
                Packed, normalised patches from [`FineViTImageProcessor`], merge-group-major within each image.
            grid_thw (`torch.LongTensor` of shape `(num_images, 3)`):
                (t, h, w) patch grid of each image (t is 1 for still images).
            output_hidden_states (`bool`, *optional*): also return every layer's patch features.
            return_pooled (`bool`, *optional*, defaults to `True`): run the attention-pooling head (skip it when only
                patch features are needed, as in the VL model).
            visible_mask (`torch.BoolTensor` of shape `(total_patches,)`, *optional*): masked image modeling: only the
                patches marked `True` enter the encoder, each keeping its own 2D-RoPE position; every image must keep
                at least one. The outputs then hold the visible patches only, in their packed order.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values.dim() != 2:
            raise ValueError(f"pixel_values must be packed as (total_patches, C*p*p), got shape {tuple(pixel_values.shape)}")
        total = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        if total != pixel_values.shape[0]:
            raise ValueError(f"grid_thw describes {total} patches but pixel_values has {pixel_values.shape[0]}")

        # Host-side bookkeeping, computed once per forward and shared by all blocks.
        cu_seqlens = get_vision_cu_seqlens(grid_thw)
        position_ids = get_vision_position_ids(grid_thw.cpu(), self.config.spatial_merge_size).to(pixel_values.device)
        if visible_mask is not None:
            if visible_mask.shape != (total,):
                raise ValueError(f"visible_mask must have shape ({total},), got {tuple(visible_mask.shape)}")
            kept = F.pad(visible_mask.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))[cu_seqlens.long()]
            if bool((kept[1:] == kept[:-1]).any()):
                raise ValueError("visible_mask hides every patch of an image; keep at least one per image")
            cu_seqlens, position_ids, pixel_values = kept, position_ids[visible_mask], pixel_values[visible_mask]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        segment_runs = equal_length_runs(lengths)
        max_seqlen = max(lengths)
        position_embeddings = self.rotary_pos_emb(position_ids)

        hidden_states = self.patch_embed(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.blocks:
            hidden_states = block(hidden_states, cu_seqlens, position_embeddings, segment_runs, max_seqlen, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        last_hidden_state = self.norm(hidden_states)
        pooled = self.head(last_hidden_state, segment_runs) if return_pooled else None

        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled, all_hidden_states) if v is not None)
        return FineViTModelOutput(last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_hidden_states)


__all__ = ["FineViTModel", "FineViTModelOutput", "FineViTPreTrainedModel"]
