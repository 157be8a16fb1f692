"""DeepSpeed engine checkpoints resumed on another number of processes, through DeepSpeed's universal format.

The engine's own files (`checkpoint-N/sharded/engine/`) hold each rank's ZeRO partitions and load only on the world
size that wrote them. DeepSpeed's converter (`python -m deepspeed.checkpoint.ds_to_universal`) merges them into one
folder per parameter (fp32 weights, AdamW moments, step) that an engine on any world size loads with
`load_universal_checkpoint`. ZeRO-1/2 only: DeepSpeed's conversion of ZeRO-3 keeps no AdamW step count, so the
checkpoint manager refuses a ZeRO-3 world-size change.

The universal copy is DeepSpeed's pickled format, so it is never kept: rank 0 makes it from the engine files of a
checkpoint that has just passed its manifest check, into `run_dir/deepspeed_universal/` (removed first), every rank
loads it, and rank 0 removes it. While rank 0 converts, the other ranks wait on a marker file rather than in a
collective, whose timeout (10 minutes under NCCL) a large model's conversion can exceed.
"""

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


logger = logging.getLogger(__name__)

UNIVERSAL_FOLDER = "deepspeed_universal"  # in the run dir, only while a resume loads it
UNIVERSAL_TAG = "universal"
_DONE, _FAILED = "converted", "failed"


def saved_by_zero3(engine_dir: Path) -> bool:
    """ZeRO-3 engines write each rank's share of the module (`zero_pp_rank_R_mp_rank_00_model_states.pt`), ZeRO-1/2
    one `mp_rank_00_model_states.pt`."""
    return any(engine_dir.glob("zero_pp_rank_*_model_states.pt"))


def clear(folder: Path) -> None:
    """Remove a universal copy (and what an earlier attempt left)."""
    shutil.rmtree(folder, ignore_errors=True)


def convert_to_universal(engine_dir: Path, folder: Path) -> None:
    """Convert the engine files in `engine_dir` into `folder/UNIVERSAL_TAG` (one process; `folder` exists and is
    empty), then write the marker that the waiting ranks read: `_DONE`, or `_FAILED` with the reason (and raise)."""
    workers = str(max(1, min(8, os.cpu_count() or 1)))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(engine_dir),
               "--output_folder", str(folder / UNIVERSAL_TAG), "--num_extract_workers", workers,
               "--num_merge_workers", workers,
               "--inject_missing_state"]  # our engines do not record `universal_checkpoint_info`; the default is right
    logger.info("converting %s to DeepSpeed's universal format in %s", engine_dir, folder)
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace", check=False,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if result.returncode != 0:
            lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
            raise RuntimeError(f"{engine_dir}: DeepSpeed's ds_to_universal failed ({result.returncode}): {lines[-1]}")
    except (OSError, RuntimeError) as error:
        (folder / _FAILED).write_text(str(error))
        raise
    (folder / _DONE).write_text("")


def wait_for_conversion(folder: Path, timeout_seconds: float = 6 * 3600, poll_seconds: float = 1.0) -> str | None:
    """On the ranks that do not convert: block until rank 0's marker appears; returns the failure, or None."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if (folder / _DONE).exists():
            return None
        if (folder / _FAILED).exists():
            return (folder / _FAILED).read_text() or "the conversion failed on rank 0"
        time.sleep(poll_seconds)
    return f"rank 0 wrote no {_DONE} or {_FAILED} marker into {folder} within {timeout_seconds:.0f} s"


def gathered_weights(sharded_dir: Path, tag: str) -> dict:
    """The full fp32 weights of the engine checkpoint `sharded_dir/tag` (any ZeRO stage), gathered on this process by
    DeepSpeed's own `zero_to_fp32` (for `finevit-vl export`; no optimizer state)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:
        raise RuntimeError(f"{sharded_dir} holds DeepSpeed engine files; reading them needs deepspeed "
                           f"(pip install 'finevit-vl[all]'): {error}") from None
    try:
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(sharded_dir), tag=tag))
    except (OSError, ValueError, KeyError) as error:
        raise RuntimeError(f"{sharded_dir / tag}: DeepSpeed could not gather the weights ({error})") from None


def load_universal(engine, folder: Path) -> bool:
    """Load the universal copy in `folder` into `engine` (collective); False when DeepSpeed found nothing."""
    config = engine._config  # the flag is read at load time only; the launch's ds_config stays as the user wrote it
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        loaded, _ = engine.load_checkpoint(str(folder), tag=UNIVERSAL_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = before
    return loaded is not None


__all__ = ["UNIVERSAL_FOLDER", "UNIVERSAL_TAG", "clear", "convert_to_universal", "gathered_weights", "load_universal", "saved_by_zero3", "wait_for_conversion"]
