"""`finevit-vl compare`: the same recipe with different vision encoders, side by side.

Every encoder runs the quickstart recipe (`finevit_vl.quickstart`: same synthetic data, tokenizer, LLM, projector,
steps, learning rates and seed); only the encoder differs. All encoders are random-initialised at the size the
recipe's FineViT preset has (same width, depth and heads; see `finevit_vl.encoders`), and every non-encoder weight
starts from the same values (the first encoder's), so the runs differ in the encoder alone. The report
(`report.md`, `results.json`, `loss_curves.png`) gives per-task scores next to the trivial baselines, parameters,
encoder FLOPs and throughput, image tokens per image, and the loss curves overlaid.
"""

import argparse
import json
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .quickstart import SFT_WEIGHTS, SIZES, Recipe, build_initial_model, evaluate, prepare_data, train_stages


DEFAULT_ENCODERS = ("finevit", "siglip2-naflex", "qwen2-vl", "siglip")
DEFAULT_FAMILIES = ("counting", "ocr")
DEFAULT_MINUTES = 5.0


def _log(message: str) -> None:
    print(f"[compare] {message}", flush=True)


def share_initial_weights(reference_dir: Path, model_dir: Path) -> list[str]:
    """Copy every non-encoder tensor of `reference_dir`'s model into `model_dir`'s (same shapes); returns the names
    that could not be shared (their shapes differ)."""
    from safetensors.torch import load_file, save_file

    reference = load_file(str(reference_dir / "model.safetensors"))
    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    not_shared = []
    for name, tensor in weights.items():
        if ".vision_tower." in f".{name}":
            continue
        if name in reference and reference[name].shape == tensor.shape:
            weights[name] = reference[name]
        else:
            not_shared.append(name)
    save_file(weights, str(path), metadata={"format": "pt"})
    return not_shared


def encoder_profile(model_dir: Path, eval_dir: Path, max_images: int = 32, repeats: int = 3) -> dict[str, Any]:
    """Encoder parameters, image tokens per image, forward FLOPs per image and images/s on held-out images."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .benchmarking.common import time_interleaved
    from .encoders import describe_encoder
    from .parameters import count_parameters
    from .report import parquet_rows

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    images = []
    for path in sorted(eval_dir.rglob("*.parquet")):
        images += [image for _, image in parquet_rows(path)][: max(1, max_images // 3)]
    images = images[:max_images]
    inputs = processor.process_images(images)
    tokens = processor.num_image_tokens(inputs["image_grid_thw"])

    def encode() -> None:
        with torch.no_grad():
            model.get_image_features(**inputs)

    with FlopCounterMode(display=False) as counter:
        encode()
    seconds = time_interleaved({"encode": encode}, repeats=repeats)["encode"]
    tower = model.model.vision_tower
    return {"description": describe_encoder(tower.config), "encoder_parameters": count_parameters(tower), "parameters": count_parameters(model),
            "tokens_per_image": statistics.mean(tokens), "patches_per_image": float(inputs["image_grid_thw"].prod(-1).float().mean()),
            "gflops_per_image": counter.get_total_flops() / len(images) / 1e9,
            "images_per_s": len(images) / statistics.median(seconds), "images": len(images)}


def plot_overlaid_losses(runs: dict[str, Path], out_png: Path) -> None:
    """One panel per stage, one line per encoder (training loss per step, held-out loss dashed with markers)."""
    import matplotlib

    from .report import loss_points

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("stage3", "sft")
    fig, axes = plt.subplots(1, len(stages), figsize=(7 * len(stages), 4.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for index, (encoder, out) in enumerate(runs.items()):
            color = f"C{index}"
            train, held_out = loss_points(out / stage / "metrics.jsonl")
            if train:
                ax.plot(*zip(*train), color=color, alpha=0.8, label=f"{encoder} train")
            if held_out:
                ax.plot(*zip(*held_out), "o--", color=color, label=f"{encoder} held-out")
        ax.set_title({"stage3": "Stage III alignment", "sft": "instruction tuning"}[stage])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("next-token loss (assistant tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def comparison_markdown(results: dict[str, dict[str, Any]], recipe: Recipe, command: str, seconds: float) -> str:
    encoders = list(results)
    tasks = [row["task"] for row in next(iter(results.values()))["rows"]]
    lines = [
        "# FineViT-VL encoder comparison",
        "",
        (f"`{command}` on {os.cpu_count()} CPU cores, {seconds / 60:.1f} minutes. Same recipe for every encoder: "
         f"data `make-data --seed {recipe.seed}` ({', '.join(recipe.families)}), a {recipe.size} Qwen3-architecture "
         f"LLM and projector from the same initial weights, Stage III {recipe.steps('stage3')} steps then SFT "
         f"{recipe.steps('sft')} steps, encoder unfrozen; encoders random-initialised at matched width / depth / "
         f"heads. Scores: lmms-eval on held-out synthetic splits."),
        "",
        "## Scores",
        "",
        "| task | metric | " + " | ".join(encoders) + " | trivial baseline |",
        "|---|---|" + "---|" * len(encoders) + "---|",
    ]
    for index, task in enumerate(tasks):
        first = results[encoders[0]]["rows"][index]
        cells = [f"{results[e]['rows'][index]['model']:.3f}" for e in encoders]
        lines.append(f"| {task} | {first['metric']} | " + " | ".join(cells) +
                     f" | {first['baseline']:.3f} ({first['baseline_name']}) |")
    lines += ["", "## Encoders", "",
              ("| encoder | input | encoder params (M) | model params (M) | patches / image | image tokens / image | "
              "encoder GFLOPs / image | encoder images/s | Stage III held-out loss | SFT held-out loss |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for encoder in encoders:
        p, stages = results[encoder]["profile"], results[encoder]["stages"]
        lines.append(
            f"| {encoder} | {p['description']} | {p['encoder_parameters'] / 1e6:.2f} | "
            f"{p['parameters'] / 1e6:.2f} | {p['patches_per_image']:.1f} | {p['tokens_per_image']:.1f} | "
            f"{p['gflops_per_image']:.3f} | {p['images_per_s']:.0f} | "
            f"{stages['stage3']['eval_start']:.3f} -> {stages['stage3']['eval_end']:.3f} | "
            f"{stages['sft']['eval_start']:.3f} -> {stages['sft']['eval_end']:.3f} |")
    lines += ["", (f"FLOPs: `torch.utils.flop_counter` over the encoder + projector forward of {p['images']} held-out "
                   "images; images/s: the same forward, median of repeats, one process, fp32."), "",
              "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def run_comparison(recipe: Recipe, encoders: list[str], out: Path, command: str = "",
                   patch_size: int | None = None) -> dict[str, dict[str, Any]]:
    """Run the recipe once per encoder under `out/<encoder>/`; write `out/report.md`, `results.json`,
    `loss_curves.png`; return `{encoder: {"rows", "scores", "stages", "profile"}}`. `patch_size` replaces every
    encoder's own (to separate the architecture from the patch size)."""
    from .report import result_rows

    started = time.perf_counter()
    data_dir = prepare_data(recipe, out / "data")
    results: dict[str, dict[str, Any]] = {}
    reference: Path | None = None
    for encoder in encoders:
        run_out = out / encoder
        run_out.mkdir(parents=True, exist_ok=True)
        run_recipe = replace(recipe, encoder=encoder)
        _log(f"{encoder}: building {run_recipe.vision_preset}")
        init_dir = build_initial_model(recipe.demo_size, data_dir, run_out / "init", recipe.seed,
                                       vision_preset=run_recipe.vision_preset,
                                       vision_overrides={"patch_size": patch_size} if patch_size else None)
        if reference is None:
            reference = init_dir
        else:
            not_shared = share_initial_weights(reference, init_dir)
            if not_shared:
                _log(f"{encoder}: these non-encoder weights differ in shape and start from their own init: {not_shared}")
        stages = train_stages(run_recipe, init_dir, data_dir, run_out)
        model_dir = Path(stages["sft"]["run_dir"]) / "final"
        scores = evaluate(model_dir, data_dir, run_out / "eval")
        results[encoder] = {"rows": result_rows(scores, data_dir / "eval"), "scores": scores, "stages": stages,
                            "profile": encoder_profile(model_dir, data_dir / "eval")}
        _log(f"{encoder}: " + ", ".join(f"{row['task']} {row['model']:.3f}" for row in results[encoder]["rows"]))
    plot_overlaid_losses({encoder: out / encoder for encoder in encoders}, out / "loss_curves.png")
    seconds = time.perf_counter() - started
    (out / "report.md").write_text(comparison_markdown(results, recipe, command, seconds))
    (out / "results.json").write_text(json.dumps({"seconds": seconds, "results": results}, indent=2, default=str))
    return results


def main(argv: list[str] | None = None) -> int:
    from .encoders import ENCODER_FAMILIES

    parser = argparse.ArgumentParser(prog="finevit-vl compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", choices=ENCODER_FAMILIES, default=list(DEFAULT_ENCODERS),
                        help="encoder families to compare (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="training budget per encoder in CPU minutes (sets step counts; default: %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (default: %(default)s)")
    parser.add_argument("--families", nargs="+", choices=list(SFT_WEIGHTS), default=list(DEFAULT_FAMILIES),
                        help="task families to train and evaluate (default: %(default)s)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="give every encoder this patch size instead of its own (SigLIP's is 16, the others' 14)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and training (default: 0)")
    parser.add_argument("--out", default="runs/compare", help="run folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                        help="extra trainer override for every run (as in quickstart); repeatable")
    args = parser.parse_args(argv)
    recipe = Recipe(args.minutes, args.size, args.seed, tuple(args.families), tuple(args.overrides))
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    command = ("finevit-vl compare --encoders " + " ".join(args.encoders) + f" --minutes {args.minutes:g} --size "
               f"{args.size} --families {' '.join(args.families)} --seed {args.seed}"
               + (f" --patch-size {args.patch_size}" if args.patch_size else ""))
    run_comparison(recipe, list(args.encoders), out, command, args.patch_size)
    print((out / "report.md").read_text())
    return 0


__all__ = ["DEFAULT_ENCODERS", "main", "run_comparison", "share_initial_weights"]


if __name__ == "__main__":
    raise SystemExit(main())
