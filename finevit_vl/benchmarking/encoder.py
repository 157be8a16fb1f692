"""Benchmark 1: encoder throughput, FineViT vs transformers' Qwen2-VL vision tower and SigLIP2 NaFlex.

All encoders get the same width, depth, heads and patch size and see the same mixed-resolution images. FineViT's MLP
is gated (three matrices), so it runs twice: with the peers' intermediate size (1.5x their MLP FLOPs and parameters)
and with 2/3 of it (matched MLP FLOPs and parameters, the compute-fair comparison the goals use). Peers run as their
modules do in transformers, with two adjustments so that only the transformer trunk is compared:

* Qwen2-VL: `temporal_patch_size=1` (still images; its default 2 feeds every image twice to the Conv3d) and the
  `PatchMerger` replaced by `nn.Identity` (it is the VL projector, which FineViT keeps outside the encoder).
* SigLIP2: `vision_use_head=False` (no MAP head; FineViT runs with `return_pooled=False`). NaFlex pads every image to
  the longest one and masks the padding, so it computes on more tokens than it is credited for.

The achieved FLOP/s of FineViT's forward (matmuls + attention, counted analytically; norms, RoPE and softmax not
counted) is divided by a 2048^3 GEMM of the same dtype timed in the same repetitions.
"""

import torch
from torch import nn
from transformers import Siglip2VisionConfig, Siglip2VisionModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from ..models import FineViTConfig, FineViTImageProcessor, FineViTModel
from .common import (
    fmt_stat,
    gemm_variant,
    goal,
    goals_markdown,
    lengths_of,
    paired_ratio,
    rate,
    result_skeleton,
    run_isolated,
    sizes_text,
    summarize,
    synthetic_image,
    time_interleaved,
)


# Eight images between 224 and 896 px (6584 patches), sides multiples of 28 so the processor keeps them as they are.
IMAGE_SIZES = [(224, 224), (336, 224), (448, 336), (252, 504), (560, 420), (672, 336), (784, 224), (896, 280)]

SETTINGS = {
    "full": {
        "width": 384, "depth": 6, "heads": 6, "mlp": 1536, "patch": 14, "image_sizes": IMAGE_SIZES,
        "forward_repeats": 4, "backward_repeats": 2, "dtypes": ["float32", "bfloat16"],
        # efficiency vs the GEMM peak: square images of `peak_side`, at the configuration above and at a wide preset
        "peak_side": 448, "peak_images": 8, "peak_repeats": 4, "gemm_size": 2048,
        "wide": {"preset": "finevit-0.86b", "depth": 2, "images": 1},
    },
    "quick": {
        "width": 64, "depth": 2, "heads": 2, "mlp": 256, "patch": 14,
        "image_sizes": [(224, 224), (112, 168), (168, 112)],
        "forward_repeats": 2, "backward_repeats": 1, "dtypes": ["float32", "bfloat16"],
        # A small GEMM: on CPUs without native bf16 a 2048^3 bf16 matmul alone takes tens of seconds.
        "peak_side": 112, "peak_images": 2, "peak_repeats": 2, "gemm_size": 512,
        "wide": {"preset": "finevit-tiny", "depth": 1, "images": 1},
    },
}

FINEVIT = "finevit"  # the MLP-FLOPs-matched FineViT, the one the goals are about
LABELS = {
    "finevit": "FineViT, I = 2/3 MLP (matched MLP FLOPs/params)",
    "finevit_i_matched": "FineViT, I = MLP (matched intermediate size)",
    "qwen2_vl": "Qwen2-VL vision (full attention)",
    "siglip2": "SigLIP2 NaFlex vision",
}
PEERS = ("qwen2_vl", "siglip2")


def build_models(s: dict) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    common = {"hidden_size": s["width"], "num_hidden_layers": s["depth"], "num_attention_heads": s["heads"],
                  "patch_size": s["patch"]}
    models = {
        "finevit": FineViTModel._from_config(
            FineViTConfig(intermediate_size=round(2 * s["mlp"] / 3), **common), attn_implementation="sdpa"),
        "finevit_i_matched": FineViTModel._from_config(
            FineViTConfig(intermediate_size=s["mlp"], **common), attn_implementation="sdpa"),
    }
    qwen_config = Qwen2VLVisionConfig(depth=s["depth"], embed_dim=s["width"], hidden_size=s["width"],
                                      mlp_ratio=s["mlp"] // s["width"], num_heads=s["heads"], patch_size=s["patch"],
                                      temporal_patch_size=1, spatial_merge_size=2)
    qwen = Qwen2VisionTransformerPretrainedModel._from_config(qwen_config, attn_implementation="sdpa")
    qwen.merger = nn.Identity()  # the merger is the VL projector; compare the trunks
    models["qwen2_vl"] = qwen
    siglip_config = Siglip2VisionConfig(hidden_size=s["width"], intermediate_size=s["mlp"],
                                        num_hidden_layers=s["depth"], num_attention_heads=s["heads"],
                                        patch_size=s["patch"], vision_use_head=False)
    models["siglip2"] = Siglip2VisionModel._from_config(siglip_config, attn_implementation="sdpa")
    return {name: model.eval() for name, model in models.items()}


def make_inputs(images: list, patch: int) -> dict:
    """Packed FineViT / Qwen2-VL inputs (same layout: merge-group-major `(C, p, p)` patches) and SigLIP2's padded
    NaFlex batch (raster-order `(p, p, C)` patches) of the same pixels."""
    processor = FineViTImageProcessor(patch_size=patch, merge_size=2, max_pixels=1008 * 1008)
    packed = processor(images)
    pixel_values, grid = packed["pixel_values"], packed["image_grid_thw"]
    lengths = lengths_of(grid)
    longest = max(lengths)
    padded = torch.zeros(len(lengths), longest, pixel_values.shape[1])
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    start = 0
    for index, (length, (_, h, w)) in enumerate(zip(lengths, grid.tolist())):
        # (h/2, w/2, 2, 2, C, p, p) -> (h/2, 2, w/2, 2, p, p, C): raster order, channels last
        patches = pixel_values[start:start + length].view(h // 2, w // 2, 2, 2, 3, patch, patch)
        padded[index, :length] = patches.permute(0, 2, 1, 3, 5, 6, 4).reshape(length, -1)
        mask[index, :length] = 1
        start += length
    return {"pixel_values": pixel_values, "grid_thw": grid, "lengths": lengths,
            "siglip": {"pixel_values": padded, "pixel_attention_mask": mask, "spatial_shapes": grid[:, 1:].clone()}}


def forward_flops(name: str, model: nn.Module, lengths: list[int]) -> float:
    """Matmul + attention FLOPs of one forward (multiply-add = 2), on the tokens the model actually computes."""
    config = model.config
    if name == "siglip2":
        lengths = [max(lengths)] * len(lengths)  # NaFlex computes on the padding too
    width = config.hidden_size if name != "qwen2_vl" else config.embed_dim
    depth = config.num_hidden_layers if name != "qwen2_vl" else config.depth
    if name.startswith("finevit"):
        mlp = 3 * width * config.intermediate_size
    elif name == "qwen2_vl":
        mlp = 2 * width * width * config.mlp_ratio
    else:
        mlp = 2 * width * config.intermediate_size
    tokens = sum(lengths)
    patch_embed = 2 * tokens * 3 * config.patch_size**2 * width
    per_layer = 2 * tokens * (4 * width * width + mlp) + sum(4 * n * n * width for n in lengths)
    return float(patch_embed + depth * per_layer)


def _call(name: str, model: nn.Module, inputs: dict, dtype: torch.dtype):
    if name == "siglip2":
        siglip = inputs["siglip"]
        return model(pixel_values=siglip["pixel_values"].to(dtype),
                     pixel_attention_mask=siglip["pixel_attention_mask"],
                     spatial_shapes=siglip["spatial_shapes"]).last_hidden_state
    if name == "qwen2_vl":
        return model(inputs["pixel_values"].to(dtype), grid_thw=inputs["grid_thw"]).last_hidden_state
    return model(inputs["pixel_values"].to(dtype), inputs["grid_thw"], return_pooled=False).last_hidden_state


def forward_fn(name: str, model: nn.Module, inputs: dict, dtype: torch.dtype):
    def run():
        with torch.inference_mode():
            return _call(name, model, inputs, dtype)
    return run


def forward_backward_fn(name: str, model: nn.Module, inputs: dict, dtype: torch.dtype):
    def run():
        loss = _call(name, model, inputs, dtype).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def profile_tables(settings: dict, plan: dict[str, list[str]], rows: int = 12) -> dict[str, dict[str, str]]:
    """torch.profiler tables (top ops by self CPU time) of one forward per `{dtype: [model names]}` of `plan`, after
    a warm-up forward. Runs in its own process (`run_isolated`), away from the timings."""
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(settings["image_sizes"])]
    inputs = make_inputs(images, settings["patch"])
    models = build_models(settings)
    tables: dict[str, dict[str, str]] = {}
    for dtype_name, names in plan.items():
        dtype = getattr(torch, dtype_name)
        tables[dtype_name] = {}
        for name in names:
            fn = forward_fn(name, models[name].to(dtype), inputs, dtype)
            fn()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
            tables[dtype_name][name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                                                 max_name_column_width=48)
    return tables


def _dtype_block(models, inputs, dtype, s, flops) -> tuple[dict, dict]:
    """Forward and forward+backward timings of every model in `dtype`, each interleaved with the GEMM peak."""
    num_images, num_tokens = len(inputs["lengths"]), sum(inputs["lengths"])
    gemm, gemm_flops = gemm_variant(dtype, s["gemm_size"])
    block: dict = {}
    forward = time_interleaved(
        {**{name: forward_fn(name, model, inputs, dtype) for name, model in models.items()}, "gemm": gemm},
        repeats=s["forward_repeats"])
    backward = time_interleaved(
        {name: forward_backward_fn(name, model, inputs, dtype) for name, model in models.items()},
        repeats=s["backward_repeats"])
    for phase, samples in (("forward", forward), ("forward_backward", backward)):
        block[phase] = {
            name: {"seconds": summarize(samples[name]), "images_per_s": rate(samples[name], num_images),
                   "tokens_per_s": rate(samples[name], num_tokens)}
            for name in models
        }
        fastest_peer = [min(samples[peer][i] for peer in PEERS) for i in range(len(samples[FINEVIT]))]
        block[phase]["speedup"] = {
            fv: {"vs_fastest_peer": paired_ratio(fastest_peer, samples[fv]),
                 **{f"vs_{peer}": paired_ratio(samples[peer], samples[fv]) for peer in PEERS}}
            for fv in ("finevit", "finevit_i_matched")
        }
    block["gemm_gflops"] = rate(forward["gemm"], gemm_flops / 1e9)
    block["finevit_forward_gflops"] = rate(forward[FINEVIT], flops[FINEVIT] / 1e9)
    # Per repetition: achieved FLOP/s over the GEMM FLOP/s of the same repetition.
    block["finevit_forward_fraction_of_gemm_peak"] = paired_ratio(
        [flops[FINEVIT] / t for t in forward[FINEVIT]], [gemm_flops / t for t in forward["gemm"]])
    return block, {name: summarize(forward[name])["median"] for name in models}


def _peak_block(model: nn.Module, s: dict, dtype: torch.dtype, num_images: int) -> dict:
    """FineViT forward on `num_images` square images of `peak_side` px vs the GEMM peak, same repetitions."""
    images = [synthetic_image(s["peak_side"], s["peak_side"], seed=i) for i in range(num_images)]
    inputs = make_inputs(images, s["patch"])
    flops = forward_flops(FINEVIT, model, inputs["lengths"])
    gemm, gemm_flops = gemm_variant(dtype, s["gemm_size"])
    samples = time_interleaved({"finevit": forward_fn(FINEVIT, model, inputs, dtype), "gemm": gemm},
                               repeats=s["peak_repeats"])
    return {
        "tokens": sum(inputs["lengths"]),
        "forward_gflop": flops / 1e9,
        "finevit_gflops": rate(samples["finevit"], flops / 1e9),
        "gemm_gflops": rate(samples["gemm"], gemm_flops / 1e9),
        "fraction_of_gemm_peak": paired_ratio([flops / t for t in samples["finevit"]],
                                              [gemm_flops / t for t in samples["gemm"]]),
        "images_per_s": rate(samples["finevit"], len(images)),
    }


def run(quick: bool = False) -> dict:
    s = SETTINGS["quick" if quick else "full"]
    result = result_skeleton("encoder", "Encoder throughput: FineViT vs Qwen2-VL vision vs SigLIP2 NaFlex", quick, s)
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(s["image_sizes"])]
    inputs = make_inputs(images, s["patch"])
    models = build_models(s)
    flops = {name: forward_flops(name, model, inputs["lengths"]) for name, model in models.items()}
    # The paper's width (all blocks are alike, so a few of its 28 layers give its per-layer efficiency).
    torch.manual_seed(0)
    wide_config = FineViTConfig.from_preset(s["wide"]["preset"], num_hidden_layers=s["wide"]["depth"])
    wide = FineViTModel._from_config(wide_config, attn_implementation="sdpa").eval()
    result["results"]["inputs"] = {"images": len(images), "patch_tokens": sum(inputs["lengths"]),
                                   "siglip2_padded_tokens": len(images) * max(inputs["lengths"])}
    result["results"]["models"] = {
        name: {"label": LABELS[name], "parameters": sum(p.numel() for p in model.parameters()),
               "forward_gflop": flops[name] / 1e9} for name, model in models.items()
    }
    plan = {}
    for dtype_name in s["dtypes"]:
        dtype = getattr(torch, dtype_name)
        for model in models.values():
            model.to(dtype)
        block, medians = _dtype_block(models, inputs, dtype, s, flops)
        block["peak_448"] = _peak_block(models[FINEVIT], s, dtype, s["peak_images"])
        block["peak_448_wide"] = _peak_block(wide.to(dtype), s, dtype, s["wide"]["images"])
        result["results"][dtype_name] = block
        fastest_peer = min(PEERS, key=medians.get)
        plan[dtype_name] = [FINEVIT, fastest_peer]
        speedup = block["forward"]["speedup"][FINEVIT]["vs_fastest_peer"]
        result["goals"].append(goal(f"FineViT forward vs faster peer, {dtype_name} (x)", speedup["median"], 1.2,
                                    f"fastest peer {fastest_peer}, range {speedup['min']:.2f}-{speedup['max']:.2f}"))
        for key, label in (("peak_448", f"width {s['width']}"),
                           ("peak_448_wide", f"{s['wide']['preset']} width, {s['wide']['depth']} layers")):
            fraction = block[key]["fraction_of_gemm_peak"]
            result["goals"].append(goal(
                f"FineViT forward at {s['peak_side']}px ({label}), fraction of {dtype_name} GEMM peak",
                fraction["median"], 0.5, f"range {fraction['min']:.2f}-{fraction['max']:.2f}"))
    result["results"]["profiles"] = run_isolated("finevit_vl.benchmarking.encoder:profile_tables", isolated=not quick,
                                                 settings=s, plan=plan)
    result["notes"] += [
        ("FLOPs count matmuls and attention (QK^T, PV); norms, RoPE, activations and softmax are not counted, so the "
         "fraction of peak is a lower bound on hardware utilisation. The 2048^3 GEMM is the reference the goal names; "
         "on this CPU some of the encoder's own bf16 GEMM shapes run faster than it."),
        ("FineViT's CPU fast paths (q and k rotated in one pass with the sign folded into `sin`, `split` instead of "
         "slicing so backward does not zero-fill full-size gradients, one `rms_norm` call) keep fp32 outputs and "
         "gradients bitwise equal to the straightforward implementation. A bf16 model applies RoPE in bf16 (angles "
         "and cos/sin still computed in fp32): its mean error against the fp32 model is unchanged."),
    ]
    return result


def markdown(result: dict) -> str:
    r, s = result["results"], result["settings"]
    lines = [
        (f"Width {s['width']}, depth {s['depth']}, {s['heads']} heads, MLP {s['mlp']}, patch {s['patch']}; "
         f"{r['inputs']['images']} images {sizes_text(s['image_sizes'])} = "
         f"{r['inputs']['patch_tokens']} patch tokens (SigLIP2 pads to {r['inputs']['siglip2_padded_tokens']}). "
         f"Forward: {s['forward_repeats']} repetitions, forward+backward: {s['backward_repeats']}, after one warm-up; "
         "median [min-max]."),
        "",
        "| model | params (M) | fwd GFLOP |",
        "|---|---|---|",
    ]
    for name, model in r["models"].items():
        lines.append(f"| {model['label']} | {model['parameters'] / 1e6:.2f} | {model['forward_gflop']:.1f} |")
    for dtype_name in s["dtypes"]:
        block = r[dtype_name]
        lines += ["", f"**{dtype_name}** (GEMM peak {fmt_stat(block['gemm_gflops'], 0)} GFLOP/s)", "",
                  "| model | fwd images/s | fwd patch tokens/s | fwd+bwd images/s | fwd+bwd patch tokens/s |",
                  "|---|---|---|---|---|"]
        for name, model in r["models"].items():
            f, b = block["forward"][name], block["forward_backward"][name]
            lines.append(f"| {model['label']} | {fmt_stat(f['images_per_s'])} | {fmt_stat(f['tokens_per_s'], 0)} | "
                         f"{fmt_stat(b['images_per_s'])} | {fmt_stat(b['tokens_per_s'], 0)} |")
        lines += ["", "| speed-up (paired per repetition) | fwd | fwd+bwd |", "|---|---|---|"]
        for fv in ("finevit", "finevit_i_matched"):
            for key in ("vs_fastest_peer", *(f"vs_{peer}" for peer in PEERS)):
                lines.append(f"| {LABELS[fv]} {key.replace('_', ' ')} | "
                             f"{fmt_stat(block['forward']['speedup'][fv][key])} | "
                             f"{fmt_stat(block['forward_backward']['speedup'][fv][key])} |")
        lines += ["", (f"- FineViT forward on the mixed images: {fmt_stat(block['finevit_forward_gflops'], 0)} "
                       f"GFLOP/s = {fmt_stat(block['finevit_forward_fraction_of_gemm_peak'])} of the GEMM peak.")]
        for key, label in (("peak_448", f"width {s['width']} (the configuration above)"),
                           ("peak_448_wide", f"`{s['wide']['preset']}` width, {s['wide']['depth']} of its layers")):
            peak = block[key]
            lines.append(f"- At {s['peak_side']}px, {label}, {peak['tokens']} tokens: "
                         f"{fmt_stat(peak['finevit_gflops'], 0)} GFLOP/s vs GEMM {fmt_stat(peak['gemm_gflops'], 0)} "
                         f"= **{fmt_stat(peak['fraction_of_gemm_peak'])}** of peak.")
    lines += ["", goals_markdown(result["goals"]), ""]
    for dtype_name, tables in r["profiles"].items():
        for name, table in tables.items():
            lines += [(f"<details><summary>profile: {LABELS[name]}, {dtype_name}, one forward (top ops by self CPU)"
                      "</summary>"), "", "```", table.strip(), "```", "</details>", ""]
    return "\n".join(lines)


__all__ = ["build_models", "forward_flops", "make_inputs", "markdown", "profile_tables", "run"]
