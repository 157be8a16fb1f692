"""Atomic, verified checkpoints that unpickle nothing (DeepSpeed's own files aside), and the run identity that resume checks.

Layout::

    run_dir/run.json                            {"run_id": ...}: which run owns this folder
    run_dir/checkpoints/checkpoint-00000200/
        config.json, model.safetensors, processor files   full fine-tune: a loadable Hugging Face folder
        trainable.safetensors                             LoRA: the trained tensors (`finevit-vl export` merges them)
        optimizer.pt                                      tensors and plain values only, loaded with weights_only=True
        sharded/{model,optimizer}-rankR-of-W.safetensors  FSDP2 instead: each rank's shards (`sharded_checkpoint`)
        sharded/engine/                                   DeepSpeed instead: the engine's partitioned files
        rng_rank{rank}.json, data_state_rank{rank}.json   RNG and data position of every rank
        run_config.yaml                                   the resolved training config in force
        trainer_state.json                                step, counters, run id, size + sha256 of every file; last

Nothing in a FineViT-VL checkpoint is unpickled, with one exception: DeepSpeed's own files (`sharded/engine/`), which
DeepSpeed writes with `torch.save` of Python objects and reads with `weights_only=False`; they are read only after
the manifest check, by a DeepSpeed run or by DeepSpeed's `zero_to_fp32` in `finevit-vl export` (the universal copy
a world-size change makes from them is made, read and removed within one resume: `deepspeed_checkpoint`).
Otherwise: weights are safetensors, the optimizer state goes through `torch.load(weights_only=True)`, the rest is
JSON / YAML, and a file that the manifest does not list is refused.
The scheduler is not stored: it is a function of the step and the config, rebuilt on resume (so a deliberately
changed learning rate takes effect).

A checkpoint resumes on another number of processes (DeepSpeed's: ZeRO-1/2, through DeepSpeed's universal format):
the weights and optimizer state are the same on every rank or resharded from the FSDP files (an unsharded checkpoint
into FSDP2 too), and every old rank's data position goes to the new stream
(`TrainStream.continue_from`), which reads on without repeats or gaps.

A save writes into `.tmp-checkpoint-N`, fsyncs every file, renames the folder and fsyncs the parent; a crash, a
SIGKILL or a full disk leaves the previous checkpoint as the newest intact one. On resume a checkpoint whose files
do not match their manifest (truncated, corrupt, missing) is skipped with a warning in favour of the previous one.
Pruning keeps the last `keep_last` checkpoints of this run and never touches another run's.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from .deepspeed_checkpoint import (
    UNIVERSAL_FOLDER,
    clear,
    convert_to_universal,
    gathered_weights,
    load_universal,
    saved_by_zero3,
    wait_for_conversion,
)
from .sharded_checkpoint import (
    MODEL_STEM,
    ShardedCheckpointError,
    load_full_model_state,
    load_full_optimizer_state,
    load_sharded,
    read_full_state,
    save_sharded,
)


logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"
FORMAT_VERSION = 2
DEEPSPEED_TAG = "engine"  # DeepSpeed's checkpoint tag: the folder inside checkpoint-N/sharded
_NAME = re.compile(rf"{PREFIX}(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the checkpoint and the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding a file that could execute code when loaded (never skipped silently)."""


# ---------------------------------------------------------------------------------------------------- file helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict | list) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=1)
        file.flush()
        os.fsync(file.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict]:
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != STATE_FILE
    }


def checkpoint_step(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def read_state(path: Path) -> dict:
    """`trainer_state.json` of a checkpoint; `CheckpointError` naming the file if absent or unreadable."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file} is unreadable or corrupt ({error})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file} is not a trainer state (no 'step')")
    if state.get("format") != FORMAT_VERSION:
        raise UnsafeCheckpointError(
            f"{path} was written by an older FineViT-VL whose resume state is pickled (Accelerate's *.pkl); it is not "
            "loaded, since unpickling can run code. Its weights still load with from_pretrained if it has "
            "config.json; start a new run from them (model.path) instead of resuming"
        )
    return state


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the manifest; returns the trainer state.

    Raises `CheckpointError` for a truncated, corrupt or missing file and `UnsafeCheckpointError` for a file the
    manifest does not list (e.g. a planted pickle).
    """
    path = Path(path)
    state = read_state(path)
    files = state.get("files", {})
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != STATE_FILE}
    planted = sorted(present - set(files))
    if planted:
        raise UnsafeCheckpointError(
            f"{path} holds file(s) that its manifest does not list: {planted}; refusing to resume from it (a planted "
            "file, e.g. a pickle, could run code). Remove them if you trust their origin, or resume from another "
            "checkpoint (train.resume=PATH)"
        )
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from the checkpoint")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{file} is {size} bytes, {expected['size']} were written: truncated or corrupt")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match the checksum written with it: corrupt")
    return state


def list_checkpoints(folder: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """Checkpoint folders with a trainer state in `folder` (of `run_id` when given), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if not (_NAME.fullmatch(path.name) and (path / STATE_FILE).exists()):
            continue
        if run_id is not None:
            try:
                if json.loads((path / STATE_FILE).read_text()).get("run_id") != run_id:
                    continue
            except (OSError, ValueError):
                pass  # unreadable: kept in the list, so resume reports it and falls back
        found.append(path)
    return sorted(found, key=checkpoint_step)


def newest_intact(paths: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a message for each newer one skipped as corrupt."""
    skipped = []
    for path in reversed(paths):
        try:
            verify_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as error:
            skipped.append(f"skipping checkpoint {path.name}: {error}")
            continue
        return path, skipped
    return None, skipped


# ---------------------------------------------------------------------------------------------------- run identity


def read_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())["run_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{Path(run_dir) / RUN_FILE} is corrupt ({error}); fix or delete it") from None


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def write_run_id(run_dir: Path, run_id: str) -> None:
    write_json(Path(run_dir) / RUN_FILE, {"run_id": run_id})


# ---------------------------------------------------------------------------------------------------- RNG as JSON


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    data = {
        "python": [version, list(state), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        data["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return data


def set_rng_state(data: dict) -> None:
    version, state, gauss = data["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, position, has_gauss, cached = data["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(data["torch"], dtype=torch.uint8))
    if "cuda" in data and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in data["cuda"]])


# ---------------------------------------------------------------------------------------------------- weights


def _weight_files(path: Path, stem: str) -> list[Path]:
    index = path / f"{stem}.safetensors.index.json"
    if index.exists():
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = path / f"{stem}.safetensors"
    return [single] if single.exists() else []


def read_checked_weights(model: torch.nn.Module, path: Path, trainable_only: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's full tensors for `model`, checked: every expected tensor is there, with its shape.

    Full fine-tune checkpoints may omit tied weights (saved once); LoRA checkpoints hold the trainable tensors; FSDP2
    checkpoints hold every rank's shards, assembled here into the full tensors; DeepSpeed's are gathered by DeepSpeed.
    `model` may itself be sharded by FSDP2 (its state dict then has the global shapes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    layout = _saved_layout(path)
    if layout == "fsdp":
        files = [path / "sharded"]
        try:
            state = read_full_state(files[0], MODEL_STEM)
        except ShardedCheckpointError as error:
            raise CheckpointError(str(error)) from None
    elif layout == "deepspeed":
        files = [path / "sharded" / DEEPSPEED_TAG]
        try:
            state = gathered_weights(path / "sharded", DEEPSPEED_TAG)
        except RuntimeError as error:
            raise CheckpointError(str(error)) from None
    else:
        stem = "trainable" if trainable_only else "model"
        files = _weight_files(path, stem)
        if not files:
            raise CheckpointError(f"{path} has no {stem}.safetensors")
        for file in files:
            try:
                state.update(load_file(str(file)))
            except (SafetensorError, OSError, ValueError) as error:
                raise CheckpointError(f"{file}: cannot read safetensors ({error})") from None
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights: one Parameter, several names
    own = model.state_dict()
    expected = {n for n, p in params.items() if p.requires_grad} if trainable_only else set(own)
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{files[0]}: tensors the model does not have: {unexpected[:5]}")
    loaded = {id(params[n]) for n in state if n in params}
    missing = sorted(n for n in expected - set(state) if not (n in params and id(params[n]) in loaded))
    if missing:
        raise CheckpointError(f"{files[0]}: missing tensor(s) {missing[:5]} (of {len(missing)}); not resuming with "
                              "randomly initialised weights")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"{files[0]}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(own[name].shape)}")
    return state


def load_weights(model: torch.nn.Module, path: Path, trainable_only: bool) -> None:
    """Load a checkpoint's safetensors into a plain (unsharded) `model`, checked as `read_checked_weights` does."""
    model.load_state_dict(read_checked_weights(model, path, trainable_only), strict=False)


def save_weights(model: torch.nn.Module, state_dict: dict, processor, folder: Path, trainable_only: bool) -> None:
    """Full fine-tune: a Hugging Face folder (config, weights, processor). LoRA: the trainable tensors."""
    if trainable_only:
        from safetensors.torch import save_file

        names = {n for n, p in model.named_parameters() if p.requires_grad}
        save_file({n: t.detach().contiguous().cpu() for n, t in state_dict.items() if n in names},
                  str(folder / "trainable.safetensors"))
        return
    model.save_pretrained(folder, state_dict=state_dict)
    processor.save_pretrained(folder)


def save_extra_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """State that is not the model's (the EMA teacher of region self-distillation) as `name.safetensors`."""
    from safetensors.torch import save_file

    save_file({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, str(folder / f"{name}.safetensors"))


def load_extra_tensors(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(path) / f"{name}.safetensors"
    if not file.exists():
        raise CheckpointError(f"{file} is missing: the checkpoint was saved without {name} (a run without "
                              "distill.enabled?); resume with the settings it was saved with")
    return load_file(str(file))


def load_optimizer_state(path: Path, device) -> dict:
    file = path / "optimizer.pt"
    device = torch.device(device)
    if device.type == "cpu":  # gloo ranks run on "cpu:0", a location torch.load does not restore
        device = torch.device("cpu")
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise UnsafeCheckpointError(f"{file} holds objects other than tensors and plain values; refusing to "
                                        f"unpickle it ({str(error).splitlines()[0]})") from None
        raise CheckpointError(f"{file}: cannot read the optimizer state ({error})") from None


def remove_tree(path: Path) -> None:
    """Remove a folder without following symlinks out of it."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def finalize(tmp: Path, final: Path) -> None:
    """fsync every file of `tmp`, rename it to `final` (replacing a folder of the same step), fsync the parent."""
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync_path(file)
    _fsync_path(tmp)
    if final.exists():  # re-saving a step (e.g. a resumed run stopped at the same step): swap
        old = final.with_name(final.name + ".old")
        remove_tree(old)
        final.rename(old)
        tmp.rename(final)
        remove_tree(old)
    else:
        tmp.rename(final)
    _fsync_path(final.parent)


def seal(tmp: Path, state: dict) -> None:
    """Write the manifest of everything in `tmp` with the trainer state, last."""
    write_json(tmp / STATE_FILE, {**state, "format": FORMAT_VERSION, "files": _manifest(tmp)})


def prune(folder: Path, run_id: str, keep_last: int) -> None:
    for stale in list_checkpoints(folder, run_id)[: -max(1, keep_last)]:
        remove_tree(stale)



# ---------------------------------------------------------------------------------------------------- the manager


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")


def _fsdp(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


_LAYOUT_WORDS = {"full": "unsharded (one process / DDP)", "fsdp": "sharded by FSDP2", "deepspeed": "by DeepSpeed"}


def _saved_layout(path: Path) -> str:
    """How a checkpoint holds the weights: "full" (a Hugging Face folder), "fsdp" (per-rank shard files) or
    "deepspeed" (the engine's own folder)."""
    sharded = path / "sharded"
    if not sharded.is_dir():
        return "full"
    return "fsdp" if any(sharded.glob("model-rank*.safetensors")) else "deepspeed"


def _describe(error: BaseException, folder: Path) -> str:
    """The error, plus the free space when the disk is (nearly) full: torch's writer hides ENOSPC."""
    text = f"{type(error).__name__}: {error}"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return text
    if "No space left" not in text and free < 16 * 2**20:
        text += f" (No space left on device: {free} bytes free on {folder})"
    return text


class CheckpointManager:
    """Saves and loads the training state of every rank (collective calls)."""

    def __init__(self, accelerator, run_dir: str | os.PathLike, keep_last: int, run_id: str) -> None:
        self.accelerator = accelerator
        self.folder = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)
        self.run_id = run_id

    def _all_ok(self, ok: bool) -> bool:
        flag = torch.tensor(0.0 if ok else 1.0, device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) == 0

    def save(self, step: int, model, optimizer, processor, trainer_state: dict, data_state: dict, config_text: str,
             trainable_only: bool, extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write checkpoint `step`; on failure (e.g. a full disk) the partial folder is removed on every rank and
        `CheckpointError` names the folder and the cause, while the previous checkpoint stays intact."""
        accelerator = self.accelerator
        final = self.folder / f"{PREFIX}{step:08d}"
        tmp = self.folder / f"{TMP_PREFIX}{step:08d}"
        error: BaseException | None = None
        if accelerator.is_main_process:
            try:
                for stale in self.folder.glob(f"{TMP_PREFIX}*"):
                    remove_tree(stale)
                tmp.mkdir(parents=True)
            except OSError as err:
                error = err
        accelerator.wait_for_everyone()
        state_dict = None
        if self._all_ok(error is None):
            try:
                if _fsdp(accelerator):
                    save_sharded(model, getattr(optimizer, "optimizer", optimizer), tmp / "sharded",
                                 accelerator.process_index, accelerator.num_processes, trainable_only)
                elif _sharded(accelerator):  # DeepSpeed: the engine's own partitioned files
                    model.save_checkpoint(str(tmp / "sharded"), tag=DEEPSPEED_TAG, save_latest=False)
                else:
                    state_dict = accelerator.get_state_dict(model)
                    if accelerator.is_main_process:
                        unwrapped = accelerator.unwrap_model(model)
                        save_weights(unwrapped, state_dict, processor, tmp, trainable_only)
                        torch.save(getattr(optimizer, "optimizer", optimizer).state_dict(), tmp / "optimizer.pt")
                if accelerator.is_main_process:
                    for name, tensors in (extra_tensors or {}).items():  # e.g. the EMA teacher (not sharded)
                        save_extra_tensors(tmp, name, tensors)
                write_json(tmp / f"data_state_rank{accelerator.process_index}.json", data_state)
                write_json(tmp / f"rng_rank{accelerator.process_index}.json", rng_state())
            except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
                error = err  # (ShardedCheckpointError is a RuntimeError too)
        del state_dict
        saved = self._all_ok(error is None)
        if saved and accelerator.is_main_process:
            try:
                (tmp / "run_config.yaml").write_text(config_text)
                seal(tmp, {**trainer_state, "step": step, "world_size": accelerator.num_processes, "run_id": self.run_id,
                           "trainable_only": trainable_only})
                finalize(tmp, final)
                prune(self.folder, self.run_id, self.keep_last)
            except OSError as err:
                error = err
        saved = self._all_ok(error is None) and saved
        if not saved:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = list_checkpoints(self.folder, self.run_id)
            cause = _describe(error, self.folder) if error else "failed on another rank"
            raise CheckpointError(
                f"saving checkpoint {final} failed: {cause}; the newest checkpoint left is "
                f"{previous[-1] if previous else 'none'}"
            )
        if accelerator.is_main_process:
            logger.info("saved checkpoint %s", final)
        return final

    def _load_deepspeed_universal(self, path: Path, engine, saved_world: int) -> None:
        """A DeepSpeed ZeRO-1/2 checkpoint of `saved_world` processes into this run's engine on another number: rank 0
        converts it to DeepSpeed's universal format, every rank loads that, rank 0 removes it (`deepspeed_checkpoint`)."""
        accelerator = self.accelerator
        engine_dir = path / "sharded" / DEEPSPEED_TAG
        if engine.zero_optimization_partition_weights() or saved_by_zero3(engine_dir):
            raise CheckpointError(
                f"{path} was saved by DeepSpeed on {saved_world} processes, this run has {accelerator.num_processes}: "
                "ZeRO-3 checkpoints resume on the same number of processes (DeepSpeed's universal conversion of ZeRO-3 "
                "keeps no AdamW step count: resumed losses left the uninterrupted run's by 0.1 from the second step); "
                f"resume on {saved_world} processes, or export it (`finevit-vl export {path} --out DIR`: the weights, "
                "without the optimizer state) and start a new run from the export"
            )
        folder = self.folder.parent / UNIVERSAL_FOLDER
        error: OSError | None = None
        if accelerator.is_main_process:
            clear(folder)
            try:
                folder.mkdir(parents=True)
            except OSError as err:
                error = err
        if not self._all_ok(error is None):  # also the barrier: no rank reads a marker an earlier attempt left
            raise CheckpointError(f"{folder}: cannot make the folder for DeepSpeed's universal copy ({error or 'rank 0'})")
        failure: str | None = None
        if accelerator.is_main_process:
            try:
                convert_to_universal(engine_dir, folder)
            except (OSError, RuntimeError) as err:
                failure = str(err)
        else:
            failure = wait_for_conversion(folder)
        if failure is not None:  # every rank read it from the marker: no collective needed
            raise CheckpointError(f"{path} was saved by DeepSpeed on {saved_world} processes, this run has "
                                  f"{accelerator.num_processes}, and converting it to DeepSpeed's universal format "
                                  f"failed: {failure}")
        if not load_universal(engine, folder):
            raise CheckpointError(f"{folder}: DeepSpeed found no universal state to load")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            clear(folder)
        logger.info("DeepSpeed checkpoint of %d process(es) loaded through its universal format", saved_world)

    def _load_full(self, path: Path, model, optimizer, trainable_only: bool) -> None:
        """A Hugging Face folder + `optimizer.pt` (one process / DDP) into one process, DDP or FSDP2."""
        from torch.distributed.fsdp import FSDPModule

        accelerator = self.accelerator
        into_fsdp2 = _fsdp(accelerator)
        if into_fsdp2 and not isinstance(model, FSDPModule):
            raise CheckpointError(f"{path} was saved unsharded (one process / DDP) and this run is FSDP1, which does "
                                  "not load it: use FSDP2 (fsdp_version: 2), or the strategy it was saved with")
        inner = getattr(optimizer, "optimizer", optimizer)
        # Into FSDP2 every rank reads the whole state: on the CPU, keeping only its shards on the device.
        saved = load_optimizer_state(path, "cpu" if into_fsdp2 else accelerator.device)
        names = [group.get("name") for group in inner.param_groups]
        saved_names = [group.get("name") for group in saved["param_groups"]]
        if names != saved_names:
            raise CheckpointError(f"{path / 'optimizer.pt'}: parameter groups {saved_names}, this run has {names}")
        if into_fsdp2:
            load_full_model_state(model, read_checked_weights(model, path, trainable_only), trainable_only)
        else:
            load_weights(accelerator.unwrap_model(model), path, trainable_only)
        try:
            if into_fsdp2:
                load_full_optimizer_state(model, inner, saved)
            else:
                inner.load_state_dict(saved)
        except (ValueError, KeyError, ShardedCheckpointError) as error:  # torch: "... doesn't match the size ..."
            raise CheckpointError(
                f"{path / 'optimizer.pt'}: its parameter groups hold other parameters than this run trains ({error}); "
                "the freeze policy (modules.*.train) differs from the run that saved it"
            ) from None

    def load(self, path: Path, model, optimizer) -> tuple[dict, list[dict]]:
        """Restore weights, optimizer and RNG from a verified checkpoint; returns `(trainer_state, data_states)`
        with the data state of every rank that saved it, in rank order."""
        accelerator = self.accelerator
        path = Path(path)
        state = read_state(path)
        saved_world, world = state["world_size"], accelerator.num_processes
        layout = _saved_layout(path)
        in_force = accelerator.distributed_type.name
        # FSDP2 shard files and full folders load into FSDP2, one process and DDP alike; DeepSpeed reads its own.
        loadable = {"DEEPSPEED": ("deepspeed",)}.get(in_force, ("full", "fsdp"))
        if layout not in loadable:
            raise CheckpointError(
                f"{path} was saved {_LAYOUT_WORDS[layout]} but this run is {in_force}; resume with the strategy it was "
                f"saved with, or export it (`finevit-vl export {path} --out DIR`) and start a new run from the export"
            )
        if layout == "fsdp":  # into FSDP2 on any number of processes, or into one process / DDP
            target = model if in_force == "FSDP" else accelerator.unwrap_model(model)
            try:
                load_sharded(target, getattr(optimizer, "optimizer", optimizer), path / "sharded",
                             accelerator.process_index, world, state.get("trainable_only", False))
            except ShardedCheckpointError as error:
                raise CheckpointError(str(error)) from None
        elif layout == "deepspeed" and saved_world != world:  # the partitions merged once, then read on any world
            self._load_deepspeed_universal(path, model, saved_world)
        elif layout == "deepspeed":
            loaded, _ = model.load_checkpoint(str(path / "sharded"), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"{path / 'sharded'}: DeepSpeed found no engine state to load")
        else:
            self._load_full(path, model, optimizer, state.get("trainable_only", False))
        rank = accelerator.process_index
        # Every rank gets every old rank's data position (on another world size the stream works out what is left
        # from all of them); a rank that did not exist before starts from a seeded RNG.
        try:
            if rank < saved_world:
                set_rng_state(json.loads((path / f"rng_rank{rank}.json").read_text()))
            else:
                from accelerate.utils import set_seed

                set_seed(state["step"] * 1009 + rank)
            data_states = [json.loads((path / f"data_state_rank{r}.json").read_text()) for r in range(saved_world)]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: the RNG or data state of rank {rank} is unreadable ({error})") from None
        if saved_world != world:
            logger.warning("resuming %s, saved by %d process(es), on %d: the data position of every old rank is "
                           "carried over, so the stream goes on without repeats or gaps", path, saved_world, world)
        logger.info("resumed from %s (step %d)", path, state["step"])
        return state, data_states


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "UnsafeCheckpointError",
    "checkpoint_step",
    "finalize",
    "list_checkpoints",
    "load_extra_tensors",
    "load_optimizer_state",
    "load_weights",
    "new_run_id",
    "newest_intact",
    "prune",
    "read_checked_weights",
    "read_run_id",
    "read_state",
    "remove_tree",
    "rng_state",
    "save_weights",
    "seal",
    "set_rng_state",
    "verify_checkpoint",
    "write_json",
    "write_run_id",
]
