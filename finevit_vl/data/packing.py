"""Multimodal sequence packing: several samples per row up to a token budget, with no attention across samples.

A packed row concatenates samples; `collate_rows` restarts `position_ids` at every sample and records `segment_ids`.
Packed rows go to the LLM with `position_ids` and no `attention_mask`: transformers (5.2x, without a KV cache, so
`use_cache=False`) finds the sequences from the restarts and keeps them apart with every attention implementation:
flash-attention runs its varlen kernel, sdpa / eager get the block-diagonal causal mask built by `create_causal_mask`.
Padding restarts its positions too, so it forms one more sequence of its own. Measured for Qwen3, Qwen2, Llama,
Mistral, Gemma, Gemma-2, Gemma-3, Phi-3, GPT-2 and GPT-NeoX: the same logits as an explicit block mask.

The images of all samples of a micro-batch go through the encoder as one pack (the model concatenates them), so a
packed micro-batch costs one encoder call and one LLM call.
"""

import torch


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group sample indices into rows of total length <= `max_length` (first-fit decreasing).

    Samples keep their original order inside a row; rows are ordered by their first sample. A sample longer than
    `max_length` raises `ValueError` (the encoder rejects those before they get here).
    """
    too_long = [i for i, length in enumerate(lengths) if length > max_length]
    if too_long:
        raise ValueError(f"samples {too_long} are longer than the packing budget {max_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_length - lengths[index])
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def is_packed(segment_ids: torch.Tensor) -> bool:
    """True if some row holds more than one sample."""
    return bool((segment_ids > 0).any())


def attention_inputs(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `attention_mask` / `position_ids` the LLM needs for this micro-batch (see the module docstring)."""
    if not is_packed(segment_ids):
        return {"attention_mask": (segment_ids >= 0).long(), "position_ids": position_ids}
    return {"position_ids": position_ids}


def token_efficiency(segment_ids: torch.Tensor) -> float:
    """Real tokens / all tokens of a micro-batch (1.0 means no padding)."""
    return float((segment_ids >= 0).float().mean())


__all__ = ["attention_inputs", "is_packed", "pack_rows", "token_efficiency"]
