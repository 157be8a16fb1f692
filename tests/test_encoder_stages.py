"""The parts of the encoder's pretraining stages, without a training run: Stage I's masking, visible patches and
teacher targets, Stage II's caption cut and model loss, the phase schedule, and the stage hand-off."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import random_image
from torch import nn
from transformers import AutoConfig

from finevit_vl.data.image_samples import CaptionEncoder, ImageBatcher, MaskedImageEncoder, random_visible_mask
from finevit_vl.models import (
    FineViTConfig,
    FineViTContrastiveConfig,
    FineViTContrastiveModel,
    FineViTForMaskedImageModeling,
    FineViTImageProcessor,
    FineViTMaskedImageModelingConfig,
    FineViTModel,
)
from finevit_vl.models.modeling_finevit import get_vision_position_ids
from finevit_vl.train.config import PhaseConfig
from finevit_vl.train.contrastive_loss import CONTRASTIVE_LOSSES
from finevit_vl.train.encoder_trainers import MaskedImageTrainer
from finevit_vl.train.handoff import carry_weights
from finevit_vl.train.phases import PhaseSchedule


VISION = FineViTConfig.from_preset("finevit-test")


def _write_image(folder, name: str, size: tuple[int, int], seed: int) -> dict:
    random_image(size[1], size[0], seed).save(folder / name)
    return {"id": name, "image": name, "task": "caption", "caption": "a red circle", "_image_root": str(folder)}


def test_the_encoder_sees_only_visible_patches_at_their_own_positions(monkeypatch):
    torch.manual_seed(0)
    model = FineViTModel(VISION).eval()
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
    pixels = torch.randn(28, 3 * 14 * 14)
    visible = random_visible_mask(16, 0.75, torch.Generator().manual_seed(0))
    visible = torch.cat([visible, random_visible_mask(12, 0.5, torch.Generator().manual_seed(1))])
    seen = {}
    monkeypatch.setattr(model.rotary_pos_emb, "forward", lambda ids, f=model.rotary_pos_emb.forward: (
        seen.__setitem__("positions", ids.clone()), f(ids))[1])
    monkeypatch.setattr(model.patch_embed, "forward", lambda px, f=model.patch_embed.forward: (
        seen.__setitem__("pixels", px.clone()), f(px))[1])
    with torch.no_grad():
        out = model(pixels, grid, visible_mask=visible, return_pooled=False).last_hidden_state
    assert out.shape[0] == int(visible.sum()) == 4 + 6
    assert torch.equal(seen["pixels"], pixels[visible])
    assert torch.equal(seen["positions"], get_vision_position_ids(grid, VISION.spatial_merge_size)[visible])
    # Images stay apart: the second image's visible features do not depend on the first image's pixels.
    other = pixels.clone()
    other[:16] = torch.randn(16, pixels.shape[1])
    with torch.no_grad():
        again = model(other, grid, visible_mask=visible, return_pooled=False).last_hidden_state
    torch.testing.assert_close(again[4:], out[4:])
    with pytest.raises(ValueError, match="keep at least one"):
        model(pixels, grid, visible_mask=torch.cat([torch.zeros(16, dtype=torch.bool), torch.ones(12, dtype=torch.bool)]))


def test_masking_hides_the_ratio_of_every_image_seeded_by_record_and_pass(tmp_path):
    processor = FineViTImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    encoder = MaskedImageEncoder(processor, mask_ratio=0.75, seed=3)
    records = [_write_image(tmp_path, f"{i}.png", size, i) for i, size in enumerate([(112, 112), (84, 140), (56, 56)])]
    for record in records:
        sample = encoder.encode_record(dict(record), "x.jsonl:1")
        patches = sample.num_patches
        assert sample.visible_mask.shape == (patches,)
        assert int((~sample.visible_mask).sum()) == round(0.75 * patches)
        assert torch.equal(encoder.encode_record(dict(record), "elsewhere/x.jsonl:9").visible_mask, sample.visible_mask)
        assert not torch.equal(encoder.encode_record(dict(record), "x.jsonl:1", epoch=1).visible_mask, sample.visible_mask)
    micro = ImageBatcher(micro_batch_size=3).micro_batches([encoder.encode_record(dict(r), "x") for r in records])[0]
    assert micro["visible_mask"].shape[0] == micro["pixel_values"].shape[0]
    assert ImageBatcher.num_targets([encoder.encode_record(dict(r), "x") for r in records], [micro]) == int(
        (~micro["visible_mask"]).sum())


class _CoordinateTeacher(nn.Module):
    """A 'ViT' whose patch tokens are (row, col) of the patch, after one CLS token."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(patch_size=patch_size)
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, output_hidden_states=False):
        rows, cols = (side // self.config.patch_size for side in pixel_values.shape[-2:])
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        tokens = torch.cat([torch.full((1, 2), -1.0), grid.float()])[None] + self.weight
        return SimpleNamespace(last_hidden_state=tokens)


@pytest.mark.parametrize("teacher_patch", [14, 7])
def test_teacher_features_are_resampled_onto_the_students_grid_in_its_order(teacher_patch):
    grid = torch.tensor([[1, 4, 6]])
    trainer = SimpleNamespace(teacher=_CoordinateTeacher(teacher_patch), teacher_layer=-1, teacher_kwargs={},
                              accelerator=SimpleNamespace(device="cpu"), processor=SimpleNamespace(merge_size=2))
    micro = {"image_grid_thw": grid, "teacher_pixel_values": [torch.zeros(3, 4 * 14, 6 * 14)]}
    features = MaskedImageTrainer.teacher_features(trainer, micro)
    expected = get_vision_position_ids(grid, 2).float()
    if teacher_patch == 7:  # a 2x finer teacher grid, averaged bilinearly: student cell r covers teacher rows 2r, 2r+1
        expected = expected * 2 + 0.5
    torch.testing.assert_close(features, expected)
    assert not features.requires_grad


def test_mim_model_predicts_the_hidden_patches_of_each_target():
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, 588)
    visible = random_visible_mask(16, 0.75, torch.Generator().manual_seed(0))
    for target in ("features", "pixels"):
        config = FineViTMaskedImageModelingConfig(vision_config=VISION, target=target, target_hidden_size=24,
                                                  decoder_hidden_size=16, decoder_num_attention_heads=2)
        model = FineViTForMaskedImageModeling(config)
        out = model(pixels, grid, visible, target_features=torch.randn(16, 24))
        assert out.predictions.shape == (12, config.target_size) and out.patch_losses.shape == (12,)
        out.loss.backward()
        assert model.vision_model.blocks[0].mlp.up_proj.weight.grad.abs().sum() > 0
        assert model.vision_model.head.probe.grad is None  # the pooling head is Stage II's


def test_caption_encoder_cuts_long_captions_visibly(tmp_path, tokenizer):
    processor = FineViTImageProcessor(max_pixels=56 * 56)
    encoder = CaptionEncoder(processor, tokenizer, text_max_length=8)
    record = _write_image(tmp_path, "a.png", (56, 56), 0)
    record["caption"] = "a red circle at the top left and a blue square at the bottom right of the image"
    sample = encoder.encode_record(dict(record), "x")
    assert sample.caption_truncated and sample.length == 8
    record["caption"] = "red"
    assert not encoder.encode_record(dict(record), "x").caption_truncated
    assert ImageBatcher.step_counts([sample, encoder.encode_record(dict(record), "x")]) == {"captions_truncated": 1}
    with pytest.raises(ValueError, match="caption"):
        encoder.encode_record({**record, "caption": ""}, "x")


def _contrastive(loss_type: str, text_positions: int = 64) -> FineViTContrastiveModel:
    text = AutoConfig.for_model("siglip_text_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, vocab_size=64, max_position_embeddings=text_positions,
                                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return FineViTContrastiveModel(FineViTContrastiveConfig(vision_config=VISION, text_config=text, projection_dim=16,
                                                            loss_type=loss_type, text_pooling="last"))


@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
def test_the_models_own_loss_is_the_training_loss_on_one_process(loss_type):
    torch.manual_seed(0)
    model = _contrastive(loss_type)
    grid = torch.tensor([[1, 4, 4], [1, 2, 2], [1, 4, 2]])
    out = model(input_ids=torch.randint(1, 64, (3, 5)), pixel_values=torch.randn(28, 588), image_grid_thw=grid,
                return_loss=True)
    args = (out.logit_scale, out.logit_bias) if loss_type == "sigmoid" else (out.logit_scale,)
    torch.testing.assert_close(out.loss, CONTRASTIVE_LOSSES[loss_type](out.image_embeds, out.text_embeds, *args))


def test_phases_accumulate_and_gate_the_text_tower():
    schedule = PhaseSchedule([PhaseConfig(start_step=0, max_pixels=100, text_max_length=64, train_text_tower=False),
                              PhaseConfig(start_step=5, train_text_tower=True),
                              PhaseConfig(start_step=9, text_max_length=256)])
    assert schedule.at(0) == {"max_pixels": 100, "text_max_length": 64, "train_text_tower": False}
    assert schedule.at(7) == {"max_pixels": 100, "text_max_length": 64, "train_text_tower": True}
    assert schedule.at(9)["text_max_length"] == 256
    assert [schedule.lr_gate("text_tower", s) for s in (0, 4, 5)] == [0.0, 0.0, 1.0]
    assert schedule.lr_gate("vision_tower", 0) == 1.0
    assert (schedule.next_start(0), schedule.next_start(5), schedule.next_start(9)) == (5, 9, float("inf"))


def test_hand_off_carries_the_encoder_resizes_text_positions_and_reports_the_rest(tmp_path):
    torch.manual_seed(0)
    mim = FineViTForMaskedImageModeling(FineViTMaskedImageModelingConfig(
        vision_config=VISION, target="pixels", decoder_hidden_size=16, decoder_num_attention_heads=2))
    mim.save_pretrained(tmp_path / "stage1")
    stage2 = _contrastive("sigmoid", text_positions=64)
    report = carry_weights(stage2, tmp_path / "stage1")
    for name, tensor in mim.vision_model.state_dict().items():
        assert torch.equal(stage2.vision_model.state_dict()[name], tensor), name
    assert len(report.carried) == len(mim.vision_model.state_dict())
    assert report.dropped and all(name.startswith("mim_decoder.") for name in report.dropped)
    assert {name.split(".")[0] for name in report.initialised} == {"text_tower", "contrastive_head"}
    # A longer text context: the learned position table is interpolated, its ends kept.
    stage2.save_pretrained(tmp_path / "stage2")
    longer = _contrastive("sigmoid", text_positions=256)
    report = carry_weights(longer, tmp_path / "stage2")
    key = "text_model.embeddings.position_embedding.weight"
    old, new = stage2.state_dict()[key], longer.state_dict()[key]
    assert new.shape == (256, 32) and torch.allclose(new[0], old[0]) and torch.allclose(new[-1], old[-1])
    assert any("position_embedding" in entry for entry in report.resized) and not report.initialised
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        carry_weights(longer, tmp_path / "notamodel")
    (tmp_path / "notamodel" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'"):
        carry_weights(longer, tmp_path / "notamodel")


def test_an_image_record_without_an_image_is_a_bad_record(tmp_path):
    encoder = MaskedImageEncoder(FineViTImageProcessor(max_pixels=56 * 56), 0.75)
    with pytest.raises(ValueError, match="image"):
        encoder.encode_record({"id": "t", "task": "conversation", "image": None,
                               "conversations": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "yo"}]}, "x.jsonl:3")
