"""Benchmark 2: image preprocessing, FineViTImageProcessor vs Qwen2-VL's image processors.

Same images (camera-like sizes, none a multiple of 28, so every image is resized), same pixel budget
(`min_pixels`, `max_pixels`), patch 14, merge 2, mean = std = 0.5, bicubic. Qwen2-VL runs with
`temporal_patch_size=1` so both produce the same `(patches, 3*14*14)` tensor (its default of 2 duplicates every
patch; reported too). The outputs are compared, so the processors are shown to do the same work.
"""

import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..models import FineViTImageProcessor
from .common import (
    fmt_stat,
    goal,
    goals_markdown,
    paired_ratio,
    rate,
    result_skeleton,
    sizes_text,
    synthetic_image,
    time_interleaved,
)


IMAGE_SIZES = [(640, 480), (1024, 768), (800, 1200), (1600, 900), (300, 200), (500, 500), (1280, 720), (2000, 1500)]

SETTINGS = {
    "full": {"image_sizes": IMAGE_SIZES, "min_pixels": 56 * 56, "max_pixels": 1008 * 1008, "repeats": 7},
    "quick": {"image_sizes": [(320, 240), (200, 300)], "min_pixels": 56 * 56, "max_pixels": 224 * 224, "repeats": 2},
}

LABELS = {
    "finevit_pil": "FineViTImageProcessor (Pillow, default)",
    "finevit_torchvision": "FineViTImageProcessor (torchvision backend)",
    "qwen2_vl_pil": "Qwen2VLImageProcessorPil (temporal_patch_size=1)",
    "qwen2_vl_torchvision": "Qwen2VLImageProcessor (torchvision, temporal_patch_size=1)",
    "qwen2_vl_pil_t2": "Qwen2VLImageProcessorPil (default temporal_patch_size=2)",
}


def build_processors(s: dict) -> dict:
    budget = {"min_pixels": s["min_pixels"], "max_pixels": s["max_pixels"]}
    qwen = dict(patch_size=14, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3, **budget)
    processors = {
        "finevit_pil": FineViTImageProcessor(patch_size=14, merge_size=2, **budget),
        "qwen2_vl_pil": Qwen2VLImageProcessorPil(temporal_patch_size=1, **qwen),
        "qwen2_vl_pil_t2": Qwen2VLImageProcessorPil(**qwen),
    }
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        processors["finevit_torchvision"] = FineViTImageProcessor(patch_size=14, merge_size=2, backend="torchvision",
                                                                  **budget)
        processors["qwen2_vl_torchvision"] = Qwen2VLImageProcessor(temporal_patch_size=1, **qwen)
    except ImportError:  # torchvision missing: the Pillow comparison (the goal) still runs
        pass
    return processors


def call_fn(name: str, processor, images: list):
    if name.startswith("finevit"):
        return lambda: processor(images)
    return lambda: processor(images, return_tensors="pt")


def run(quick: bool = False) -> dict:
    s = SETTINGS["quick" if quick else "full"]
    title = "Preprocessing: FineViTImageProcessor vs Qwen2-VL image processors"
    result = result_skeleton("preprocess", title, quick, s)
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(s["image_sizes"])]
    processors = build_processors(s)
    variants = {name: call_fn(name, processor, images) for name, processor in processors.items()}

    outputs = {name: fn() for name, fn in variants.items()}
    reference = outputs["finevit_pil"]
    agreement = {}
    for name, out in outputs.items():
        same_grid = torch.equal(out["image_grid_thw"], reference["image_grid_thw"])
        values = out["pixel_values"]
        if name.endswith("_t2"):
            values = values.view(values.shape[0], 3, 2, -1)[:, :, 0].reshape(values.shape[0], -1)  # drop the copy
        same_shape = values.shape == reference["pixel_values"].shape
        diff = float((values - reference["pixel_values"]).abs().max()) if same_shape else None
        agreement[name] = {"same_grid": same_grid, "max_abs_diff_vs_finevit_pil": diff}
    samples = time_interleaved(variants, repeats=s["repeats"])
    result["results"] = {
        "images": len(images),
        "patch_tokens": int(reference["image_grid_thw"].prod(-1).sum()),
        "agreement": agreement,
        "images_per_s": {name: rate(samples[name], len(images)) for name in variants},
        "speedup_vs_qwen2_vl_pil": {name: paired_ratio(samples["qwen2_vl_pil"], samples[name]) for name in variants},
    }
    speedup = result["results"]["speedup_vs_qwen2_vl_pil"]["finevit_pil"]
    result["goals"].append(goal("FineViT processor (Pillow) vs Qwen2-VL Pillow processor (x)", speedup["median"], 1.5,
                                f"range {speedup['min']:.2f}-{speedup['max']:.2f}"))
    result["notes"].append("Single process, torch threads as configured; Pillow resizing is single-threaded.")
    return result


def markdown(result: dict) -> str:
    r, s = result["results"], result["settings"]
    lines = [
        (f"{r['images']} images ({sizes_text(s['image_sizes'])}) -> {r['patch_tokens']} patches; min_pixels "
         f"{s['min_pixels']}, max_pixels {s['max_pixels']}; {s['repeats']} repetitions after one warm-up."),
        "",
        "| processor | images/s | speed-up vs Qwen2-VL Pillow | same grids | max abs diff vs FineViT (Pillow) |",
        "|---|---|---|---|---|",
    ]
    for name, images_per_s in r["images_per_s"].items():
        agreement = r["agreement"][name]
        diff = agreement["max_abs_diff_vs_finevit_pil"]
        speedup = fmt_stat(r["speedup_vs_qwen2_vl_pil"][name])
        lines.append(f"| {LABELS[name]} | {fmt_stat(images_per_s, 1)} | {speedup} | "
                     f"{'yes' if agreement['same_grid'] else 'no'} | {'-' if diff is None else f'{diff:.2g}'} |")
    return "\n".join(lines + ["", goals_markdown(result["goals"])])


__all__ = ["markdown", "run"]
