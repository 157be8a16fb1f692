"""Benchmark 5: how FineViT's cost grows with resolution: forward time and peak memory vs image side.

One square image per point, the encoder configuration of the encoder benchmark (MLP-FLOPs-matched FineViT), all
sides interleaved. Peak memory is how far one inference forward raises the resident set size (model and input
already built; see `common.peak_memory_growth_mb`).
"""

import torch

from ..models import FineViTConfig, FineViTModel
from .common import (
    fmt_stat,
    peak_memory_growth_mb,
    rate,
    result_skeleton,
    summarize,
    synthetic_image,
    time_interleaved,
)
from .encoder import forward_flops, forward_fn, make_inputs


SETTINGS = {
    "full": {"width": 384, "depth": 6, "heads": 6, "intermediate": 1024, "patch": 14,
             "sides": list(range(224, 1009, 112)), "repeats": 3, "dtypes": ["float32", "bfloat16"]},
    "quick": {"width": 64, "depth": 2, "heads": 2, "intermediate": 170, "patch": 14, "sides": [112, 224], "repeats": 1,
              "dtypes": ["float32"]},
}


def build_model(s: dict) -> FineViTModel:
    torch.manual_seed(0)
    config = FineViTConfig(hidden_size=s["width"], num_hidden_layers=s["depth"], num_attention_heads=s["heads"],
                           intermediate_size=s["intermediate"], patch_size=s["patch"])
    return FineViTModel._from_config(config, attn_implementation="sdpa").eval()


def run(quick: bool = False) -> dict:
    s = SETTINGS["quick" if quick else "full"]
    result = result_skeleton("scaling", "Scaling: FineViT forward time and peak memory vs image side", quick, s)
    model = build_model(s)
    inputs = {side: make_inputs([synthetic_image(side, side, seed=side)], s["patch"]) for side in s["sides"]}
    points = {side: {"tokens": sum(x["lengths"]), "forward_gflop": forward_flops("finevit", model, x["lengths"]) / 1e9,
                     "attention_flop_share": _attention_share(model, x["lengths"][0])} for side, x in inputs.items()}
    for dtype_name in s["dtypes"]:
        dtype = getattr(torch, dtype_name)
        model.to(dtype)
        samples = time_interleaved({side: forward_fn("finevit", model, inputs[side], dtype) for side in s["sides"]},
                                   repeats=s["repeats"])
        for side in s["sides"]:
            points[side][dtype_name] = {
                "seconds": summarize(samples[side]),
                "gflops": rate(samples[side], points[side]["forward_gflop"]),
                "peak_memory_growth_mb": peak_memory_growth_mb(forward_fn("finevit", model, inputs[side], dtype)),
            }
    result["results"] = {"points": {str(side): point for side, point in points.items()}}
    result["notes"].append("Attention cost is quadratic in the tokens of an image (side^4 in pixels); matmuls are "
                           "linear (side^2). Peak memory: resident-set growth of one inference forward (kernel "
                           "high-water mark reset before the call).")
    return result


def _attention_share(model: FineViTModel, tokens: int) -> float:
    config = model.config
    attention = config.num_hidden_layers * 4 * tokens * tokens * config.hidden_size
    return attention / forward_flops("finevit", model, [tokens])


def markdown(result: dict) -> str:
    s, points = result["settings"], result["results"]["points"]
    header = "| side (px) | tokens | GFLOP | attention share |"
    rule = "|---|---|---|---|"
    for dtype_name in s["dtypes"]:
        header += f" {dtype_name} ms | {dtype_name} GFLOP/s | {dtype_name} peak memory growth (MiB) |"
        rule += "---|---|---|"
    lines = [(f"FineViT width {s['width']}, depth {s['depth']}, intermediate {s['intermediate']}; one square image "
              f"per point, {s['repeats']} interleaved repetitions, median [min-max]."), "", header, rule]
    for side, point in points.items():
        row = f"| {side} | {point['tokens']} | {point['forward_gflop']:.1f} | {point['attention_flop_share']:.0%} |"
        for dtype_name in s["dtypes"]:
            entry = point[dtype_name]
            row += (f" {fmt_stat(entry['seconds'], 0, 1e3)} | {fmt_stat(entry['gflops'], 0)} | "
                    f"{_mb(entry['peak_memory_growth_mb'])} |")
        lines.append(row)
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


__all__ = ["markdown", "run"]
