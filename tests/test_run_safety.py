"""Run folders, resume and checkpoints under faults: reused folders, changed configs, planted pickles, corrupt or
truncated files, a signal during a save, a full disk. Tiny in-process runs (seconds each); the signals sent to a
real `finevit-vl train` process are in test_train_e2e.py."""

import json
import os
import pickle
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finevit_vl.train import checkpoint as checkpoint_module
from finevit_vl.train.__main__ import run
from finevit_vl.train.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    list_checkpoints,
    seal,
    verify_checkpoint,
)
from finevit_vl.train.config import load_config
from finevit_vl.train.optim import lr_factor
from finevit_vl.train.preemption import TrainingInterrupted
from finevit_vl.train.run_dir import RunDirError, plan_run


CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "tiny_cpu_stage3.yaml"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("records")
    colors = ["red", "blue", "green", "yellow"]
    for color in colors:
        Image.new("RGB", (56, 84), color).save(folder / f"{color}.png")
    lines = [json.dumps({"id": f"r{i}", "image": f"{colors[i % 4]}.png", "task": "caption",
                         "caption": f"a {colors[i % 4]} square number {i}"}) for i in range(16)]
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "records.jsonl"


def _config(run_dir: Path, records: Path, *overrides: str):
    return load_config(CONFIG, [
        f"run_dir={run_dir}", f"data.train.path={records}", "data.eval=null", "train.max_steps=3",
        "train.global_batch_size=2", "train.micro_batch_size=1", "train.log_every=1", "train.checkpoint_every=1",
        "train.keep_last=3", "eval.every=0", "data.prefetch_steps=0", "model.vocab_size=320", "optim.warmup_steps=1",
        "data.max_pixels=3136", *overrides])


def _steps(run_dir: Path) -> list[int]:
    """Steps of the training records in metrics.jsonl, in file order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


def _run_ids(run_dir: Path) -> set[str]:
    return {json.loads((p / "trainer_state.json").read_text())["run_id"] for p in list_checkpoints(run_dir / "checkpoints")}


@pytest.fixture(scope="module")
def finished(records, tmp_path_factory) -> Path:
    """A finished 3-step run with a checkpoint at every step."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(_config(run_dir, records))
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a run folder; its config points at the copy."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.reliability("run folder", "train.resume=false in a folder with another run's checkpoints",
                         "refused, naming the run; train.overwrite=true starts a new run and prunes only its own")
def test_a_new_run_never_reuses_or_destroys_another_runs_folder(finished, records, tmp_path):
    run_dir = _copy(finished, tmp_path)
    old_ids = _run_ids(run_dir)
    with pytest.raises(RunDirError, match="already holds checkpoints .* train.overwrite=true"):
        run(_config(run_dir, records, "train.resume=false", "train.max_steps=2"))
    assert _run_ids(run_dir) == old_ids and len(list_checkpoints(run_dir / "checkpoints")) == 3

    run(_config(run_dir, records, "train.resume=false", "train.overwrite=true", "train.max_steps=2"))
    new_ids = _run_ids(run_dir)
    assert len(new_ids) == 1 and new_ids != old_ids
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["checkpoint-00000001", "checkpoint-00000002"]
    assert _steps(run_dir) == [1, 2]
    assert json.loads((run_dir / "run.json").read_text())["run_id"] in new_ids


@pytest.mark.reliability("resume", "resume with a changed batch size and data file",
                         "refused, listing the changed keys; config.yaml keeps the settings in force")
def test_resume_refuses_changes_that_cannot_take_effect(finished, records, tmp_path):
    run_dir = _copy(finished, tmp_path)
    other = tmp_path / "other.jsonl"
    shutil.copy(records, other)
    with pytest.raises(RunDirError) as error:
        run(_config(run_dir, records, "train.max_steps=5", "train.global_batch_size=4", f"data.train.path={other}"))
    message = str(error.value)
    assert "train.global_batch_size: 2 -> 4" in message and "data.train.path" in message
    assert "train.max_steps" not in message.split("Settings that may change")[0]  # an allowed change
    assert "global_batch_size: 2" in (run_dir / "config.yaml").read_text()


@pytest.mark.reliability("resume", "resume with a 10x learning rate and a longer budget",
                         "allowed; the new rate is the one used from the next step, and config.yaml says so")
def test_a_changed_learning_rate_takes_effect_on_resume(finished, records, tmp_path):
    run_dir = _copy(finished, tmp_path)
    run(_config(run_dir, records, "train.max_steps=5", "modules.language_model.lr=3.0e-2"))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = {m["step"]: m["lr/language_model/no_decay"] for m in logged if "loss" in m}
    warmup, min_ratio = 1, 0.1
    # The rate logged after step s is the one for step s + 1, from the config in force at the time.
    assert lrs[2] == pytest.approx(3.0e-3 * lr_factor(2, warmup, 3, min_ratio))
    assert lrs[4] == pytest.approx(3.0e-2 * lr_factor(4, warmup, 5, min_ratio))
    assert _steps(run_dir) == [1, 2, 3, 4, 5]
    assert "lr: 0.03" in (run_dir / "config.yaml").read_text()
    assert "lr: 0.03" in (run_dir / "checkpoints" / "checkpoint-00000005" / "run_config.yaml").read_text()


class _Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


@pytest.mark.reliability("security", "a pickle planted in the newest checkpoint (unlisted file, or optimizer.pt "
                         "replaced and the manifest rewritten)", "refused with the file named; its code never runs")
def test_a_planted_pickle_is_refused_and_never_executed(finished, records, tmp_path):
    run_dir = _copy(finished, tmp_path)
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    (newest / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="custom_checkpoint_0.pkl"):
        run(_config(run_dir, records, "train.max_steps=4"))

    (newest / "custom_checkpoint_0.pkl").unlink()
    torch.save({"state": _Payload(marker), "param_groups": []}, newest / "optimizer.pt")
    state = json.loads((newest / "trainer_state.json").read_text())
    seal(newest, {k: v for k, v in state.items() if k not in ("files", "format")})  # an attacker who rewrites it
    with pytest.raises(UnsafeCheckpointError, match="optimizer.pt"):
        run(_config(run_dir, records, "train.max_steps=4"))
    assert not marker.exists()


@pytest.mark.reliability("checkpoints", "the newest checkpoint truncated (model.safetensors cut in half)",
                         "skipped with a warning; resume from the previous intact one, each step logged once")
def test_resume_falls_back_to_the_newest_intact_checkpoint(finished, records, tmp_path, capfd):
    run_dir = _copy(finished, tmp_path)
    weights = run_dir / "checkpoints" / "checkpoint-00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    plan = plan_run(_config(run_dir, records, "train.max_steps=4"))
    assert plan.checkpoint.endswith("checkpoint-00000002")
    assert any("skipping checkpoint checkpoint-00000003" in note and "truncated" in note for note in plan.notes)
    run(_config(run_dir, records, "train.max_steps=4"))
    assert _steps(run_dir) == [1, 2, 3, 4]
    logged = capfd.readouterr().err
    assert "skipping checkpoint checkpoint-00000003" in logged and "newest intact checkpoint" in logged


@pytest.mark.reliability("checkpoints", "0-byte, bit-flipped or tensor-missing checkpoint files",
                         "an error naming the file (and the tensor); never random-initialised")
def test_corrupt_checkpoint_files_are_named(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    first, second, third = list_checkpoints(run_dir / "checkpoints")
    (first / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint-00000001/model.safetensors is 0 bytes"):
        verify_checkpoint(first)
    data = bytearray((second / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (second / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt does not match the checksum"):
        verify_checkpoint(second)

    tensors = load_file(str(third / "model.safetensors"))
    dropped = min(tensors)
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(third / "model.safetensors"),
              metadata={"format": "pt"})
    state = json.loads((third / "trainer_state.json").read_text())
    seal(third, {k: v for k, v in state.items() if k not in ("files", "format")})
    from transformers import AutoModelForImageTextToText

    import finevit_vl  # noqa: F401

    model = AutoModelForImageTextToText.from_pretrained(run_dir / "init")
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) \['{dropped}'\]"):
        checkpoint_module.load_weights(model, third, trainable_only=False)


@pytest.mark.reliability("checkpoints", "an intermediate checkpoint loaded with from_pretrained; a LoRA checkpoint "
                         "through `finevit-vl export`", "loadable HF folders equal to the run's own export")
def test_intermediate_checkpoints_are_loadable(finished, records, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import finevit_vl  # noqa: F401
    from finevit_vl.train.export import main as export_main

    final = AutoModelForImageTextToText.from_pretrained(finished / "final")
    last = AutoModelForImageTextToText.from_pretrained(finished / "checkpoints" / "checkpoint-00000003")
    AutoProcessor.from_pretrained(finished / "checkpoints" / "checkpoint-00000001")
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, last.state_dict()[name]), name

    lora_dir = tmp_path / "lora"
    written = run(_config(lora_dir, records, "lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.max_steps=2"))
    assert export_main([str(lora_dir / "checkpoints" / "checkpoint-00000002"), "--out", str(tmp_path / "exported")]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported")
    reference = AutoModelForImageTextToText.from_pretrained(written["model"])
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "exported" / "README.md").exists() and (tmp_path / "exported" / "chat_template.jinja").exists()


@pytest.mark.reliability("preemption", "SIGTERM delivered while a checkpoint is being written",
                         "the save completes, the run stops at the step boundary; resume reaches the same weights")
def test_a_signal_during_a_save_completes_it_then_stops(finished, records, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = checkpoint_module.save_weights

    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "save_weights", signalled_save)
        with pytest.raises(TrainingInterrupted) as stopped:
            run(_config(run_dir, records))
    assert stopped.value.step == 1 and stopped.value.signal_name == "SIGTERM"
    verify_checkpoint(Path(stopped.value.checkpoint))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    run(_config(run_dir, records))
    assert _steps(run_dir) == [1, 2, 3]
    resumed, reference = load_file(str(run_dir / "final" / "model.safetensors")), load_file(str(finished / "final" / "model.safetensors"))
    assert max(float((resumed[k] - reference[k]).abs().max()) for k in reference) <= 1e-6


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """`mount(size)` -> a tmpfs of `size` bytes (root only); unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated with a tmpfs, which needs root")
    mounted = []

    def mount(size: int) -> Path:
        mount_point = tmp_path / f"disk{len(mounted)}"
        mount_point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                                capture_output=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.reliability("checkpoints", "the disk fills up while a checkpoint is written",
                         "a loud error naming the checkpoint and ENOSPC; the previous checkpoint stays loadable")
def test_a_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(finished, records, small_disk):
    # Room for the tiny init, the metrics and one and a half checkpoints.
    one_checkpoint = _tree_size(finished / "checkpoints" / "checkpoint-00000001")
    disk = small_disk(_tree_size(finished / "init") + 3 * one_checkpoint // 2 + 64 * 1024)
    run_dir = disk / "run"
    with pytest.raises(CheckpointError, match=r"saving checkpoint .*checkpoint-00000002 failed: .*No space left"):
        run(_config(run_dir, records, "train.keep_last=5"))
    saved = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in saved] == ["checkpoint-00000001"]
    verify_checkpoint(saved[-1])
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
