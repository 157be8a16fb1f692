"""FSDP2 training state as one safetensors file per rank: written without gathering, read back on any world size.

Each rank writes the local shards of the model's parameters and of the optimizer state (torch's
`torch.distributed.checkpoint.state_dict` API flattens both into `{fully qualified name: tensor}`), with the layout of
every tensor in the file's metadata: its global shape and whether it is split along dim 0 (`fully_shard` on a 1-D
mesh shards every parameter that way, rank r holding chunk r of `torch.chunk`) or replicated::

    sharded/model-rank00000-of-00002.safetensors      local parameter shards, layout + tied-weight aliases
    sharded/optimizer-rank00000-of-00002.safetensors  local AdamW moments and steps, non-tensor values as JSON

Resuming on the same world size, each rank reads its own file and the shards go back in place. On another world
size, or to export a checkpoint without launching its processes, the full tensors are assembled from every rank's
file (chunks concatenated in rank order, checked against the global shape) and each rank cuts its own shards for
the new mesh before `set_*_state_dict`. An unsharded checkpoint (one process / DDP) goes into FSDP2 the same way
(`load_full_model_state`, `load_full_optimizer_state`): every rank reads the full tensors into CPU memory and moves
only its shards to the device.

Why not torch's DCP file format: its `.metadata` is a pickle, and a FineViT-VL checkpoint unpickles nothing
(`finevit_vl.train.checkpoint`).
"""

import json
import re
from pathlib import Path

import torch


MODEL_STEM, OPTIMIZER_STEM = "model", "optimizer"
_NAME = "{stem}-rank{rank:05d}-of-{world:05d}.safetensors"
_FILE = re.compile(r"(model|optimizer)-rank(\d{5})-of-(\d{5})\.safetensors")


class ShardedCheckpointError(RuntimeError):
    """A sharded state that cannot be read back; the message names the file."""


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, **kwargs)


def _layout(value) -> dict:
    """How `value` (a DTensor or a plain tensor) is laid out over the ranks."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(value, DTensor):
        return {"shape": list(value.shape), "dim": None}
    placements = tuple(value.placements)
    if value.device_mesh.ndim != 1 or not isinstance(placements[0], (Shard, Replicate)) or (
            isinstance(placements[0], Shard) and placements[0].dim != 0):
        raise ShardedCheckpointError(
            f"sharded checkpoints support fully_shard on a 1-D mesh (parameters split along dim 0); this state has a "
            f"tensor placed {placements} on a {value.device_mesh.ndim}-D mesh (HSDP?)"
        )
    return {"shape": list(value.shape), "dim": 0 if isinstance(placements[0], Shard) else None}


def _local_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """`(tensors to write, layout, aliases of tied tensors, non-tensor values)` of a flat state dict."""
    from torch.distributed.tensor import DTensor

    tensors, layout, aliases, values, seen = {}, {}, {}, {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            values[key] = value
            continue
        local = value.to_local() if isinstance(value, DTensor) else value
        pointer = (local.data_ptr(), local.shape, local.dtype) if local.numel() else None
        if pointer is not None and pointer in seen:  # tied weights (embeddings / LM head): written once
            aliases[key] = seen[pointer]
            continue
        if pointer is not None:
            seen[pointer] = key
        layout[key] = _layout(value)
        tensors[key] = local.detach().contiguous().cpu()
    return tensors, layout, aliases, values


def save_sharded(model, optimizer, folder: Path, rank: int, world: int, trainable_only: bool = False) -> None:
    """This rank's shards of `model` (an FSDP2 module) and its `optimizer` into `folder` (collective)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    model_state = get_model_state_dict(model, options=_options(ignore_frozen_params=trainable_only))
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_options())
    for stem, state in ((MODEL_STEM, model_state), (OPTIMIZER_STEM, optimizer_state)):
        tensors, layout, aliases, values = _local_tensors(state)
        metadata = {"layout": json.dumps(layout), "aliases": json.dumps(aliases), "values": json.dumps(values)}
        save_file(tensors, str(folder / _NAME.format(stem=stem, rank=rank, world=world)), metadata=metadata)


def saved_world_size(folder: Path) -> int:
    """The number of ranks that wrote the sharded state in `folder`, checked complete."""
    found: dict[str, set[tuple[int, int]]] = {MODEL_STEM: set(), OPTIMIZER_STEM: set()}
    for path in folder.glob("*.safetensors"):
        if match := _FILE.fullmatch(path.name):
            found[match.group(1)].add((int(match.group(2)), int(match.group(3))))
    worlds = {world for entries in found.values() for _, world in entries}
    if len(worlds) != 1:
        raise ShardedCheckpointError(f"{folder}: no consistent set of rank files (found world sizes {sorted(worlds)})")
    world = worlds.pop()
    for stem, entries in found.items():
        missing = sorted(set(range(world)) - {rank for rank, _ in entries})
        if missing:
            raise ShardedCheckpointError(f"{folder}: the {stem} files of rank(s) {missing} of {world} are missing")
    return world


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 - not a dict
        return tensors, json.loads(metadata["layout"]), json.loads(metadata["aliases"]), json.loads(metadata["values"])
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise ShardedCheckpointError(f"{path}: cannot read the sharded state ({error})") from None


def read_full_state(folder: Path, stem: str = MODEL_STEM) -> dict:
    """The full (unsharded) flat state of `stem` assembled from every rank's file, on this process."""
    world = saved_world_size(folder)
    parts = [_read(folder / _NAME.format(stem=stem, rank=rank, world=world)) for rank in range(world)]
    layout, aliases, values = parts[0][1], parts[0][2], parts[0][3]
    state: dict = dict(values)
    for key, entry in layout.items():
        pieces = [tensors[key] for tensors, *_ in parts]
        full = torch.cat(pieces, dim=0) if entry["dim"] == 0 else pieces[0]
        if list(full.shape) != entry["shape"]:
            raise ShardedCheckpointError(f"{folder}: {stem} tensor {key} assembles to {tuple(full.shape)}, "
                                         f"{tuple(entry['shape'])} was written")
        state[key] = full
    for key, target in aliases.items():
        state[key] = state[target]
    return state


def _own_state(folder: Path, stem: str, rank: int, world: int, templates: dict) -> dict:
    """This rank's flat state of `stem` as DTensors placed like `templates` (same world size: no gathering)."""
    from torch.distributed.tensor import DTensor

    tensors, layout, aliases, values = _read(folder / _NAME.format(stem=stem, rank=rank, world=world))
    state: dict = dict(values)
    for key, local in tensors.items():
        template = templates.get(key)
        if isinstance(template, DTensor) and list(template.shape) == layout[key]["shape"]:  # not an AdamW step
            local = _as_dtensor(local, template)
        state[key] = local
    for key, target in aliases.items():
        state[key] = state[target]
    return state


def _shard_of(value: torch.Tensor, template) -> torch.Tensor:
    """This rank's shard of the full `value`, cut on the CPU, as a DTensor placed like `template` (dim-0 chunks as
    `torch.chunk` cuts them, empty for ranks past the last chunk, as DTensor's `Shard(0)` does)."""
    from torch.distributed.tensor import Shard

    mesh, placement = template.device_mesh, template.placements[0]
    local = value
    if isinstance(placement, Shard):
        chunks = torch.chunk(value, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        local = chunks[rank] if rank < len(chunks) else value.new_empty((0, *value.shape[1:]))
    return _as_dtensor(local.to(template.dtype).contiguous(), template)


def _as_dtensor(local: torch.Tensor, template):
    """This rank's shard `local` as a DTensor placed like `template` (moved to its device, no communication)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(template.device), template.device_mesh, template.placements,
                              shape=template.shape, stride=template.stride())


def _placed_like(state: dict, templates: dict) -> dict:
    """A full flat state with each tensor cut to this rank's shard of its template's placement (every rank holds
    the full tensors, so no communication; torch's `full_state_dict` loading broadcasts them instead, and fails on
    another world size)."""
    from torch.distributed.tensor import DTensor

    placed = {}
    for key, value in state.items():
        template = templates.get(key)
        if isinstance(template, DTensor) and isinstance(value, torch.Tensor) and value.shape == template.shape:
            value = _shard_of(value, template)
        placed[key] = value
    return placed


def _optimizer_templates(keys, model_templates: dict) -> dict:
    """An optimizer moment is placed like its parameter: "state.<fqn>.<name>"."""
    return {key: model_templates.get(key.removeprefix("state.").rsplit(".", 1)[0]) for key in keys}


def _set_fsdp_model_state(model, model_state: dict, trainable_only: bool) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, model_state, options=_options(strict=not trainable_only))


def _set_fsdp_optimizer_state(model, optimizer, optimizer_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())


def load_sharded(model, optimizer, folder: Path, rank: int, world: int, trainable_only: bool = False) -> None:
    """Restore `model` and `optimizer` from `folder`, written by any number of ranks: into FSDP2 on any world size
    (collective), or into a plain module (one process, or each DDP rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):  # torch's flattened optimizer form does not load into a plain module's
        model.load_state_dict(read_full_state(folder, MODEL_STEM), strict=not trainable_only)
        optimizer.load_state_dict(_by_parameter_index(read_full_state(folder, OPTIMIZER_STEM), model, optimizer))
        return
    templates = get_model_state_dict(model, options=_options())
    if saved_world_size(folder) == world:
        model_state = _own_state(folder, MODEL_STEM, rank, world, templates)
        optimizer_keys = _read(folder / _NAME.format(stem=OPTIMIZER_STEM, rank=rank, world=world))[1]
        optimizer_state = _own_state(folder, OPTIMIZER_STEM, rank, world, _optimizer_templates(optimizer_keys, templates))
    else:  # another world size: every rank assembles the full tensors and keeps its shards of them
        model_state = _placed_like(read_full_state(folder, MODEL_STEM), templates)
        full_optimizer = read_full_state(folder, OPTIMIZER_STEM)
        optimizer_state = _placed_like(full_optimizer, _optimizer_templates(full_optimizer, templates))
    _set_fsdp_model_state(model, model_state, trainable_only)
    _set_fsdp_optimizer_state(model, optimizer, optimizer_state)


def load_full_model_state(model, model_state: dict, trainable_only: bool = False) -> None:
    """Full tensors keyed by name (an unsharded checkpoint, tied weights saved once) into the FSDP2 `model`
    (collective): every rank reads the full state and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model_state = dict(model_state)
    by_parameter: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):  # tied weights are saved under one name
        if name in model_state:
            by_parameter.setdefault(id(parameter), name)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name not in model_state and id(parameter) in by_parameter:
            model_state[name] = model_state[by_parameter[id(parameter)]]
    templates = get_model_state_dict(model, options=_options())
    _set_fsdp_model_state(model, _placed_like(model_state, templates), trainable_only)


def load_full_optimizer_state(model, optimizer, optimizer_state: dict) -> None:
    """`optimizer.state_dict()` as one process or DDP saved it into the optimizer of the FSDP2 `model` (collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    templates = get_model_state_dict(model, options=_options())
    flat = _by_parameter_name(optimizer_state, model, optimizer)
    _set_fsdp_optimizer_state(model, optimizer, _placed_like(flat, _optimizer_templates(flat, templates)))


def _by_parameter_name(saved: dict, model, optimizer) -> dict:
    """`optimizer.state_dict()` (parameters numbered in the order of the groups) in torch's flat form keyed by
    parameter name, `{"state.<fqn>.<name>": ..., "param_groups.<fqn>.<key>": ...}`: the inverse of
    `_by_parameter_index`."""
    names = {parameter: name for name, parameter in model.named_parameters()}
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ShardedCheckpointError(f"{len(saved['param_groups'])} saved parameter groups, "
                                     f"this run has {len(optimizer.param_groups)}")
    flat: dict = {}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        if len(group["params"]) != len(saved_group["params"]):
            raise ShardedCheckpointError(f"group {group.get('name')!r} holds {len(saved_group['params'])} saved "
                                         f"parameters, this run has {len(group['params'])}")
        settings = {key: value for key, value in saved_group.items() if key != "params"}
        for parameter, index in zip(group["params"], saved_group["params"]):
            fqn = names[parameter]
            for key, value in saved["state"].get(index, {}).items():  # none for a parameter without a gradient yet
                flat[f"state.{fqn}.{key}"] = value
            for key, value in settings.items():
                flat[f"param_groups.{fqn}.{key}"] = value
    return flat


def _by_parameter_index(flat: dict, model, optimizer) -> dict:
    """A flat `{"state.<fqn>.<name>": ..., "param_groups.<fqn>.<key>": ...}` optimizer state as
    `optimizer.state_dict()` has it: parameters numbered in the order of the optimizer's groups."""
    names = {parameter: name for name, parameter in model.named_parameters()}
    state, groups, index = {}, [], 0
    for group in optimizer.param_groups:
        fqns = [names[parameter] for parameter in group["params"]]
        # The saved hyperparameters of the group's first parameter (all of a group's are the same).
        settings = {key: flat.get(f"param_groups.{fqns[0]}.{key}", value) if fqns else value
                    for key, value in group.items() if key != "params"}
        groups.append({**settings, "params": list(range(index, index + len(fqns)))})
        for fqn in fqns:
            moments = {key.rsplit(".", 1)[1]: value for key, value in flat.items()
                       if key.startswith(f"state.{fqn}.") and key.count(".") == fqn.count(".") + 2}
            if moments:
                state[index] = moments
            index += 1
    return {"state": state, "param_groups": groups}


__all__ = [
    "ShardedCheckpointError",
    "load_full_model_state",
    "load_full_optimizer_state",
    "load_sharded",
    "read_full_state",
    "save_sharded",
    "saved_world_size",
]
