"""Trainer parts in-process: freeze policy and per-module LR, schedule, gradient checkpointing with a frozen tower,
FLOPs, the per-rank data stream with bad records and resume, atomic checkpoints."""

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from finevit_vl.data import JsonlSource
from finevit_vl.data.collator import SampleEncoder
from finevit_vl.tiny import build_tiny_model
from finevit_vl.train.config import load_config
from finevit_vl.train.data import BadRecordLog, TrainStream
from finevit_vl.train.freeze import module_of, trainable_report
from finevit_vl.train.metrics import module_param_counts, training_flops
from finevit_vl.train.model import prepare_trainable
from finevit_vl.train.optim import build_optimizer, lr_factor


CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "tiny_cpu_stage3.yaml"


def _config(*overrides):
    return load_config(CONFIG, list(overrides))


def test_freeze_policy_and_per_module_learning_rates():
    model, _ = build_tiny_model()
    config = _config("modules.vision_tower.train=false", "modules.multi_modal_projector.lr=0.01",
                     "modules.language_model.lr=0.001")
    model = prepare_trainable(model, config)
    report = trainable_report(model)
    assert report["vision_tower"]["trainable"] == 0 and report["vision_tower"]["total"] > 0
    assert report["multi_modal_projector"]["trainable"] == report["multi_modal_projector"]["total"]
    assert module_of("lm_head.weight") == "language_model"
    assert module_of("base_model.model.model.multi_modal_projector.modules_to_save.default.linear_1.weight") == "multi_modal_projector"
    lrs = {group["name"]: group["lr"] for group in build_optimizer(model, config).param_groups}
    assert lrs == {"multi_modal_projector/no_decay": 0.01, "language_model/no_decay": 0.001}


def test_encoder_pooling_head_is_never_trained():
    model, _ = build_tiny_model()
    model = prepare_trainable(model, _config("modules.vision_tower.train=true"))
    head = [p.requires_grad for n, p in model.named_parameters() if ".vision_tower.head." in n]
    blocks = [p.requires_grad for n, p in model.named_parameters() if ".vision_tower.blocks." in n]
    assert head and not any(head) and all(blocks)


def test_warmup_then_cosine_to_min_ratio():
    factors = [lr_factor(step, warmup=4, total=20, min_ratio=0.1) for step in range(21)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:])) and factors[20] == pytest.approx(0.1)


def _loss_and_grads(checkpointing: bool):
    model, processor = build_tiny_model(seed=5, max_pixels=56 * 56)
    config = _config("modules.vision_tower.train=false", f"model.gradient_checkpointing={str(checkpointing).lower()}")
    model = prepare_trainable(model, config).train()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A blue square."}]}]
    sample = SampleEncoder(processor, 256).encode_messages(messages, [Image.new("RGB", (56, 56), "blue")])
    out = model(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw,
                labels=sample.labels[None], use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model


def test_gradient_checkpointing_with_a_frozen_encoder_keeps_every_gradient():
    loss, grads, _ = _loss_and_grads(checkpointing=False)
    loss_gc, grads_gc, model = _loss_and_grads(checkpointing=True)
    assert model.model.language_model.gradient_checkpointing and model.model.vision_tower.gradient_checkpointing
    torch.testing.assert_close(loss_gc, loss)
    assert grads_gc.keys() == grads.keys() and any("multi_modal_projector" in n for n in grads)
    for name, grad in grads.items():
        assert grads_gc[name] is not None, name  # the reentrant variant drops these when the encoder is frozen
        torch.testing.assert_close(grads_gc[name], grad, rtol=1e-4, atol=1e-6)


def test_flops_are_six_n_for_a_full_finetune_and_two_n_for_a_frozen_encoder():
    model, _ = build_tiny_model()
    counts = module_param_counts(model)
    n_llm = counts["language_model"]["params"]
    assert training_flops(counts, 0, 0, 10) == pytest.approx(6 * n_llm * 10)
    model = prepare_trainable(model, _config("modules.vision_tower.train=false"))
    frozen = module_param_counts(model)
    vision_only = training_flops(frozen, 100, 0, 0)
    assert vision_only == pytest.approx(2 * frozen["vision_tower"]["params"] * 100)


def _write_records(folder: Path) -> Path:
    """Good records plus one of each bad kind; returns the JSONL path."""
    Image.new("RGB", (56, 56), "red").save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    good = [{"id": f"ok{i}", "image": "ok.png", "task": "caption", "caption": f"a red square {i}"} for i in range(6)]
    bad = [
        {"id": "missing", "image": "nowhere.png", "task": "caption", "caption": "x"},
        {"id": "undecodable", "image": "broken.png", "task": "caption", "caption": "x"},
        {"id": "outside", "image": "ok.png", "task": "grounding", "grounding": [{"expression": "it", "box": [10, 10, 90, 40]}]},
        {"id": "toolong", "image": "ok.png", "task": "caption", "caption": "red " * 200},
    ]
    lines = [json.dumps(r) for r in good[:3] + bad + good[3:]]
    lines.insert(5, "{not json")
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_stream_skips_and_reports_bad_records_then_resumes_exactly(tmp_path):
    _, processor = build_tiny_model(max_pixels=56 * 56)
    path = _write_records(tmp_path)
    encoder = SampleEncoder(processor, max_length=96)

    def stream(log_path):
        return TrainStream(JsonlSource(path), encoder, samples_per_step=2, micro_batch_size=1, pack=False,
                           pad_token_id=processor.tokenizer.pad_token_id, bad_records=BadRecordLog(log_path))

    first = stream(tmp_path / "bad.jsonl")
    steps = [first.next_step() for _ in range(3)]
    assert [s.num_samples for s in steps] == [2, 2, 2] and steps[-1].state["bad_records"] == 5
    reported = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
    reasons = {re.search(r"id=(\w+)", r["location"]).group(1): r["reason"] for r in reported if "id=" in r["location"]}
    assert "image file not found" in reasons["missing"] and "cannot decode" in reasons["undecodable"]
    assert "outside" in reasons["outside"] and "not truncated" in reasons["toolong"]
    assert any("malformed JSON" in r["reason"] and r["location"].endswith("train.jsonl:6") for r in reported)

    resumed = stream(None)
    resumed.load_state_dict(steps[0].state)
    for expected in steps[1:]:
        got = resumed.next_step()
        assert torch.equal(got.micro_batches[0]["input_ids"], expected.micro_batches[0]["input_ids"])
    assert resumed.bad_records.count == 5


def test_a_source_without_usable_records_fails_clearly(tmp_path):
    _, processor = build_tiny_model()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "image": "none.png", "task": "caption", "caption": "x"}) + "\n")
    stream = TrainStream(JsonlSource(path), SampleEncoder(processor, 64), 1, 1, False, 0, BadRecordLog(None))
    # A stop, not an exception: the trainer stops every rank together.
    batch = stream.next_step()
    assert "no usable record" in batch.stop_reason and not batch.micro_batches


def test_checkpoints_are_atomic_verified_and_pruned(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from finevit_vl.train import checkpoint
    from finevit_vl.train.checkpoint import CheckpointManager, list_checkpoints, newest_intact

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    manager = CheckpointManager(accelerator, tmp_path, keep_last=2, run_id="run-a")

    def save(step: int, state: dict, data_state: dict):
        return manager.save(step, model, optimizer, None, state, data_state, "seed: 0\n", trainable_only=True)

    save(1, {"samples_seen": 1}, {"position": 1})
    saved = model.weight.detach().clone()

    def crash(*args, **kwargs):  # a SIGKILL half-way through writing the weights
        Path(args[3], "trainable.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_weights", crash)
        with torch.no_grad():
            model.weight.add_(1.0)
        with pytest.raises(KeyboardInterrupt):
            save(2, {"samples_seen": 2}, {"position": 2})
    latest, skipped = newest_intact(list_checkpoints(tmp_path / "checkpoints"))
    assert latest.name == "checkpoint-00000001" and not skipped
    trainer_state, data_states = manager.load(latest, model, optimizer)
    assert trainer_state["step"] == 1 and trainer_state["run_id"] == "run-a" and data_states == [{"position": 1}]
    torch.testing.assert_close(model.weight.detach(), saved)

    other = CheckpointManager(accelerator, tmp_path, keep_last=1, run_id="run-b")
    other.save(9, model, optimizer, None, {}, {}, "", trainable_only=True)
    for step in (2, 3, 4):
        save(step, {}, {})
    # Pruning keeps this run's last two and never touches another run's checkpoint.
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "checkpoint-00000003", "checkpoint-00000004", "checkpoint-00000009"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints", "run-a")] == [
        "checkpoint-00000003", "checkpoint-00000004"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def _good_records(folder: Path, count: int) -> Path:
    Image.new("RGB", (56, 84), "blue").save(folder / "blue.png")
    records = [{"id": f"r{i}", "image": "blue.png", "task": "caption", "caption": f"a blue square number {i}"}
               for i in range(count)]
    path = folder / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_recipe_in_process_calls_the_lmms_eval_hook_on_schedule(tmp_path, monkeypatch):
    from finevit_vl.eval import suite
    from finevit_vl.train.__main__ import run

    calls = []

    def fake_suite(model, processor=None, tasks=(), data_dir=None, limit=None, batch_size=8, out_dir=None, model_args=None):
        calls.append((model if isinstance(model, str) else type(model).__name__, processor is not None, list(tasks),
                      Path(out_dir).name, limit))
        return {"finevit_countbench": {"exact_match": 0.25}}

    monkeypatch.setattr(suite, "run_eval_suite", fake_suite)
    path = _good_records(tmp_path, 8)
    config = _config(f"run_dir={tmp_path / 'run'}", f"data.train.path={path}", f"data.eval.path={path}",
                     "train.max_steps=2", "train.global_batch_size=2", "eval.max_samples=2", "eval.tasks=[finevit_countbench]",
                     "eval.tasks_every=1", "eval.limit=3", "data.prefetch_steps=0", "model.vocab_size=320")
    written = run(config)
    assert calls == [
        ("FineViTVLForConditionalGeneration", True, ["finevit_countbench"], "step-00000001", 3),
        (written["model"], False, ["finevit_countbench"], "step-00000002", 3),  # the exported folder, at the end
    ]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "finevit_countbench/exact_match" in m] == [1, 2]


def test_missing_lmms_eval_suite_is_tolerated(monkeypatch, caplog):
    import sys

    from finevit_vl.train.evaluation import run_eval_suite

    monkeypatch.setitem(sys.modules, "finevit_vl.eval.suite", None)  # `import` raises ImportError
    assert run_eval_suite("model", None, ["finevit_countbench"], "out", None, None, 8) is None
    assert "lmms-eval suite is unavailable" in caplog.text
