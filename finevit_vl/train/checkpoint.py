"""Atomic, resumable checkpoints: `accelerator.save_state` (model, optimizer, scheduler, RNG of every rank) plus the
data position of every rank and the trainer counters, written to a temporary folder and renamed when complete.

Layout::

    run_dir/checkpoints/checkpoint-00000200/
        model.safetensors, optimizer.bin, custom_checkpoint_0.pkl (scheduler), random_states_{rank}.pkl  (accelerate)
        data_state_rank{rank}.json      source cursor, pass, bad-record count of each rank
        trainer_state.json              step, counters, world size; written last

A crash or SIGKILL during a save leaves a `.tmp-checkpoint-*` folder that is ignored (and removed by the next
save), so the previous checkpoint stays the latest usable one. Only the last `keep_last` checkpoints are kept.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path


logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=2)
        file.flush()
        os.fsync(file.fileno())


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


class CheckpointManager:
    def __init__(self, accelerator, run_dir: str | os.PathLike, keep_last: int) -> None:
        self.accelerator = accelerator
        self.folder = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def latest(self) -> Path | None:
        checkpoints = list_checkpoints(self.folder)
        return checkpoints[-1] if checkpoints else None

    def save(self, step: int, trainer_state: dict, data_state: dict) -> Path:
        """Save on every rank (collective); returns the final folder."""
        accelerator = self.accelerator
        final = self.folder / f"{PREFIX}{step:08d}"
        tmp = self.folder / f"{TMP_PREFIX}{step:08d}"
        if accelerator.is_main_process:
            for stale in self.folder.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        _write_json(tmp / f"data_state_rank{accelerator.process_index}.json", data_state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_json(tmp / STATE_FILE, {**trainer_state, "step": step, "world_size": accelerator.num_processes})
            if final.exists():  # re-saving a step (e.g. a resumed run stopped at the same step): swap atomically
                old = final.with_name(final.name + ".old")
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            for stale in list_checkpoints(self.folder)[: -self.keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    def load(self, path: str | os.PathLike) -> tuple[dict, dict]:
        """Restore model / optimizer / scheduler / RNG; returns `(trainer_state, this rank's data_state)`."""
        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        trainer_state = json.loads((path / STATE_FILE).read_text())
        if trainer_state["world_size"] != self.accelerator.num_processes:
            raise ValueError(
                f"{path} was saved by {trainer_state['world_size']} processes but this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes (the data position is "
                "per rank)"
            )
        self.accelerator.load_state(str(path))
        data_state = json.loads((path / f"data_state_rank{self.accelerator.process_index}.json").read_text())
        logger.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state, data_state


__all__ = ["CheckpointManager", "list_checkpoints"]
