"""FineViT encoder: packing exactness, attention backends, positions, presets, gradient checkpointing."""

import pytest
import torch

from finevit_vl import FineViTConfig, FineViTImageProcessor, FineViTModel
from finevit_vl.models.modeling_finevit import get_vision_position_ids


def _encoder(seed: int = 0, **overrides) -> FineViTModel:
    torch.manual_seed(seed)
    return FineViTModel(FineViTConfig.from_preset("finevit-test", **overrides)).eval()


def _pack(grids: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    grid_thw = torch.tensor(grids)
    sizes = grid_thw.prod(-1).tolist()
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(sizes), 3 * 14 * 14, generator=generator), grid_thw, sizes


# Equal sizes both consecutive and separated, so both the batched and the per-image attention paths run.
GRIDS = [(1, 4, 6), (1, 4, 6), (1, 2, 2), (1, 6, 4), (1, 4, 6)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packing_is_exact(attn_implementation):
    model = _encoder()
    model.set_attn_implementation(attn_implementation)
    pixel_values, grid_thw, sizes = _pack(GRIDS)
    with torch.no_grad():
        packed = model(pixel_values, grid_thw)
        start = 0
        for index, size in enumerate(sizes):
            alone = model(pixel_values[start : start + size], grid_thw[index : index + 1])
            torch.testing.assert_close(alone.last_hidden_state, packed.last_hidden_state[start : start + size], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone.pooler_output[0], packed.pooler_output[index], atol=1e-5, rtol=1e-5)
            start += size


def test_eager_matches_sdpa():
    model = _encoder()
    pixel_values, grid_thw, _ = _pack(GRIDS)
    with torch.no_grad():
        sdpa = model(pixel_values, grid_thw).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model(pixel_values, grid_thw).last_hidden_state
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_images_do_not_attend_to_each_other():
    model = _encoder()
    pixel_values, grid_thw, sizes = _pack([(1, 4, 4), (1, 4, 4)])
    changed = pixel_values.clone()
    changed[sizes[0]:] += 1.0  # perturb only the second image
    with torch.no_grad():
        a = model(pixel_values, grid_thw).last_hidden_state[: sizes[0]]
        b = model(changed, grid_thw).last_hidden_state[: sizes[0]]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_position_ids_follow_processor_patch_order():
    # Each pixel encodes its own patch row/col; the processor's patch order must agree with get_vision_position_ids.
    import numpy as np
    from PIL import Image

    height, width = 4 * 28, 6 * 28
    rows, cols = np.meshgrid(np.arange(height) // 14, np.arange(width) // 14, indexing="ij")
    array = np.stack([rows * 10, cols * 10, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    processor = FineViTImageProcessor(max_pixels=height * width, min_pixels=28 * 28, image_mean=[0, 0, 0], image_std=[1, 1, 1])
    out = processor(Image.fromarray(array))
    assert out["image_grid_thw"].tolist() == [[1, 8, 12]]
    patches = out["pixel_values"].view(-1, 3, 14, 14)
    decoded = torch.stack([patches[:, 0, 0, 0], patches[:, 1, 0, 0]], dim=-1) * 255 / 10
    expected = get_vision_position_ids(out["image_grid_thw"], merge_size=2)
    torch.testing.assert_close(decoded.round().long(), expected)
    # The first merge group is the 2x2 block at the top-left corner.
    assert expected[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_rope_makes_features_position_dependent():
    model = _encoder()
    pixel_values, grid_thw, _ = _pack([(1, 2, 4)])
    swapped = pixel_values.view(2, 4, -1).flip(1).reshape_as(pixel_values)  # same patches, other places
    with torch.no_grad():
        a = model(pixel_values, grid_thw).pooler_output
        b = model(swapped, grid_thw).pooler_output
    assert not torch.allclose(a, b, atol=1e-4)


def test_hidden_states_and_shapes():
    model = _encoder()
    pixel_values, grid_thw, sizes = _pack(GRIDS)
    with torch.no_grad():
        out = model(pixel_values, grid_thw, output_hidden_states=True)
    assert out.last_hidden_state.shape == (sum(sizes), 32)
    assert out.pooler_output.shape == (len(GRIDS), 32)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_bad_pixel_grid_mismatch_raises():
    model = _encoder()
    pixel_values, grid_thw, _ = _pack([(1, 2, 2)])
    with pytest.raises(ValueError, match="grid_thw describes"):
        model(pixel_values[:-1], grid_thw)


def test_bf16_runs_close_to_fp32():
    model = _encoder()
    pixel_values, grid_thw, _ = _pack(GRIDS)
    with torch.no_grad():
        fp32 = model(pixel_values, grid_thw).last_hidden_state
        bf16 = model.to(torch.bfloat16)(pixel_values.bfloat16(), grid_thw).last_hidden_state.float()
    assert torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().mean() < 0.05 * fp32.abs().mean()


def test_gradient_checkpointing_matches_and_reaches_every_parameter():
    pixel_values, grid_thw, _ = _pack(GRIDS)
    losses, grads = [], []
    for checkpointing in (False, True):
        model = _encoder().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(pixel_values, grid_thw)
        loss = out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert set(grads[-1]) == {n for n, _ in model.named_parameters()}, "a parameter got no gradient"
    torch.testing.assert_close(losses[0], losses[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_paper_preset_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = FineViTModel(FineViTConfig.from_preset("finevit-0.86b"))
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 0.86e9) / 0.86e9 < 0.02, n_params
    assert model.config.num_hidden_layers == 28 and model.config.patch_size == 14 and model.config.native_image_size == 448


def test_config_validation_and_save_load(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        FineViTConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="Unknown FineViT preset"):
        FineViTConfig.from_preset("nope")
    model = _encoder()
    model.save_pretrained(tmp_path)
    reloaded = FineViTModel.from_pretrained(tmp_path).eval()
    pixel_values, grid_thw, _ = _pack(GRIDS)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values, grid_thw).pooler_output, reloaded(pixel_values, grid_thw).pooler_output)
