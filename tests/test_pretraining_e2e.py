"""End-to-end runs of the encoder's pretraining stages (`finevit-vl train` / `accelerate launch`), CPU only, on the
synthetic pretraining set: Stage I's loss falls with both targets, Stage II's loss is the same for one process, two
processes and gradient-cached micro-batches, every stage resumes exactly after a stop, and the chain
I -> II -> III -> SFT hands over what each stage trained."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_e2e import CONFIGS, _launch_cmd, _metrics, _run, _step_losses

from finevit_vl.data.pretrain_data import make_pretrain_data
from finevit_vl.data.synthetic import Settings, make_data


STAGE1 = CONFIGS / "tiny_cpu_stage1_mim.yaml"
STAGE2 = CONFIGS / "tiny_cpu_stage2_contrastive.yaml"


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    make_pretrain_data(out, seed=0, num_train=96, num_eval=24, workers=1)
    return out


def _stage1(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [str(STAGE1), f"run_dir={run_dir}", f"data.train.path={data / 'stage1' / 'train.jsonl'}", *overrides]


def _stage2(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [str(STAGE2), f"run_dir={run_dir}", f"data.train.path={data / 'stage2' / 'train.jsonl'}", *overrides]


# Pixels: raw, not per-patch normalised (MAE's default, `mim.normalize_target`): the synthetic backgrounds are flat,
# so normalised targets are 0 there and the rest is edges that a 40-step model cannot place (measured: 0.83 -> 0.81).
@pytest.mark.parametrize("target", ["features", "pixels"])
def test_stage1_loss_falls_with_each_target(pretrain_data, tmp_path, target):
    run_dir = tmp_path / target
    _run(_launch_cmd(_stage1(pretrain_data, run_dir, f"mim.target={target}", "train.max_steps=40",
                             "train.log_every=10", f"mim.normalize_target={target == 'features'}")))
    losses = [m["loss_avg"] for m in _metrics(run_dir) if "loss_avg" in m]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert (run_dir / "final" / "encoder" / "config.json").exists()
    if target == "features":  # the teacher is loaded frozen, never trained nor saved with the student
        from finevit_vl.train.encoder_models import load_teacher

        teacher, view = load_teacher(str(run_dir / "teacher"), "cpu")
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert view.patch_size == teacher.config.patch_size
        student = load_file(str(run_dir / "final" / "model.safetensors"))
        assert not any(key.startswith(("teacher", "embeddings.")) for key in student)


def test_stage2_loss_is_the_same_over_processes_and_micro_batches(pretrain_data, tmp_path):
    """One process with one micro-batch of 16, one process with two gradient-cached micro-batches of 8, and two
    processes with 8 each: the same global batch, so the same loss at every step (negatives from every process)."""
    common = ("train.max_steps=3", "train.global_batch_size=16", "train.log_every=1", "train.checkpoint_every=100",
              "contrastive.loss=sigmoid", "optim.max_grad_norm=null")
    runs = {"one": (1, 16), "cached": (1, 8), "two_processes": (2, 8)}
    losses = {}
    for name, (processes, micro) in runs.items():
        _run(_launch_cmd(_stage2(pretrain_data, tmp_path / name, *common, f"train.micro_batch_size={micro}"),
                         processes))
        losses[name] = _step_losses(tmp_path / name)
    assert sorted(losses["one"]) == [1, 2, 3]
    for name in ("cached", "two_processes"):
        for step, loss in losses["one"].items():
            assert losses[name][step] == pytest.approx(loss, rel=1e-4, abs=1e-5), (name, step, losses)


def test_stage2_resumes_exactly_across_a_phase_boundary(pretrain_data, tmp_path):
    """Stopped after 3 steps (phase 1: 16 tokens per caption, text tower frozen), resumed through the boundary at
    step 4 (64 tokens, text tower trained): the same losses as one uninterrupted run, each phase's settings in force,
    the cut captions counted."""
    common = ("train.max_steps=6", "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_every=1",
              "train.checkpoint_every=3", "train.keep_last=2", "contrastive.loss=softmax", "data.num_workers=1",
              ("train.phases=[{start_step: 0, text_max_length: 16, train_text_tower: false}, "
              "{start_step: 4, text_max_length: 64, train_text_tower: true}]"))
    _run(_launch_cmd(_stage2(pretrain_data, tmp_path / "whole", *common)))
    _run(_launch_cmd(_stage2(pretrain_data, tmp_path / "stopped", *common, "train.stop_after_steps=3")))
    assert not (tmp_path / "stopped" / "final").exists()
    _run(_launch_cmd(_stage2(pretrain_data, tmp_path / "stopped", *common)))
    whole, resumed = _step_losses(tmp_path / "whole"), _step_losses(tmp_path / "stopped")
    assert sorted(whole) == list(range(1, 7))
    for step in whole:
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5), (step, whole, resumed)
    logged = {m["step"]: m for m in _metrics(tmp_path / "whole") if "captions_truncated" in m}
    # `start_step: 4` is the fifth optimizer step (logged as step 5: logs count steps done). Every caption is longer
    # than 64 tokens: phase 1 cuts them to 16, phase 2 to 64, and every cut is counted.
    assert logged[4]["tokens_seen"] == 4 * 8 * 16 and logged[4]["captions_truncated"] == 32
    assert logged[6]["tokens_seen"] == 4 * 8 * 16 + 2 * 8 * 64 and logged[6]["captions_truncated"] == 48
    # The text tower is frozen in phase 1 (its learning rate gated to 0) and trains in phase 2.
    init = _state(tmp_path / "whole" / "init", "text_model.")
    at3 = _state(tmp_path / "whole" / "checkpoints" / "checkpoint-00000003", "text_model.")
    final = _state(tmp_path / "whole" / "final", "text_model.")
    assert all(torch.equal(init[k], at3[k]) for k in init)
    assert any(not torch.equal(init[k], final[k]) for k in init)
    assert any(not torch.equal(a, b) for a, b in zip(_state(tmp_path / "whole" / "init", "vision_model.").values(),
                                                     _state(tmp_path / "whole" / "checkpoints" / "checkpoint-00000003",
                                                            "vision_model.").values()))
    processor = json.loads((tmp_path / "stopped" / "final" / "processor_config.json").read_text())
    assert processor["text_max_length"] == 64  # exported with the length in force at the end


def test_stage1_resumes_exactly(pretrain_data, tmp_path):
    common = ("train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2")
    _run(_launch_cmd(_stage1(pretrain_data, tmp_path / "whole", *common)))
    _run(_launch_cmd(_stage1(pretrain_data, tmp_path / "stopped", *common, "train.stop_after_steps=2")))
    _run(_launch_cmd(_stage1(pretrain_data, tmp_path / "stopped", *common)))
    whole, resumed = _step_losses(tmp_path / "whole"), _step_losses(tmp_path / "stopped")
    assert sorted(whole) == [1, 2, 3, 4] and all(resumed[s] == pytest.approx(whole[s], rel=1e-5) for s in whole)


def _state(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in load_file(str(folder / "model.safetensors")).items()
            if k.startswith(prefix)}


def test_the_chain_stage1_stage2_stage3_sft_hands_over_each_stages_weights(pretrain_data, tmp_path):
    runs = tmp_path / "runs"
    _run(_launch_cmd(_stage1(pretrain_data, runs / "stage1", "train.max_steps=4")))
    _run(_launch_cmd(_stage2(pretrain_data, runs / "stage2", "train.max_steps=4", f"model.init_from={runs / 'stage1' / 'final'}",
                             "train.phases=[]")))
    handoff = json.loads((runs / "stage2" / "handoff.json").read_text())
    stage1_encoder = _state(runs / "stage1" / "final", "vision_model.")
    assert len(handoff["carried"]) == len(stage1_encoder) and not handoff["resized"]
    assert {n.split(".")[0] for n in handoff["dropped"]} == {"mim_decoder"}
    assert {n.split(".")[0] for n in handoff["initialised"]} == {"text_tower", "contrastive_head"}
    init = _state(runs / "stage2" / "init", "vision_model.")
    assert any(not torch.equal(init[k], stage1_encoder[k]) for k in init)  # carried, not what init built

    stage3_data = tmp_path / "data"
    make_data(stage3_data, seed=0, train_per_task=6, eval_per_task=2, settings=Settings(image_size=112))
    stage3 = [str(CONFIGS / "tiny_cpu_stage3.yaml"), f"run_dir={runs / 'stage3'}", "train.max_steps=3",
              f"data.train.path={stage3_data / 'stage3' / 'train.jsonl'}", "data.eval=null", "modules.vision_tower.train=false",
              f"model.init_from={runs / 'stage2' / 'final'}", "model.vision_preset=finevit-tiny"]
    _run(_launch_cmd(stage3))
    handoff = json.loads((runs / "stage3" / "handoff.json").read_text())
    assert handoff["source_type"] == "finevit_contrastive" and len(handoff["carried"]) == len(stage1_encoder)
    assert {n.split(".")[0] for n in handoff["dropped"]} == {"text_tower", "contrastive_head"}
    assert {n.split(".")[0] for n in handoff["initialised"]} >= {"projector", "llm"}
    stage2_encoder = _state(runs / "stage2" / "final", "vision_model.")
    stage3_encoder = _state(runs / "stage3" / "final", "model.vision_tower.")
    assert stage3_encoder.keys() == stage2_encoder.keys()
    assert all(torch.equal(stage3_encoder[k], stage2_encoder[k]) for k in stage2_encoder)  # frozen in this Stage III

    sft = [str(CONFIGS / "tiny_cpu_sft.yaml"), f"run_dir={runs / 'sft'}", "train.max_steps=2", "data.eval=null",
           f"model.path={runs / 'stage3' / 'final'}", f"data.train.path={stage3_data / 'sft' / 'train.jsonl'}"]
    _run(_launch_cmd(sft))
    assert (runs / "sft" / "final" / "config.json").exists()


def test_stage2_as_shipped_retrieves_far_above_chance_and_evaluates_zero_shot(tmp_path_factory):
    """The shipped tiny Stage II config (400 steps, captions 64 -> 256 tokens) on 8,000 synthetic images, scored by
    `finevit-vl eval-zeroshot` on the held-out long-caption split (200 images in groups of 8 that differ only in
    details their captions give after ~145 tokens) and on the classification folder (the user format).
    Measured: see README, "Measured at toy scale"; asserted with a wide margin."""
    from finevit_vl.eval.zeroshot import main as zeroshot

    data = tmp_path_factory.mktemp("pretrain8k")
    make_pretrain_data(data, seed=0, num_train=8000, num_eval=200, workers=2)
    run_dir = data / "run"
    _run(_launch_cmd([str(STAGE2), f"run_dir={run_dir}", f"data.train.path={data / 'stage2' / 'train.jsonl'}"]))
    model = run_dir / "final"
    assert zeroshot([str(model), "--data", str(data / "zeroshot" / "retrieval_long"), "--text-max-length", "256",
                     "--out", str(data / "long"), "--update-card"]) == 0
    long = json.loads((data / "long" / "results.json").read_text())
    chance = long["chance"]["text_to_image_R@1"]
    assert chance == pytest.approx(0.5) and long["truncated_texts"] == 0
    # Measured R@1 I2T / T2I (R@10): 11.0 / 14.0 (63.5 / 63.5) on one machine, 4.0 / 4.0 (35.5 / 31.0) on another of
    # the same kind with the same code: whole runs at this scale vary that much between machines.
    metrics, chance10 = long["metrics"], long["chance"]["text_to_image_R@10"]
    assert metrics["text_to_image_R@1"] >= 6 * chance and metrics["image_to_text_R@1"] >= 6 * chance
    assert metrics["text_to_image_R@10"] >= 4 * chance10 and metrics["image_to_text_R@10"] >= 4 * chance10
    assert zeroshot([str(model), "--data", str(data / "zeroshot" / "classification"), "--out",
                     str(data / "classification")]) == 0
    classes = json.loads((data / "classification" / "results.json").read_text())
    assert classes["metrics"]["num_classes"] == 15 and 0 <= classes["metrics"]["top1"] <= 100
    assert "Zero-shot evaluation" in (model / "README.md").read_text()
