"""FSDP2 shard files read back on other world sizes, and unsharded states loaded into FSDP2: exact, on gloo ranks.

A toy model with uneven row counts (7 rows: 4 + 3 on two ranks, 3 + 3 + 1 on three), a tied weight and a parameter
that never gets a gradient takes one AdamW step; whatever writes its state and whatever reads it, the parameters and both AdamW moments that come back are
the ones written, bit for bit, and the optimizer goes on from them.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from finevit_vl.train.sharded_checkpoint import (
    load_full_model_state,
    load_full_optimizer_state,
    load_sharded,
    save_sharded,
    saved_world_size,
)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.hidden = nn.Linear(5, 7)
        self.back = nn.Linear(7, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.embed.weight  # tied, as an LLM's embeddings and LM head
        self.unused = nn.Linear(3, 3)  # trainable but never in the forward: no gradient, no optimizer state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.back(torch.tanh(self.hidden(self.embed(ids)))))).square().mean()


def _trained(seed: int) -> tuple[_Toy, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = _Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.arange(7)).backward()
    optimizer.step()
    optimizer.zero_grad()


def _plain_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"param.{name}": value.detach().clone() for name, value in model.named_parameters()}
    names = {parameter: name for name, parameter in model.named_parameters()}
    for parameter, moments in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:  # not for a parameter that has had no gradient yet
                state[f"{key}.{names[parameter]}"] = moments[key].clone()
    return state


def _sharded(world: int, seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = _Toy()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.hidden, mesh=mesh)
    fully_shard(model.back, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The sharded model's parameters and moments gathered to full tensors (on every rank)."""
    from torch.distributed.tensor import DTensor

    def full(value):
        return value.full_tensor() if isinstance(value, DTensor) else value

    return {key: full(value).detach().clone() for key, value in _plain_state(model, optimizer).items()}


def _worker(rank: int, world: int, init_file: str, job: str, folder: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if job == "train_and_save":
            model, optimizer = _sharded(world, seed=0)
            _step(model, optimizer)
            save_sharded(model, optimizer, Path(folder), rank, world)
        else:
            model, optimizer = _sharded(world, seed=1)  # other weights: everything must come from the file
            _step(model, optimizer)  # the moments exist before loading, as on resume
            if job == "load_sharded":
                load_sharded(model, optimizer, Path(folder), rank, world)
            else:
                plain = torch.load(Path(folder) / "plain.pt", weights_only=True)
                load_full_model_state(model, plain["model"])
                load_full_optimizer_state(model, optimizer, plain["optimizer"])
        state = _full_state(model, optimizer)
        if job != "train_and_save":
            _step(model, optimizer)  # training goes on from the loaded state
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def _launch(tmp_path: Path, world: int, job: str, folder: Path) -> dict[str, torch.Tensor]:
    init_file, out = tmp_path / f"init-{job}-{world}", tmp_path / f"out-{job}-{world}.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(world, str(init_file), job, str(folder), str(out)), nprocs=world,
                       start_method="spawn")
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def written_by_two(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Shard files of two ranks after one step, and the full state they hold."""
    tmp = tmp_path_factory.mktemp("sharded")
    folder = tmp / "sharded"
    return folder, _launch(tmp, 2, "train_and_save", folder)


def _assert_same(loaded: dict[str, torch.Tensor], written: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == written.keys()
    for key, value in written.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_written_by_two_ranks_load_into_fsdp2_on_any_world_size(written_by_two, tmp_path, world):
    folder, written = written_by_two
    assert saved_world_size(folder) == 2
    _assert_same(_launch(tmp_path, world, "load_sharded", folder), written)


def test_shards_load_into_a_plain_module_and_its_optimizer(written_by_two):
    folder, written = written_by_two
    model, optimizer = _trained(seed=1)
    _step(model, optimizer)
    load_sharded(model, optimizer, folder, rank=0, world=1)
    _assert_same(_plain_state(model, optimizer), written)
    assert model.head.weight is model.embed.weight
    assert optimizer.state_dict()["state"][0]["step"] == 1  # AdamW's step count came back too: the next step is 2
    _step(model, optimizer)


def test_an_unsharded_state_loads_into_fsdp2(tmp_path):
    model, optimizer = _trained(seed=0)
    _step(model, optimizer)
    state = {key: value for key, value in model.state_dict().items() if key != "head.weight"}  # tied: saved once
    assert model.unused.weight not in optimizer.state
    torch.save({"model": state, "optimizer": optimizer.state_dict()}, tmp_path / "plain.pt")
    loaded = _launch(tmp_path, 2, "load_full_state", tmp_path)
    # The parameter without saved state starts as AdamW starts it (no state, or zero moments); the step after
    # loading ran in the worker.
    for name in ("unused.weight", "unused.bias"):
        for key in ("exp_avg", "exp_avg_sq"):
            assert not loaded.pop(f"{key}.{name}", torch.zeros(1)).any()
    _assert_same(loaded, _plain_state(model, optimizer))
