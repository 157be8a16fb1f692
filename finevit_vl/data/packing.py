"""Multimodal sequence packing: several samples per row up to a token budget, with no attention across samples.

A packed row concatenates samples; `collate_rows` restarts `position_ids` at every sample and records `segment_ids`.
Two ways keep the samples apart in the LLM, chosen by the attention implementation:

* flash-attention (GPU): only `position_ids` are passed (no `attention_mask`); transformers detects the restarts and
  runs the varlen kernel over the packed sequences.
* sdpa / eager (and anything else): an exact 4D block-diagonal causal mask `(rows, 1, len, len)`, additive (0 where
  attention is allowed, the dtype's minimum elsewhere), passed as `attention_mask`; transformers' `create_causal_mask`
  returns a 4D mask as-is. Padding forms one more segment of its own, so no row of the mask is empty.

The images of all samples of a micro-batch go through the encoder as one pack (the model concatenates them), so a
packed micro-batch costs one encoder call and one LLM call.
"""

import torch


FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


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


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask `(rows, 1, len, len)`: token q sees token k iff k <= q and both are in one segment.

    Args:
        segment_ids (`torch.LongTensor` of shape `(rows, len)`): segment of each token (-1 on padding).
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    # (rows, len, 1) == (rows, 1, len) -> (rows, len, len)
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def is_packed(segment_ids: torch.Tensor) -> bool:
    """True if some row holds more than one sample."""
    return bool((segment_ids > 0).any())


def attention_inputs(
    segment_ids: torch.Tensor, position_ids: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The `attention_mask` / `position_ids` the LLM needs for this micro-batch (see the module docstring)."""
    if not is_packed(segment_ids):
        return {"attention_mask": (segment_ids >= 0).long(), "position_ids": position_ids}
    if attn_implementation in FLASH_IMPLEMENTATIONS:
        return {"position_ids": position_ids}
    return {"attention_mask": block_causal_mask(segment_ids, dtype), "position_ids": position_ids}


def token_efficiency(segment_ids: torch.Tensor) -> float:
    """Real tokens / all tokens of a micro-batch (1.0 means no padding)."""
    return float((segment_ids >= 0).float().mean())


__all__ = ["FLASH_IMPLEMENTATIONS", "attention_inputs", "block_causal_mask", "is_packed", "pack_rows", "token_efficiency"]
