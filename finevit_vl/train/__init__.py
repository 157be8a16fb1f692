"""Training FineViT-VL stages with Accelerate: `finevit-vl train <config.yaml> [key=value ...]`.

Layout (one concept per file): `config` (YAML + overrides), `model` (parts, quantization, LoRA), `freeze` (the
trainable set, logged), `optim` (per-module LR, warmup + cosine), `data` (the per-rank step stream, bad records),
`loss` (token-weighted next-token loss), `trainer` (the loop), `checkpoint` (atomic save / exact resume),
`metrics` (throughput, MFU, sinks), `evaluation` (held-out loss, lmms-eval hook), `export` (HF / PEFT folders).
"""

from .config import Config, load_config


__all__ = ["Config", "load_config"]
