"""DeepSpeed engine checkpoints resumed on another number of processes, through DeepSpeed's universal format.

The engine's own files (`checkpoint-N/sharded/engine/`) hold each rank's ZeRO partitions and load only on the world
size that wrote them. DeepSpeed's converter (`python -m deepspeed.checkpoint.ds_to_universal`) merges them into one
folder per parameter (fp32 weights, AdamW moments, step) that an engine on any world size loads with
`load_universal_checkpoint`. ZeRO-1/2 only: DeepSpeed's conversion of ZeRO-3 keeps no AdamW step count, so the
checkpoint manager refuses a ZeRO-3 world-size change. The conversion is written once per checkpoint next to the
checkpoints (`run_dir/deepspeed_universal/checkpoint-N-<digest of its trainer_state.json>/`), outside the verified
checkpoint, which stays as it was saved; like the engine files, it is DeepSpeed's pickled format, made and read by
DeepSpeed from files that passed the manifest check.
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path


logger = logging.getLogger(__name__)

UNIVERSAL_TAG = "universal"


def universal_folder(checkpoint: Path) -> Path:
    """Where the universal copy of `checkpoint` (run_dir/checkpoints/checkpoint-N) lives: `<folder>/universal`.
    Named by the digest of the checkpoint's manifest, so a copy never outlives the checkpoint it was made from."""
    digest = hashlib.sha256((checkpoint / "trainer_state.json").read_bytes()).hexdigest()[:16]
    return checkpoint.parent.parent / "deepspeed_universal" / f"{checkpoint.name}-{digest}"


def saved_by_zero3(engine_dir: Path) -> bool:
    """ZeRO-3 engines write each rank's share of the module (`zero_pp_rank_R_mp_rank_00_model_states.pt`), ZeRO-1/2
    one `mp_rank_00_model_states.pt`."""
    return any(engine_dir.glob("zero_pp_rank_*_model_states.pt"))


def convert_to_universal(engine_dir: Path, checkpoint: Path) -> Path:
    """Convert the engine files in `engine_dir` once (one process); returns the folder to pass to `load_checkpoint`
    with tag `UNIVERSAL_TAG`. A conversion cut off halfway is redone, never read; copies of other checkpoints are
    removed."""
    folder = universal_folder(checkpoint)
    final, partial = folder / UNIVERSAL_TAG, folder / f"{UNIVERSAL_TAG}.partial"
    if final.is_dir():
        return folder
    if folder.parent.is_dir():  # copies of other (older) checkpoints: each is a full fp32 + AdamW copy of the model
        for stale in folder.parent.iterdir():
            shutil.rmtree(stale)
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(engine_dir),
               "--output_folder", str(partial), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]  # our engines do not record `universal_checkpoint_info`; the default is right
    logger.info("converting %s to DeepSpeed's universal format in %s", engine_dir, final)
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"{engine_dir}: DeepSpeed's ds_to_universal failed ({result.returncode}): "
                           f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.stdout[-500:]}")
    partial.rename(final)
    return folder


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


__all__ = ["UNIVERSAL_TAG", "convert_to_universal", "load_universal", "saved_by_zero3", "universal_folder"]
