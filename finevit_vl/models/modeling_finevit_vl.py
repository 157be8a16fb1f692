# Copyright 2026 The FineViT-VL Authors. Licensed under the Apache License, Version 2.0.
"""PyTorch FineViT-VL: vision encoder (FineViT or a supported transformers tower) -> 2x2 merge + MLP projector -> any
causal LLM."""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto import AutoModel
from transformers.utils import logging

from .configuration_finevit_vl import FineViTVLConfig
from .vision_adapters import build_vision_tower, encode_images
from .vision_tower_specs import vision_tower_spec


logger = logging.get_logger(__name__)


@dataclass
class FineViTVLModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.Tensor` of shape `(num_image_tokens, text_hidden_size)`, *optional*):
        Projected image features that replaced the image placeholder tokens.
    image_patch_features (`torch.Tensor` of shape `(total_patches, vision_feature_size)`, *optional*):
        The encoder's patch features the projector took (merge-group-major), e.g. for region self-distillation.
    """

    image_hidden_states: torch.Tensor | None = None
    image_patch_features: torch.Tensor | None = None


@dataclass
class FineViTVLCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    image_hidden_states (`torch.Tensor` of shape `(num_image_tokens, text_hidden_size)`, *optional*):
        Projected image features that replaced the image placeholder tokens.
    image_patch_features (`torch.Tensor` of shape `(total_patches, vision_feature_size)`, *optional*):
        The encoder's patch features the projector took (merge-group-major), e.g. for region self-distillation.
    """

    image_hidden_states: torch.Tensor | None = None
    image_patch_features: torch.Tensor | None = None


# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (forward arguments, outputs, generate()). The
# outputs above inherit the installed version's field; the forwards take either name and pass on that one, so saved
# checkpoints' remote code runs on both sides of the rename.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def normalized_position_features(grid_thw: torch.Tensor, merge_size: int, num_frequencies: int) -> torch.Tensor:
    """Fourier features of each merged token's centre in normalised image coordinates.

    Args:
        grid_thw (`torch.LongTensor` of shape `(num_images, 3)`): patch grid of each image.
        merge_size (`int`): side of a merge group.
        num_frequencies (`int`): frequencies `2^k * pi`, `k < num_frequencies`, per axis.

    Returns:
        `torch.Tensor` of shape `(num_image_tokens, 4 * num_frequencies)`, fp32, in merged-token order (row-major over
        the merged grid, which is the order the processor's merge-group-major patches produce).
    """
    frequencies = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
    features = []
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge_size, w // merge_size
        y = ((torch.arange(rows, dtype=torch.float32) + 0.5) / rows)[:, None].expand(rows, cols).reshape(-1, 1)
        x = ((torch.arange(cols, dtype=torch.float32) + 0.5) / cols)[None, :].expand(rows, cols).reshape(-1, 1)
        angles = torch.cat([y * frequencies, x * frequencies], dim=-1)  # (rows*cols, 2F)
        features.append(torch.cat([angles.sin(), angles.cos()], dim=-1).repeat(t, 1))
    return torch.cat(features, dim=0)


class FineViTVLPositionEncoding(nn.Module):
    """Adds a learned projection of each image token's normalised (row, col) centre to the projector output.

    FineViT's 2D RoPE is relative, so encoder features carry little absolute position, and a 1D-RoPE LLM sees image
    tokens only as a flat sequence; answering with absolute box coordinates (0-1000) then has to be inferred.
    This optional term (`projector_position_frequencies > 0`) hands the LLM normalised coordinates directly. It starts
    at zero, so enabling it on a trained model changes nothing until it is trained.
    """

    def __init__(self, num_frequencies: int, merge_size: int, text_size: int) -> None:
        super().__init__()
        self.num_frequencies = num_frequencies
        self.merge_size = merge_size
        self.weight = nn.Parameter(torch.zeros(text_size, 4 * num_frequencies))

    def forward(self, image_grid_thw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        features = normalized_position_features(image_grid_thw, self.merge_size, self.num_frequencies)
        return nn.functional.linear(features.to(self.weight.device, dtype), self.weight.to(dtype))


class FineViTVLProjector(nn.Module):
    """g(.): optional `m x m` spatial merge of neighbouring patches, then a 2-layer MLP into the LLM width.

    The processor emits each merge group contiguously, so the merge is a reshape: `(N, D) -> (N / m^2, m^2 * D)`.
    """

    def __init__(self, config: FineViTVLConfig) -> None:
        super().__init__()
        self.merge_unit = config.spatial_merge_size**2
        num_feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        vision_size = vision_tower_spec(config.vision_config.model_type).hidden_size(config.vision_config)
        input_size = vision_size * num_feature_layers * self.merge_unit
        text_size = config.text_config.hidden_size
        intermediate_size = config.projector_intermediate_size or text_size
        self.norm = nn.LayerNorm(input_size, eps=1e-6)
        self.linear_1 = nn.Linear(input_size, intermediate_size, bias=True)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(intermediate_size, text_size, bias=True)
        self.position_encoding = (
            FineViTVLPositionEncoding(config.projector_position_frequencies, config.spatial_merge_size, text_size)
            if config.projector_position_frequencies > 0
            else None
        )

    def forward(self, image_features: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        # (total_patches, D) -> (total_patches / m^2, m^2 * D)
        hidden_states = image_features.reshape(-1, image_features.shape[-1] * self.merge_unit)
        hidden_states = self.linear_2(self.act(self.linear_1(self.norm(hidden_states))))
        if self.position_encoding is not None:
            if image_grid_thw is None:
                raise ValueError("this projector adds position features and needs image_grid_thw")
            hidden_states = hidden_states + self.position_encoding(image_grid_thw, hidden_states.dtype)
        return hidden_states


class FineViTVLPreTrainedModel(PreTrainedModel):
    config: FineViTVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the vision path does host-side bookkeeping over grid_thw

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FineViTVLPositionEncoding):
            init.zeros_(module.weight)


class FineViTVLModel(FineViTVLPreTrainedModel):
    """Encoder, projector and LLM backbone (no LM head)."""

    def __init__(self, config: FineViTVLConfig) -> None:
        super().__init__(config)
        # Modules of the tower this model never runs (pooling heads, its own merger) come back frozen, so DDP / FSDP
        # see no parameters without gradients.
        self.vision_tower = build_vision_tower(config.vision_config)
        self.multi_modal_projector = FineViTVLProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encode images and project them into the LLM's embedding space.

        Args:
            pixel_values (`torch.Tensor`): what the tower's image processor emits: packed patches `(total_patches,
                C * p * p)` (FineViT, Qwen-VL), a padded batch `(num_images, max_patches, C * p * p)` (SigLIP2 NaFlex)
                or fixed-size images `(num_images, C, H, W)`.
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`): patch grid of each image.
            pixel_attention_mask, spatial_shapes (`torch.Tensor`, *optional*): the NaFlex padding mask and grids.
            vision_feature_layer (`int` or `list[int]`, *optional*): overrides `config.vision_feature_layer`.

        Returns:
            `BaseModelOutputWithPooling` whose `last_hidden_state` holds the patch features fed to the projector
            (merge-group-major, grids padded to the merge size) and whose `pooler_output` is a tuple with one
            `(num_image_tokens_i, text_hidden_size)` tensor per image.
        """
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        layers = [layer] if isinstance(layer, int) else list(layer)
        image_inputs = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        if pixel_attention_mask is not None:
            image_inputs.update(pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes)
        features, merged_grid_thw = encode_images(self.vision_tower, image_inputs, layers, self.config.spatial_merge_size)
        image_embeds = self.multi_modal_projector(features, merged_grid_thw)
        merge_unit = self.config.spatial_merge_size**2
        split_sizes = (merged_grid_thw.prod(-1) // merge_unit).tolist()
        output = BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=torch.split(image_embeds, split_sizes))
        return output if return_dict else output.to_tuple()

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Mask of image placeholder positions `(batch, seq, 1)`; raises if their count differs from the features."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            special_image_mask = (inputs_embeds == image_embedding).all(-1)
        else:
            special_image_mask = input_ids == self.config.image_token_id
        n_image_tokens = int(special_image_mask.sum())
        n_image_features = image_features.shape[0]
        if n_image_tokens != n_image_features:
            raise ValueError(
                f"Image features and image tokens do not match: the text has {n_image_tokens} image tokens but the "
                f"images produce {n_image_features} features. Build inputs with FineViTVLProcessor so each image "
                f"placeholder expands to the image's tokens (processor.num_image_tokens), and pass exactly one image per "
                f"placeholder."
            )
        return special_image_mask.unsqueeze(-1).to(inputs_embeds.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.LongTensor | None = None,
        image_token_weight: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple | FineViTVLModelOutputWithPast:
        r"""
        Args:
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*): patch grid of each image.
            pixel_attention_mask, spatial_shapes (`torch.Tensor`, *optional*): NaFlex towers' padding mask and grids.
            image_token_weight (`torch.Tensor`, *optional*): scale applied to the projected image features before
                they are scattered into the text. The trainer passes 0 for a dummy image on text-only batches so that
                every rank of a sharded engine runs the vision path (ZeRO-3 / FSDP never hang) without changing the
                result.
            mm_encoder_outputs (`dict`, *optional*): pre-computed `{"image": get_image_features(...)}` (used by
                `generate()` to encode images once, before prefill).
            past_key_values / cache (`Cache`, *optional*): the KV cache under either name (`cache` from transformers
                5.24 on).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("pixel_values were given without image_grid_thw; pass the processor's image_grid_thw too")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, image_grid_thw, pixel_attention_mask, spatial_shapes)
        image_features = None
        if image_outputs is not None:
            image_features = torch.cat(image_outputs.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            if image_token_weight is not None:
                # Dummy-image path: the features still flow through the graph (gradients of zero) but add nothing.
                inputs_embeds = inputs_embeds + (image_features.sum() * image_token_weight).to(inputs_embeds.dtype)
            else:
                special_image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
                inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **{CACHE_NAME: cache if cache is not None else past_key_values},
            **kwargs,
        )
        return FineViTVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            image_patch_features=None if image_outputs is None else image_outputs.last_hidden_state,
        )


class FineViTVLForConditionalGeneration(FineViTVLPreTrainedModel, GenerationMixin):
    r"""
    FineViT-VL with a language-modelling head.

    Example:

    ```python
    >>> import finevit_vl  # registers the Auto classes
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained("path/to/finevit-vl")
    >>> processor = AutoProcessor.from_pretrained("path/to/finevit-vl")
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    >>> text = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> inputs = processor(images=[image], text=[text], return_tensors="pt")
    >>> output_ids = model.generate(**inputs, max_new_tokens=16)
    ```"""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Keeps the encoder and projector out of bitsandbytes quantization (the quantizer skips these modules) and in fp32
    # when a checkpoint is force-loaded in fp16 (ViT activations overflow fp16).
    _keep_in_fp32_modules = ["model.vision_tower", "model.multi_modal_projector"]

    def __init__(self, config: FineViTVLConfig) -> None:
        super().__init__(config)
        self.model = FineViTVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # Tie to the LLM's own input embedding, whatever that LLM calls it (`embed_tokens`, `wte`, ...).
        embeddings = self.model.language_model.get_input_embeddings()
        name = next(n for n, module in self.model.language_model.named_modules() if module is embeddings)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}.weight"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> FineViTVLProjector:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, image_grid_thw, pixel_attention_mask, spatial_shapes, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.LongTensor | None = None,
        image_token_weight: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple | FineViTVLCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids with image tokens.
            pixel_values (`torch.Tensor`, *optional*): the tower's image-processor output (see `get_image_features`).
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*).
            pixel_attention_mask, spatial_shapes (`torch.Tensor`, *optional*): NaFlex towers only.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): LM targets, -100 ignored.
            logits_to_keep (`int` or `torch.Tensor`, *optional*): compute logits only for the last N positions.
        """
        return_dict = kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            image_grid_thw=image_grid_thw,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            image_token_weight=image_token_weight,
            mm_encoder_outputs=mm_encoder_outputs,
            cache=cache if cache is not None else past_key_values,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if softcap:  # Gemma-2 / Gemma-3 squash their logits in the head; so must we, to be the same LLM on text
            logits = torch.tanh(logits / softcap) * softcap

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)

        output = FineViTVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_patch_features=outputs.image_patch_features,
        )
        return output.to_tuple() if return_dict is False else output


__all__ = [
    "FineViTVLForConditionalGeneration",
    "FineViTVLModel",
    "FineViTVLPreTrainedModel",
    "FineViTVLProjector",
]
