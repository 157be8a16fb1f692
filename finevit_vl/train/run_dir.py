"""Who owns a run folder, and what starting a run in it means: a new run, a resume, or a refusal.

* A run folder records its run id in `run.json`; every checkpoint records the id of the run that wrote it. Resume
  (`train.resume: auto`) continues this run from its newest intact checkpoint; pruning only removes this run's.
* A new run (`train.resume: false`) in a folder that holds checkpoints is refused unless `train.overwrite: true`,
  which deletes the previous run's files (listed in `RUN_FILES`) first.
* Resuming with a changed config is refused, listing the changed keys, unless every change is one that takes effect
  mid-run (`CHANGEABLE_ON_RESUME`: learning rates and their schedule, the step budget, logging, evaluation,
  checkpoint cadence, export, the bad-data limits). The config written to `run_dir/config.yaml` and into each
  checkpoint is always the one in force.
"""

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpoint import (
    CheckpointError,
    list_checkpoints,
    new_run_id,
    newest_intact,
    read_run_id,
    read_state,
    remove_tree,
    verify_checkpoint,
    write_run_id,
)
from .config import Config, config_to_dict


logger = logging.getLogger(__name__)

# Keys (fnmatch patterns over dotted names) that may differ between a checkpoint's config and a resumed run's.
CHANGEABLE_ON_RESUME: tuple[str, ...] = (
    "run_dir", "optim.lr", "modules.*.lr", "optim.max_grad_norm", "optim.min_lr_ratio", "optim.warmup_steps",
    "optim.warmup_ratio", "train.max_steps", "train.stop_after_steps", "train.log_every", "train.checkpoint_every",
    "train.keep_last", "train.resume", "train.overwrite", "eval.*", "logging.*", "export.*", "data.eval", "data.eval.*",
    "data.prefetch_steps", "data.max_bad_records", "data.max_bad_fraction", "data.bad_fraction_min_records",
)
# What a run writes into its folder; `train.overwrite` removes exactly these.
RUN_FILES: tuple[str, ...] = (
    "checkpoints", "metrics.jsonl", "bad_records.jsonl", "bad_records_summary.json", "final", "adapter", "eval", "init",
    "run.json", "config.yaml", "deepspeed_universal",
)


class RunDirError(ValueError):
    """Starting this run in this folder would lose or mix up work; the message says what to do instead."""


@dataclass
class RunPlan:
    run_id: str
    checkpoint: str | None = None  # resume from here
    overwrite: bool = False  # delete the previous run's files first
    notes: list[str] = field(default_factory=list)  # warnings for the log


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """`{dotted key: (saved, current)}` for every setting that differs."""
    old, new = _flatten(saved), _flatten(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def refused_changes(changes: dict[str, tuple]) -> dict[str, tuple]:
    return {key: values for key, values in changes.items()
            if not any(fnmatch.fnmatchcase(key, pattern) for pattern in CHANGEABLE_ON_RESUME)}


def check_resumable_config(checkpoint: Path, config: Config) -> list[str]:
    """Raise `RunDirError` listing changed settings that cannot take effect mid-run; notes for the allowed ones."""
    file = Path(checkpoint) / "run_config.yaml"
    try:
        saved = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CheckpointError(f"{file} is missing or unreadable ({error})") from None
    changes = config_changes(saved, config_to_dict(config))
    refused = refused_changes(changes)
    if refused:
        listed = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise RunDirError(
            f"resuming {checkpoint} with a config that changes settings which cannot take effect mid-run:\n{listed}\n"
            f"Resume with the run's own settings (finevit-vl train {Path(config.run_dir) / 'config.yaml'}), start a "
            "new run in another run_dir, or set train.overwrite=true to replace this run. Settings that may change on "
            f"resume: {', '.join(CHANGEABLE_ON_RESUME)}"
        )
    return [f"resuming with changed {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()
            if key not in ("train.resume", "run_dir")]


def plan_run(config: Config) -> RunPlan:
    """Decide, without changing anything, how this run starts in `config.run_dir`."""
    run_dir = Path(config.run_dir)
    folder = run_dir / "checkpoints"
    resume = config.train.resume
    every = list_checkpoints(folder)
    if config.train.overwrite:
        notes = [f"train.overwrite: deleting the previous run's files in {run_dir}"] if (run_dir / "run.json").exists() or every else []
        return RunPlan(new_run_id(), overwrite=True, notes=notes)
    run_id = read_run_id(run_dir)
    if resume not in (True, "auto", False, None, "false", "none"):  # an explicit checkpoint folder
        path = Path(resume).expanduser().resolve()
        state = verify_checkpoint(path)
        in_this_folder = path.parent == folder.resolve()
        run_id = run_id or (state.get("run_id") if in_this_folder else None) or new_run_id()
        return RunPlan(run_id, str(path), notes=check_resumable_config(path, config))
    if resume in (False, None, "false", "none"):
        if every:
            owners = sorted({str(_owner(path)) for path in every})
            raise RunDirError(
                f"{run_dir} already holds checkpoints (newest {every[-1].name}, run {', '.join(owners)}) and "
                "train.resume=false would start a new run over them. Continue that run with train.resume=auto, "
                "start over with train.overwrite=true (deletes its checkpoints, metrics and exports), or choose "
                "another run_dir"
            )
        return RunPlan(run_id or new_run_id())
    if run_id is None:
        if every:
            raise RunDirError(
                f"{run_dir} holds checkpoints (newest {every[-1].name}) but no run.json saying which run owns them, "
                "so they are not resumed automatically. Resume one with train.resume=PATH, start over with "
                "train.overwrite=true, or choose another run_dir"
            )
        return RunPlan(new_run_id())
    own = list_checkpoints(folder, run_id)
    notes = [f"ignoring {len(every) - len(own)} checkpoint(s) of other runs in {folder}"] if len(own) < len(every) else []
    path, skipped = newest_intact(own)
    notes += skipped
    if path is None:
        if own:
            raise RunDirError(f"no intact checkpoint of run {run_id} in {folder}:\n  " + "\n  ".join(skipped))
        return RunPlan(run_id, notes=notes)
    if skipped:
        notes.append(f"resuming from {path.name}, the newest intact checkpoint")
    return RunPlan(run_id, str(path), notes=notes + check_resumable_config(path, config))


def _owner(path: Path) -> str:
    try:
        return read_state(path).get("run_id") or "unknown"
    except CheckpointError:
        return "unknown"


def apply_plan(plan: RunPlan, config: Config) -> None:
    """Main process: delete an overwritten run's files, record the run id. The config is saved by the caller."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.overwrite:
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_file() or path.is_symlink():
                path.unlink()
            elif path.is_dir():
                remove_tree(path)
    write_run_id(run_dir, plan.run_id)


__all__ = ["CHANGEABLE_ON_RESUME", "RUN_FILES", "RunDirError", "RunPlan", "apply_plan", "check_resumable_config",
           "config_changes", "plan_run"]
