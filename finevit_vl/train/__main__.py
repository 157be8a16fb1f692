"""Train one FineViT-VL stage from a YAML config: build parts -> freeze -> data -> train -> export.

    finevit-vl train train_configs/tiny_cpu_stage3.yaml [key=value ...]
    accelerate launch [--multi_gpu --num_processes N | --config_file train_configs/accelerate/X.yaml] \\
        -m finevit_vl.train train_configs/stage3_align.yaml [key=value ...]
"""

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

from ..cli import report_user_error


logger = logging.getLogger("finevit_vl.train")


def _flat(data: dict, prefix: str = "") -> dict:
    """Nested config -> flat scalars for trackers (TensorBoard hparams take scalars only)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _accelerator(config):
    import importlib.util

    from accelerate import Accelerator

    mixed_precision = config.train.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    trackers = []
    for tracker in config.logging.log_with:
        if importlib.util.find_spec(tracker) is None:
            logging.getLogger(__name__).warning("tracker %r is not installed; logging to metrics.jsonl only", tracker)
        else:
            trackers.append(tracker)
    from .strategy import check_fsdp_version_on_cpu, configure_deepspeed, cpu_accelerator_kwargs, enable_fsdp2_on_cpu

    device_kwargs = {}
    if not torch.cuda.is_available():  # gloo processes on CPU (`accelerate launch --multi_gpu`, FSDP2, DeepSpeed)
        check_fsdp_version_on_cpu()
        device_kwargs = cpu_accelerator_kwargs()
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=trackers or None, project_dir=config.run_dir,
                              **device_kwargs)
    enable_fsdp2_on_cpu(accelerator)
    configure_deepspeed(accelerator, config.train.micro_batch_size, config.optim.max_grad_norm)
    return accelerator


def _setup_logging(accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    prefix = f"[rank {accelerator.process_index}] " if accelerator.num_processes > 1 else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "PIL", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _plan(config, accelerator):
    """How this run starts (new / resume / refused), decided on the main process and shared, so all ranks agree
    and all raise the same error."""
    from .checkpoint import CheckpointError
    from .run_dir import plan_run

    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = plan_run(config)
        except (CheckpointError, ValueError) as error:
            outcome[0] = error
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def steps_for_epochs(config, source) -> int:
    """`train.max_steps` for `train.epochs` passes over `source` (all its records, bad ones included)."""
    if not hasattr(source, "__len__"):
        raise ValueError(
            f"train.epochs needs a data.train source whose records can be counted (jsonl, hf); {source!r} cannot be: "
            "set train.max_steps instead"
        )
    records = len(source)
    steps = max(1, math.ceil(config.train.epochs * records / config.train.global_batch_size))
    logger.info("train.epochs=%g over %d records of %r = %d steps of %d samples (train.max_steps)",
                config.train.epochs, records, source, steps, config.train.global_batch_size)
    return steps


def run(config) -> dict:
    """The recipe. Returns what was exported (`{"model": dir, "adapter": dir}`), empty when stopped early."""
    from accelerate.utils import set_seed

    from ..data import build_source
    from ..data.collator import SampleEncoder
    from .config import config_to_dict, save_config
    from .data import BadRecordLimit, BadRecordLog, TokenBatcher, TrainStream
    from .evaluation import HeldOutLoss, load_eval_samples
    from .freeze import format_report, trainable_report
    from .model import load_model, prepare_trainable
    from .run_dir import apply_plan
    from .strategy import check_strategy
    from .trainer import Trainer

    accelerator = _accelerator(config)
    _setup_logging(accelerator)
    logger.info("distributed strategy: %s", check_strategy(accelerator))
    config.check_world_size(accelerator.num_processes)
    train_source = build_source(config.data.train)  # built once: counted for train.epochs, then sharded
    if config.train.epochs is not None:
        config.train.max_steps = steps_for_epochs(config, train_source)
    run_dir = Path(config.run_dir)
    plan = _plan(config, accelerator)
    for note in plan.notes:
        logger.warning(note)
    if accelerator.is_main_process:
        apply_plan(plan, config)
        save_config(config, run_dir / "config.yaml")  # the config in force (checked against the checkpoint's)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    if config.objective != "next_token":
        return _run_encoder_stage(config, accelerator, train_source, plan)
    # 1. Parts: model + processor (pixel budget of this stage set on the image processor).
    model, processor, base_path = load_model(config, accelerator)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context and config.data.max_length > context:
        raise ValueError(f"data.max_length={config.data.max_length} exceeds the LLM's context ({context} positions)")
    _hand_off(config, accelerator, model, plan)
    # 2. Freeze policy / LoRA, logged.
    model = prepare_trainable(model, config)
    logger.info("trainable modules (%s):\n%s", "LoRA" if config.lora.enabled else "freeze policy",
                format_report(trainable_report(model)))
    # 3. Data: this rank's shard of the training records, the held-out records.
    bad_records = BadRecordLog(run_dir / "bad_records.jsonl", rank)
    encoder = SampleEncoder(processor, config.data.max_length, config.data.box_format, config.data.max_regions,
                            config.data.shuffle_turns, config.seed, config.data.region_directions,
                            _region_crops(config, processor))
    stream = TrainStream(
        train_source.shard(rank, world), encoder, config.train.global_batch_size // world,
        config.train.micro_batch_size, config.data.pack, processor.tokenizer.pad_token_id, bad_records,
        BadRecordLimit.from_config(config.data, bad_records.path), config.data.num_workers,
        batcher=TokenBatcher(config.train.micro_batch_size, config.data.pack, config.data.max_length,
                             processor.tokenizer.pad_token_id, encoder.dummy_image_inputs, config.distill.enabled),
    )
    held_out = None
    if config.data.eval is not None:
        eval_encoder = SampleEncoder(processor, config.data.max_length, config.data.box_format, config.data.max_regions,
                                     shuffle_turns=False, region_directions=config.data.region_directions)
        samples = load_eval_samples(build_source(config.data.eval), eval_encoder, config.eval.max_samples, rank, world,
                                    BadRecordLog(bad_records.path, rank))
        held_out = HeldOutLoss(samples, config.train.micro_batch_size, processor.tokenizer.pad_token_id,
                               eval_encoder.dummy_image_inputs)
    logger.info("%d process(es); %d samples per step = %d per rank in micro-batches of %d %s; max_pixels %s",
                world, config.train.global_batch_size, config.train.global_batch_size // world,
                config.train.micro_batch_size, "packed rows" if config.data.pack else "samples",
                getattr(processor.image_processor, "max_pixels", None))
    # 4. Train, evaluate, export.
    trainer = Trainer(config, accelerator, model, processor, base_path, stream, held_out, plan.run_id)
    if config.logging.log_with:
        accelerator.init_trackers(config.logging.project_name, config=_flat(config_to_dict(config)))
    written = trainer.fit(plan.checkpoint)
    accelerator.end_training()
    return written


def _region_crops(config, processor):
    """GranViT self-distillation: the box crops' view, a copy of the image processor at `distill.crop_pixels`."""
    if not config.distill.enabled:
        return None
    import copy

    from ..data.collator import RegionCrops

    crop_processor = copy.deepcopy(processor.image_processor)
    crop_processor.min_pixels = crop_processor.max_pixels = config.distill.crop_pixels
    return RegionCrops(crop_processor, config.distill.max_regions)


def _hand_off(config, accelerator, model, plan) -> None:
    """`model.init_from`: carry the previous stage's tensors into a new run (a resumed one has them already)."""
    if not config.model.init_from or plan.checkpoint is not None:
        return
    from .handoff import carry_weights, write_report

    report = carry_weights(model, config.model.init_from)
    logger.info("%s", report.summary())
    if accelerator.is_main_process:
        write_report(report, config.run_dir)


def _run_encoder_stage(config, accelerator, train_source, plan) -> dict:
    """Stage I (`objective: masked_image`) or Stage II (`contrastive`): the encoder's own pretraining."""
    from ..data.image_samples import CaptionEncoder, ImageBatcher, MaskedImageEncoder
    from .data import BadRecordLimit, BadRecordLog, TrainStream
    from .encoder_models import build_encoder_stage_model, load_teacher, teacher_path
    from .encoder_trainers import ContrastiveTrainer, MaskedImageTrainer
    from .freeze import format_report, trainable_report
    from .model import prepare_trainable

    rank, world = accelerator.process_index, accelerator.num_processes
    model, processor, base_path = build_encoder_stage_model(config, accelerator)
    _hand_off(config, accelerator, model, plan)
    model = prepare_trainable(model, config)
    logger.info("trainable modules (freeze policy):\n%s", format_report(trainable_report(model)))
    bad_records = BadRecordLog(Path(config.run_dir) / "bad_records.jsonl", rank)
    extra = {}
    if config.objective == "masked_image":
        teacher = view = None
        if config.mim.target == "features":
            teacher, view = load_teacher(teacher_path(config, accelerator), accelerator.device)
            extra = {"teacher": teacher, "teacher_layer": config.mim.teacher_layer}
        encoder = MaskedImageEncoder(processor, config.mim.mask_ratio, config.seed, view)
        pad_token_id, trainer_class = 0, MaskedImageTrainer
    else:
        encoder = CaptionEncoder(processor.image_processor, processor.tokenizer, config.contrastive.text_max_length,
                                 config.seed)
        pad_token_id, trainer_class = processor.tokenizer.pad_token_id or 0, ContrastiveTrainer
        extra = {"loss": config.contrastive.loss}
    per_rank = config.train.global_batch_size // world
    stream = TrainStream(
        train_source.shard(rank, world), encoder, per_rank, config.train.micro_batch_size, False, pad_token_id,
        bad_records, BadRecordLimit.from_config(config.data, bad_records.path), config.data.num_workers,
        batcher=ImageBatcher(config.train.micro_batch_size, pad_token_id),
    )
    image_processor = getattr(processor, "image_processor", processor)
    logger.info("%s: %d process(es); %d images per step = %d per rank in micro-batches of %d; max_pixels %s",
                config.objective, world, config.train.global_batch_size, per_rank, config.train.micro_batch_size,
                image_processor.max_pixels)
    trainer = trainer_class(config, accelerator, model, processor, base_path, stream, None, plan.run_id, **extra)
    if config.logging.log_with:
        from .config import config_to_dict

        accelerator.init_trackers(config.logging.project_name, config=_flat(config_to_dict(config)))
    written = trainer.fit(plan.checkpoint)
    accelerator.end_training()
    return written


def main(argv: list[str] | None = None) -> int:
    from .config import load_config

    parser = argparse.ArgumentParser(prog="finevit-vl train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config (see train_configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 data.pack=true")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
    except ValueError as error:
        return report_user_error("train", error)
    if args.print_config:
        import yaml

        from .config import config_to_dict

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        return 0
    from .checkpoint import CheckpointError
    from .preemption import INTERRUPTED_EXIT_CODE, TrainingInterrupted

    try:
        run(config)
    except TrainingInterrupted as stopped:
        print(f"finevit-vl train: {stopped}; resume with: finevit-vl train {Path(config.run_dir) / 'config.yaml'}",
              file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except (CheckpointError, ValueError) as error:  # user-facing: a clear message, no traceback
        return report_user_error("train", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
