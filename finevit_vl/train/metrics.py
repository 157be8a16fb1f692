"""Throughput and MFU estimates, and the metrics sinks: `run_dir/metrics.jsonl`, Accelerate trackers, the progress bar.

MFU. Training FLOPs are estimated per module from parameter counts, trainable-aware:

    flops = sum over modules m of tokens_m * (2 N_m                      forward
                                              + 2 N_m  if activation gradients flow through m
                                              + 2 T_m)                   weight gradients of its trainable params

with `tokens_m` = patches for the vision tower, merged image tokens for the projector and all LLM tokens for the
language model (input embeddings excluded: a lookup). Activation gradients flow through a module when it or a module
upstream of it (vision -> projector -> LLM) trains. A full fine-tune gives the familiar `6 N` per token; a frozen
encoder costs only its forward. Attention score FLOPs are not counted (an underestimate at long context).
Peak FLOP/s per device: `logging.peak_tflops`, else a table of GPUs (bf16 dense), else on CPU a GEMM measured at
start-up in the training dtype. MFU = achieved FLOP/s / (peak x processes).
"""

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from ..parameters import is_peft_original, value_count
from .config import MODULES
from .freeze import module_of


logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s by a substring of `torch.cuda.get_device_name()`.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0,
                   "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}


def module_param_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """`{module: {"params": N, "trainable": T}}`, input embeddings excluded, 4-bit weights counted unpacked."""
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    counts = {module: {"params": 0, "trainable": 0} for module in MODULES}
    for name, parameter in model.named_parameters():
        if id(parameter) in embeddings or is_peft_original(name):
            continue
        numel = value_count(parameter)
        entry = counts[module_of(name)]
        entry["params"] += numel
        entry["trainable"] += numel if parameter.requires_grad else 0
    return counts


def training_flops(counts: dict[str, dict[str, int]], patches: int, merged_image_tokens: int, llm_tokens: int) -> float:
    # The pretraining stages: the text tower sees the caption tokens, the heads (Stage I's decoder) every patch.
    tokens = {"vision_tower": patches, "multi_modal_projector": merged_image_tokens, "language_model": llm_tokens,
              "text_tower": llm_tokens, "heads": patches}
    flops, upstream_trains = 0.0, False
    for module in MODULES:  # upstream -> downstream
        n, t = counts[module]["params"], counts[module]["trainable"]
        upstream_trains = upstream_trains or t > 0
        flops += tokens[module] * (2 * n + (2 * n if upstream_trains else 0) + 2 * t)
    return flops


def peak_flops_per_device(configured_tflops: float | None, dtype: torch.dtype) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        logger.warning("unknown GPU %r: set logging.peak_tflops to report MFU", name)
        return None
    # CPU: measure a square GEMM (best of a few) in the training dtype.
    size = 512
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class MetricsWriter:
    """Main-process sink: one JSON line per record in `metrics.jsonl`, the same values to Accelerate trackers."""

    def __init__(self, accelerator, run_dir: str | os.PathLike) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        self.lines = 0  # lines written so far, stored in each checkpoint

    def truncate(self, lines: int) -> None:
        """Keep the first `lines` records: a resumed run drops what was logged after its checkpoint, so every step
        appears once after any number of interruptions."""
        self.lines = lines
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept = self.path.read_text().splitlines(keepends=True)[:lines]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    def log(self, values: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        self.lines += 1
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=step)


class Throughput:
    """Accumulates per-step counts and times between two log lines."""

    def __init__(self, counts: dict[str, dict[str, int]], peak_flops: float | None, world_size: int) -> None:
        self.counts = counts
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.tokens = self.slots = self.images = self.patches = self.samples = 0
        self.data_time = self.compute_time = 0.0
        self.flops = 0.0

    def add(self, tokens: int, slots: int, images: int, patches: int, samples: int, merge_unit: int, data_time: float,
            compute_time: float) -> None:
        """Global counts of one step (summed over ranks) and this rank's times."""
        self.tokens += tokens
        self.slots += slots
        self.images += images
        self.patches += patches
        self.samples += samples
        self.data_time += data_time
        self.compute_time += compute_time
        self.flops += training_flops(self.counts, patches, patches // merge_unit, tokens)

    def summary(self) -> dict:
        elapsed = max(self.data_time + self.compute_time, 1e-9)
        values = {
            "tokens_per_s": self.tokens / elapsed,
            "images_per_s": self.images / elapsed,
            "samples_per_s": self.samples / elapsed,
            "token_efficiency": self.tokens / max(1, self.slots),
            "data_time_s": self.data_time,
            "compute_time_s": self.compute_time,
            "data_time_fraction": self.data_time / elapsed,
        }
        if self.peak_flops:
            values["mfu"] = self.flops / elapsed / (self.peak_flops * self.world_size)
        return values


__all__ = ["MetricsWriter", "Throughput", "module_param_counts", "peak_flops_per_device", "training_flops"]
