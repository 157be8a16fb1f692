"""Final export in Hugging Face format, with the processor and its chat template next to the weights.

* Full / partial fine-tune: `run_dir/final` (or `export.dir`), loadable with `AutoModelForImageTextToText` and
  `AutoProcessor` after `import finevit_vl`.
* LoRA / QLoRA (`lora.export`): `adapter` writes a PEFT adapter folder `run_dir/adapter` (LoRA weights plus the
  fully trained modules, e.g. the projector, as `modules_to_save`, and the processor), loadable with
  `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter_dir)`; `merged` writes the
  merged model to `run_dir/final`. A quantized base is never merged in 4-bit: the base is reloaded in full
  precision from its path, the adapter applied and merged.

Folders are written to a temporary name and renamed when complete.
"""

import contextlib
import logging
import shutil
from pathlib import Path

import torch

from ..cli import report_user_error
from ..model_card import write_model_card


logger = logging.getLogger(__name__)


ENCODER_STAGE_TYPES = ("finevit_mim", "finevit_contrastive")


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _tmp(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


@contextlib.contextmanager
def plain_class(model: torch.nn.Module):
    """`model` seen as its own class while it is saved: FSDP2 swaps a module's class for a generated subclass
    defined in torch, and Transformers copies the remote code of the class it sees (torch's files, not ours)."""
    from torch.distributed.fsdp import FSDPModule

    generated = type(model)
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.__class__ = next(cls for cls in generated.__mro__[1:] if not issubclass(cls, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = generated


def merge_adapter(base_path: str, adapter_dir: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Base checkpoint + PEFT adapter -> merged HF checkpoint (with the adapter folder's processor)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import finevit_vl  # noqa: F401  (registers the Auto classes)

    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    final = Path(out_dir)
    tmp = _tmp(final)
    merged.save_pretrained(tmp)
    AutoProcessor.from_pretrained(adapter_dir).save_pretrained(tmp)
    _replace(tmp, final)
    return str(final)


def training_summary(config) -> str:
    """One paragraph for the model card: what was trained, on what, for how long (no local absolute paths)."""
    from ..data.sources import describe_source

    modules = ", ".join(
        f"{name} (lr {module.lr or config.optim.lr:g})" for name in ("vision_tower", "multi_modal_projector", "language_model")
        if (module := getattr(config.modules, name)).train
    )
    lora = f"; LoRA r={config.lora.r} on the language model" if config.lora.enabled else ""
    return (f"`finevit-vl train` run `{Path(config.run_dir).name}`: {config.train.max_steps} steps x {config.train.global_batch_size} "
            f"samples, trained modules: {modules}{lora}. Training data: {describe_source(config.data.train)}; boxes as "
            f"`{config.data.box_format}`; pixel budget {config.data.max_pixels or 'the processor default'}.")


def export_model(accelerator, config, model, processor, base_path: str, out_dir: str | None) -> dict[str, str]:
    """Write the final model (collective: every rank calls it). Returns `{"model": dir, "adapter": dir}` on every rank."""
    final = Path(out_dir) if out_dir else Path(config.run_dir) / "final"
    adapter = final.with_name("adapter") if out_dir else Path(config.run_dir) / "adapter"
    written: dict[str, str] = {}
    if not config.lora.enabled or config.lora.export in ("merged", "both"):
        written["model"] = str(final)
    if config.lora.enabled and config.lora.export in ("adapter", "both"):
        written["adapter"] = str(adapter)
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards on the main process
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        target = adapter if config.lora.enabled else final
        tmp = _tmp(target)
        with plain_class(unwrapped):
            # Our names as they are: under ZeRO-3, Transformers' load attaches a legacy renaming that a save would
            # "revert" (`language_model.` -> `language_model.model.`), giving a folder that does not load.
            unwrapped.save_pretrained(tmp, state_dict=state_dict, save_original_format=False)
        processor.save_pretrained(tmp)
        _replace(tmp, target)
        if config.lora.enabled and "model" in written:
            dtype = torch.float32 if config.model.quantization else unwrapped.base_model.model.dtype
            merge_adapter(base_path, str(adapter), str(final), dtype)
        if config.lora.enabled and "adapter" not in written:
            shutil.rmtree(adapter)
        if unwrapped.config.model_type in ENCODER_STAGE_TYPES:
            # Stage I / II: the encoder alone too, for `finevit-vl build --vision` and the next stage's init_from.
            encoder = final / "encoder"
            unwrapped.vision_model.save_pretrained(encoder, state_dict={
                key.removeprefix("vision_model."): value for key, value in state_dict.items()
                if key.startswith("vision_model.")})
            getattr(processor, "image_processor", processor).save_pretrained(encoder)
        elif "model" in written:  # PEFT writes its own card into adapter folders
            card_model = unwrapped.base_model.model if config.lora.enabled else unwrapped
            write_model_card(card_model, final, f"FineViT-VL ({Path(config.run_dir).name})",
                             "A FineViT-VL checkpoint exported by the FineViT-VL trainer.", training_summary(config))
    if unwrapped.config.model_type in ENCODER_STAGE_TYPES:
        written["encoder"] = str(final / "encoder")
    if accelerator.is_main_process:
        for kind, path in written.items():
            logger.info("exported %s to %s", kind, path)
    accelerator.wait_for_everyone()
    return written


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> dict[str, str]:
    """An intermediate checkpoint (or a run folder's newest intact one) -> a Hugging Face folder, as at the end of
    training: LoRA merged and/or as an adapter per `lora.export`, processor and model card included."""
    from accelerate import Accelerator

    from .checkpoint import CheckpointError, list_checkpoints, load_weights, newest_intact, verify_checkpoint
    from .config import load_config
    from .model import load_model, prepare_trainable

    path = Path(checkpoint).expanduser().resolve()
    if not (path / "trainer_state.json").exists():
        newest, skipped = newest_intact(list_checkpoints(path / "checkpoints"))
        for note in skipped:
            logger.warning(note)
        if newest is None:
            raise CheckpointError(f"{path} is neither a checkpoint nor a run folder with an intact checkpoint")
        path = newest
    state = verify_checkpoint(path)
    config = load_config(path / "run_config.yaml")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if config.objective == "next_token":
        model, processor, base_path = load_model(config, accelerator)
    else:
        from .encoder_models import build_encoder_stage_model

        model, processor, base_path = build_encoder_stage_model(config, accelerator)
    model = prepare_trainable(model, config)
    load_weights(model, path, state.get("trainable_only", False))  # FSDP2 shard files are assembled by it
    logger.info("exporting %s (step %d)", path, state["step"])
    return export_model(accelerator, config, model, processor, base_path, str(out_dir))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog="finevit-vl export", description=export_checkpoint.__doc__.split(":")[0])
    parser.add_argument("checkpoint", help="run_dir/checkpoints/checkpoint-N, or a run folder (its newest intact one)")
    parser.add_argument("--out", required=True, help="output folder (LoRA adapters go next to it, in 'adapter')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = export_checkpoint(args.checkpoint, args.out)
    except (CheckpointError, ValueError) as error:
        return report_user_error("export", error)
    for kind, folder in written.items():
        print(f"{kind}: {folder}")
    return 0


__all__ = ["export_checkpoint", "export_model", "merge_adapter"]
