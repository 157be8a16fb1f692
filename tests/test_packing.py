"""Packing gives the same per-sample losses as no packing (`finevit_vl.data.packing`)."""

import random

import pytest
import torch
from PIL import Image

from finevit_vl.data.collator import SampleEncoder, collate_rows, dummy_image_inputs
from finevit_vl.data.packing import attention_inputs, pack_rows, token_efficiency
from finevit_vl.tiny import build_tiny_model
from finevit_vl.train.loss import per_sample_losses


def test_pack_rows_respects_the_budget_and_keeps_every_sample():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(50)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(50))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert all(row == sorted(row) for row in rows)
    assert len(rows) <= sum(lengths) // 64 + 3  # first-fit decreasing is near-optimal here
    with pytest.raises(ValueError, match="longer than the packing budget"):
        pack_rows([10, 70], 64)


def _block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The explicit additive mask `(rows, 1, len, len)`: q sees k iff k <= q in one segment (padding: its own)."""
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


def test_packed_rows_get_positions_only_and_plain_rows_a_padding_mask():
    segment_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    positions = torch.tensor([[0, 1, 0, 1, 2, 0]])
    assert attention_inputs(segment_ids, positions).keys() == {"position_ids"}
    plain = attention_inputs(torch.tensor([[0, 0, 0, -1]]), torch.tensor([[0, 1, 2, 0]]))
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 0]]


def _samples(processor, count: int = 7):
    encoder = SampleEncoder(processor, max_length=256)
    rng = random.Random(1)
    samples = []
    for index in range(count):
        words = " ".join(rng.choice(["red", "blue", "circle", "square", "seven", "text"]) for _ in range(rng.randint(1, 12)))
        has_image = index % 3 != 2  # some text-only samples share a pack with image samples
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": f"What is shown {index}?"}]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": words}]}]
        size = (rng.choice([28, 56, 84]), rng.choice([28, 56, 84]))
        images = [Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))] if has_image else []
        samples.append(encoder.encode_messages(messages, images))
    return samples


def _forward(model, batch):
    inputs = attention_inputs(batch["segment_ids"], batch["position_ids"])
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                image_token_weight=batch.get("image_token_weight"), use_cache=False, **inputs)
    return per_sample_losses(out.logits, batch["labels"], batch["sample_ids"])


@pytest.mark.parametrize("text_model_type, attn_implementation", [("qwen3", "sdpa"), ("qwen3", "eager"), ("llama", "sdpa")])
def test_packed_per_sample_losses_equal_unpacked(text_model_type, attn_implementation):
    model, processor = build_tiny_model(text_model_type=text_model_type, max_pixels=84 * 84, seed=3)
    model.set_attn_implementation(attn_implementation)
    samples = _samples(processor)
    pad, dummy = processor.tokenizer.pad_token_id, dummy_image_inputs(processor)

    with torch.no_grad():
        alone = torch.cat([_forward(model, collate_rows([[s]], pad, dummy)) for s in samples])
        rows = pack_rows([s.length for s in samples], 160)
        assert len(rows) < len(samples)  # really packed
        packed_batch = collate_rows([[samples[i] for i in row] for row in rows], pad, dummy)
        packed = _forward(model, packed_batch)
        order = [i for row in rows for i in row]  # sample_ids number samples in row order
        # The explicit block-diagonal mask gives the same: transformers found the sequences from the positions alone.
        by_mask = model(input_ids=packed_batch["input_ids"], pixel_values=packed_batch["pixel_values"],
                        image_grid_thw=packed_batch["image_grid_thw"], position_ids=packed_batch["position_ids"],
                        attention_mask=_block_causal_mask(packed_batch["segment_ids"]), use_cache=False)
        by_mask = per_sample_losses(by_mask.logits, packed_batch["labels"], packed_batch["sample_ids"])

    torch.testing.assert_close(packed, alone[order], rtol=0, atol=1e-5)
    torch.testing.assert_close(by_mask, packed, rtol=0, atol=1e-6)
    padded = collate_rows([[s] for s in samples], pad, dummy)
    assert token_efficiency(packed_batch["segment_ids"]) > token_efficiency(padded["segment_ids"])
