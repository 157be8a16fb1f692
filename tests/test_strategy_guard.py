"""The trainer stops at start when the processes launched or the strategy asked for are not what is in force."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from finevit_vl.train.strategy import check_strategy


def _accelerator(distributed_type: str, num_processes: int, device: str = "cpu", backend: str | None = "gloo"):
    return SimpleNamespace(distributed_type=f"DistributedType.{distributed_type}", num_processes=num_processes,
                           device=device, state=SimpleNamespace(backend=backend))


def test_the_strategy_in_force_is_described():
    assert check_strategy(_accelerator("MULTI_CPU", 2), {"WORLD_SIZE": "2"}) == \
        "MULTI_CPU over gloo, 2 process(es), device cpu"
    assert check_strategy(_accelerator("NO", 1, backend=None), {}).startswith("NO over none, 1 process")
    assert check_strategy(_accelerator("FSDP", 8, "cuda:0", "nccl"), {"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"})


@pytest.mark.parametrize("accelerator, env, message", [
    (_accelerator("NO", 1, backend=None), {"WORLD_SIZE": "2"}, r"2 processes were launched .* each would train its own copy"),
    (_accelerator("MULTI_CPU", 2), {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
     r"asked for FSDP .* MULTI_CPU is in force .* only on accelerator devices"),
    (_accelerator("MULTI_GPU", 2, "cuda:0", "nccl"), {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"},
     r"asked for DEEPSPEED .* MULTI_GPU is in force"),
])
def test_a_strategy_other_than_the_one_asked_for_is_refused(accelerator, env, message):
    with pytest.raises(ValueError, match=message) as error:
        check_strategy(accelerator, env)
    assert "accelerate launch --multi_gpu --num_processes" in str(error.value)


@pytest.mark.reliability("distributed", "FSDP1 config launched on a CPU-only machine", "refused at start, exit 2")
def test_an_fsdp1_launch_on_cpu_stops_before_training(tmp_path):
    """FSDP2 runs on CPU processes (see test_train_e2e); FSDP1's flat parameters need accelerators."""
    root = Path(__file__).resolve().parents[1]
    config = (root / "train_configs/accelerate/fsdp2.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1")
    (tmp_path / "fsdp1.yaml").write_text(config)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp1.yaml"),
               "--num_processes", "2", "--main_process_port", "29517",
               "-m", "finevit_vl.train", str(root / "train_configs/tiny_cpu_stage3.yaml"), f"run_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "the launch asked for FSDP version 1, which needs accelerator devices" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
