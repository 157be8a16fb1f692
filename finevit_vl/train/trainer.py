"""The training loop: token-weighted loss over each global batch, gradient accumulation, logging, evaluation,
checkpoints and export. The parts (model, data, eval set) are built by `finevit_vl.train.__main__`.

Loss. Every optimizer step minimises the mean next-token loss over all supervised tokens of its global batch: each
micro-batch contributes `sum of token losses * world_size / global_targets`, and DDP / FSDP / ZeRO average the
gradients over ranks. The result does not depend on how the global batch is split over ranks, micro-batches or
packed rows.

Sharded engines. All ranks run the same number of forwards per step (missing micro-batches are an unsupervised
dummy row) and the vision tower runs in every forward (a zero-weighted dummy image when a micro-batch has none), so
ZeRO-3 / FSDP collectives always line up. The bad-record limit is checked on the global count, so all ranks stop
together.
"""

import contextlib
import logging
import time

import torch
from tqdm.auto import tqdm

from ..data.collator import IMAGE_INPUT_NAMES, dummy_image_inputs, filler_batch
from ..data.packing import attention_inputs
from .checkpoint import CheckpointManager
from .config import Config, config_to_dict
from .data import Prefetcher, StepBatch, TrainStream
from .evaluation import HeldOutLoss, run_eval_suite
from .export import export_model
from .loss import token_losses
from .metrics import MetricsWriter, Throughput, module_param_counts, peak_flops_per_device
from .optim import build_optimizer, build_scheduler
from .phases import PhaseSchedule
from .preemption import StopRequest, TrainingInterrupted


logger = logging.getLogger(__name__)

MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_units(model: torch.nn.Module) -> str:
    """The modules `fully_shard` made units of, counted by class (the wrap policy in force), e.g.
    "4 x FineViTBlock, 2 x Qwen3DecoderLayer, 1 x FineViTVLForConditionalGeneration"."""
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule

    counts = Counter(type(module).__name__.removeprefix("FSDP") for module in model.modules()
                     if isinstance(module, FSDPModule))
    return ", ".join(f"{count} x {name}" for name, count in counts.items())


class Trainer:
    def __init__(self, config: Config, accelerator, model, processor, base_path: str, stream: TrainStream,
                 held_out: HeldOutLoss | None, run_id: str) -> None:
        self.config = config
        self.accelerator = accelerator
        self.processor = processor
        self.base_path = base_path
        self.stream = stream
        self.held_out = held_out
        counts = module_param_counts(model)
        self.vision_dtype = next(p.dtype for n, p in model.named_parameters()
                                 if {"vision_tower", "vision_model"} & set(n.split(".")))
        self.distill = None
        self.distill_weight = config.distill.weight  # train.phases may change it
        self.step_counts: dict[str, int] = {}
        if config.distill.enabled:
            from .region_distillation import RegionDistillation

            plugin = getattr(accelerator.state, "deepspeed_plugin", None)
            if accelerator.distributed_type.name == "DEEPSPEED" and plugin is not None and plugin.zero_stage == 3:
                raise ValueError("distill.enabled is not supported under DeepSpeed ZeRO-3 (the EMA teacher copies the "
                                 "encoder's partitioned parameters); use ZeRO-2, FSDP2 or DDP for GranViT phase 1")

            self.distill = RegionDistillation(model.model.vision_tower, config.distill, model.config.vision_feature_layer,
                                              model.config.spatial_merge_size, accelerator.device)
        self.model, self.optimizer = accelerator.prepare(model, build_optimizer(model, config))
        if accelerator.distributed_type.name == "FSDP":
            logger.info("FSDP2 units: %s", fsdp_units(self.model))
        # Stepped by hand once per optimizer step (an Accelerate-prepared scheduler steps once per process); not saved:
        # rebuilt from the config and the step on resume.
        self.scheduler = build_scheduler(self._inner_optimizer, config)
        self.compute_dtype = MIXED_PRECISION_DTYPES.get(accelerator.mixed_precision, self.vision_dtype)
        self.checkpoints = CheckpointManager(accelerator, config.run_dir, config.train.keep_last, run_id)
        self.metrics = MetricsWriter(accelerator, config.run_dir)
        self.filler = self.make_filler(processor)
        peak = peak_flops_per_device(config.logging.peak_tflops, self.compute_dtype)
        self.throughput = Throughput(counts, peak, accelerator.num_processes)
        self.merge_unit = (getattr(processor, "merge_size", None) or processor.image_processor.merge_size) ** 2
        self.phases = PhaseSchedule(config.train.phases)
        self.counters: dict[str, int] = {}  # cumulative batcher counts (Stage II: captions cut), kept across resumes
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0

    # ------------------------------------------------------------------ forward

    def make_filler(self, processor) -> dict:
        """The micro-batch a rank runs when it has fewer than the others (contributes nothing to the loss)."""
        return filler_batch(processor.tokenizer.pad_token_id, dummy_image_inputs(processor))

    def token_losses(self, batch: dict) -> torch.Tensor:
        """Forward one micro-batch; per-token next-token losses `(rows, len - 1)` in fp32."""
        return token_losses(self.forward(batch).logits, batch["labels"].to(self.accelerator.device))

    def forward(self, batch: dict):
        """The model's outputs on one micro-batch."""
        device = self.accelerator.device
        inputs = attention_inputs(batch["segment_ids"], batch["position_ids"])
        weight = batch.get("image_token_weight")
        outputs = self.model(
            input_ids=batch["input_ids"].to(device),
            **{name: batch[name].to(device, self.vision_dtype if batch[name].is_floating_point() else None)
               for name in IMAGE_INPUT_NAMES if name in batch},
            image_token_weight=None if weight is None else weight.to(device),
            use_cache=False,
            **{key: value.to(device) for key, value in inputs.items()},
        )
        return outputs

    def micro_batches(self, batch: StepBatch, num_micro: int):
        """`(index, micro-batch, is_last)` for `num_micro` forwards (fillers where this rank has fewer), inside the
        gradient-sync context of each: gradients are reduced over ranks on the last one only."""
        accelerator = self.accelerator
        for index in range(num_micro):
            micro = batch.micro_batches[index] if index < len(batch.micro_batches) else self.filler
            last = index == num_micro - 1
            accelerator.sync_gradients = last  # DeepSpeed: the accumulation boundary; others: optimizer.step gate
            with contextlib.nullcontext() if last else accelerator.no_sync(self.model):
                yield index, micro, last

    def accumulate(self, batch: StepBatch, num_micro: int, targets: float) -> torch.Tensor:
        """Forward + backward of one step's micro-batches; returns this rank's loss sum (float64). Each micro-batch
        contributes `sum of token losses * world_size / global_targets` (see the module docstring)."""
        accelerator = self.accelerator
        world = accelerator.num_processes
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        regions = max(self.step_counts.get("distill_regions", 0), 1)  # over all ranks
        for _, micro, _ in self.micro_batches(batch, num_micro):
            outputs = self.forward(micro)
            micro_sum = token_losses(outputs.logits, micro["labels"].to(accelerator.device)).sum()
            objective = micro_sum * (world / targets)
            if self.distill is not None:
                distill_sum, _ = self.distill.loss_sum(outputs.image_patch_features, micro)
                objective = objective + self.distill_weight * distill_sum * (world / regions)
                self.distill_sum += distill_sum.detach().double()
            accelerator.backward(objective)
            loss_sum += micro_sum.detach().double()
        return loss_sum

    def train_step(self, batch: StepBatch) -> dict:
        accelerator = self.accelerator
        state = batch.state
        local = torch.tensor(
            [batch.num_targets, batch.num_tokens, batch.num_slots, batch.num_images, batch.num_patches,
             batch.num_samples, state["bad_records"], state["records_skipped"], state["records_read"],
             batch.stop_reason is not None], dtype=torch.float64, device=accelerator.device,
        )
        totals = accelerator.reduce(local, reduction="sum").tolist()
        targets = max(totals[0], 1.0)
        bad_records, skipped, read, stopped = (int(v) for v in totals[6:10])
        # Each rank checks its own counts after every record; this is the check over all ranks. Every rank takes the
        # branch in the same step, so the collectives in it line up.
        reason = self.stream.limit.exceeded(bad_records, skipped, read) if self.stream.limit else None
        if stopped or reason:
            from accelerate.utils import gather_object

            reasons = [r for r in gather_object([batch.stop_reason]) if r]
            self.report_bad_records(state)
            raise ValueError(reason or reasons[0])
        num_micro = int(accelerator.reduce(torch.tensor(len(batch.micro_batches), device=accelerator.device), reduction="max"))
        names = sorted(batch.counts)
        counts = accelerator.reduce(torch.tensor([float(batch.counts[n]) for n in names] or [0.0], dtype=torch.float64,
                                                 device=accelerator.device), reduction="sum").tolist()
        self.step_counts = {name: int(value) for name, value in zip(names, counts)}
        self.distill_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        loss_sum = self.accumulate(batch, num_micro, targets)
        grad_norm = None
        if self.config.optim.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.distill is not None:
            self.distill.update(accelerator.unwrap_model(self.model).model.vision_tower)
        loss = float(accelerator.reduce(loss_sum, reduction="sum")) / targets
        extra = {}
        if self.distill is not None:
            regions = self.step_counts.get("distill_regions", 0)
            extra["distill_loss"] = float(accelerator.reduce(self.distill_sum, reduction="sum")) / max(regions, 1)
        return {
            **extra,
            "counts": self.step_counts,
            "loss": loss,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "targets": int(totals[0]),
            "tokens": int(totals[1]),
            "slots": int(totals[2]),
            "images": int(totals[3]),
            "patches": int(totals[4]),
            "samples": int(totals[5]),
            "bad_records": bad_records,
        }

    # ------------------------------------------------------------------ state

    @property
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer inside Accelerate's wrapper (and DeepSpeed's ZeRO optimizer), which the schedule drives."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        return optimizer

    def resume(self, checkpoint: str | None) -> None:
        """Continue from `checkpoint` (chosen by `run_dir.plan_run`), or start at step 0 with a fresh metrics log."""
        if checkpoint is None:
            self.metrics.truncate(0)
            return
        trainer_state, data_states = self.checkpoints.load(checkpoint, self.model, self.optimizer)
        if self.distill is not None:
            from .checkpoint import load_extra_tensors

            self.distill.teacher.load_state_dict(load_extra_tensors(checkpoint, "ema_teacher"))
        self.step = trainer_state["step"]
        self.samples_seen = trainer_state["samples_seen"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.counters = dict(trainer_state.get("counters", {}))
        self.metrics.truncate(trainer_state["metrics_lines"])
        rank = self.accelerator.process_index
        same_layout = (len(data_states) == self.accelerator.num_processes
                       and data_states[rank].get("num_workers", 0) == self.stream.num_workers)
        if same_layout:  # exact: the same shards, each at its cursor
            self.stream.load_state_dict(data_states[rank])
        else:  # another number of processes or workers: the records none of the old shards has read yet
            self.stream.continue_from(data_states, rank)
        self.scheduler = build_scheduler(self._inner_optimizer, self.config, self.step)

    def report_bad_records(self, data_state: dict) -> None:
        """The skipped-record summary over all ranks (a collective): logged and written to the run folder."""
        from accelerate.utils import gather_object

        from .data import summarize_bad_records, write_bad_record_summary

        summaries = gather_object([summarize_bad_records(data_state)])
        if self.accelerator.is_main_process:
            write_bad_record_summary(summaries, self.config.run_dir)

    def save_checkpoint(self, data_state: dict) -> str:
        import yaml

        state = {"samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen, "metrics_lines": self.metrics.lines,
                 "counters": self.counters}
        config_text = yaml.safe_dump(config_to_dict(self.config), sort_keys=False)
        extra = {"ema_teacher": self.distill.teacher.state_dict()} if self.distill is not None else None
        path = self.checkpoints.save(self.step, self.model, self.optimizer, self.processor, state, data_state,
                                     config_text, trainable_only=self.config.lora.enabled, extra_tensors=extra)
        return str(path)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> None:
        if self.held_out is not None:
            values = self.held_out(self)
            self.metrics.log(values, self.step)
            logger.info("step %d: eval_loss %.4f over %d tokens", self.step, values["eval_loss"], values["eval_targets"])

    def evaluate_suite(self, exported: str | None = None) -> None:
        """lmms-eval tasks on every rank: the training model, or the `exported` folder at the end.

        Sharded weights (FSDP / ZeRO) are only evaluated once exported.
        """
        config, accelerator = self.config, self.accelerator
        if not config.eval.tasks:
            return
        if exported is None and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
            logger.warning("skipping lmms-eval at step %d: weights are sharded; it runs on the exported model", self.step)
            return
        model = exported or accelerator.unwrap_model(self.model)
        model_args = {"accelerator": accelerator} if accelerator.num_processes > 1 else None
        if exported is None:
            model.eval()
        results = run_eval_suite(model, None if exported else self.processor, config.eval.tasks,
                                 f"{config.run_dir}/eval/step-{self.step:08d}", config.eval.limit, config.eval.data_dir,
                                 config.eval.batch_size, model_args)
        if exported is None:
            model.train()
        if results:
            flat = {f"{task}/{metric}": value for task, metrics in results.items() if isinstance(metrics, dict)
                    for metric, value in metrics.items() if isinstance(value, (int, float))}
            self.metrics.log({"lmms_eval": results, **flat}, self.step)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ loop

    def fit(self, checkpoint: str | None = None) -> dict:
        """Train to `train.max_steps` (or `train.stop_after_steps` more steps) from `checkpoint` or step 0; returns
        what was exported. SIGTERM / SIGINT finish the step, save a checkpoint and raise `TrainingInterrupted`."""
        with StopRequest() as stop:
            return self._fit(checkpoint, stop)

    def _fit(self, checkpoint: str | None, stop: StopRequest) -> dict:
        config, accelerator = self.config, self.accelerator
        self.resume(checkpoint)
        start_step = self.step
        saved = (self.step, checkpoint)  # the newest checkpoint of this run: (step, path)
        data_state = self.stream.state_dict()  # taken before the prefetch thread advances the stream

        def interrupt() -> TrainingInterrupted:
            self.report_bad_records(data_state)
            path = saved[1] if saved[0] == self.step and saved[1] else self.save_checkpoint(data_state)
            logger.warning("%s: checkpoint %s saved at step %d; resume with the same command", stop.signal_name, path,
                           self.step)
            return TrainingInterrupted(stop.signal_name, self.step, path)

        if self.step == 0:
            self.evaluate()
        stop_at = config.train.max_steps
        if config.train.stop_after_steps is not None:
            stop_at = min(stop_at, start_step + config.train.stop_after_steps)
        self.model.train()
        phase_end = self.phases.apply(self, self.step)
        prefetcher = Prefetcher(self.stream, config.data.prefetch_steps, min(stop_at, phase_end) - self.step)
        progress = tqdm(total=config.train.max_steps, initial=self.step, disable=not accelerator.is_main_process,
                        desc="train", dynamic_ncols=True)
        window_losses: list[float] = []
        try:
            while self.step < stop_at:
                if stop.agreed(accelerator):
                    raise interrupt()
                if self.step == phase_end:
                    # A new phase changes how records are encoded: nothing prepared under the old one is used.
                    prefetcher.close()
                    phase_end = self.phases.apply(self, self.step)
                    prefetcher = Prefetcher(self.stream, config.data.prefetch_steps, min(stop_at, phase_end) - self.step)
                started = time.perf_counter()
                batch = prefetcher.next()
                fetched = time.perf_counter()
                values = self.train_step(batch)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                done = time.perf_counter()
                self.step += 1
                data_state = batch.state
                for name, value in values["counts"].items():
                    self.counters[name] = self.counters.get(name, 0) + value
                self.samples_seen += values["samples"]
                self.tokens_seen += values["tokens"]
                window_losses.append(values["loss"])
                self.throughput.add(values["tokens"], values["slots"], values["images"], values["patches"],
                                    values["samples"], self.merge_unit, fetched - started, done - fetched)
                if self.step % config.train.log_every == 0 or self.step == stop_at:
                    self._log(values, window_losses, progress)
                    window_losses = []
                progress.update(1)
                if config.eval.every and self.step % config.eval.every == 0 and self.step < config.train.max_steps:
                    self.evaluate()
                if config.eval.tasks_every and self.step % config.eval.tasks_every == 0 and self.step < config.train.max_steps:
                    self.evaluate_suite()
                if self.step % config.train.checkpoint_every == 0 or self.step == stop_at:
                    saved = (self.step, self.save_checkpoint(data_state))
        finally:
            prefetcher.close()
            progress.close()
        if stop.agreed(accelerator):
            raise interrupt()
        self.report_bad_records(data_state)
        if self.step < config.train.max_steps:
            logger.info("stopped at step %d of %d (train.stop_after_steps); resume with the same command", self.step,
                        config.train.max_steps)
            return {}
        self.evaluate()
        written = (export_model(accelerator, config, self.model, self.processor, self.base_path, config.export.dir)
                   if config.export.enabled else {})
        if written.get("model"):
            self.evaluate_suite(written["model"])
        return written

    def _log(self, values: dict, window_losses: list[float], progress) -> None:
        summary = self.throughput.summary()
        self.throughput.reset()
        lrs = {f"lr/{group['name']}": group["lr"] for group in getattr(self.optimizer, "optimizer", self.optimizer).param_groups}
        record = {
            "loss": values["loss"],
            **({"distill_loss": values["distill_loss"]} if "distill_loss" in values else {}),
            "loss_avg": sum(window_losses) / len(window_losses),
            "grad_norm": values["grad_norm"],
            **lrs,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "bad_records": values["bad_records"],
            **self.counters,
            **summary,
        }
        if self.counters.get("captions_truncated"):
            logger.info("step %d: %d captions so far were longer than the text length and were cut", self.step,
                        self.counters["captions_truncated"])
        self.metrics.log(record, self.step)
        postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{next(iter(lrs.values())):.2e}",
                   "tok/s": f"{summary['tokens_per_s']:.0f}", "img/s": f"{summary['images_per_s']:.1f}"}
        if "mfu" in summary:
            postfix["mfu"] = f"{summary['mfu']:.1%}"
        progress.set_postfix(postfix, refresh=False)


__all__ = ["Trainer"]
