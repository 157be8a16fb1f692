"""The encoder-pretraining ablations at toy scale, measured side by side on this machine (2 CPU cores, ~35 min):

1. Stage II text length: the same tiny dual encoder trained with captions cut to 64 tokens, 256 tokens, or the
   paper's schedule 64 -> 256 (at step 200 of 400), each scored on the long-caption retrieval split (groups of 8 images whose captions
   share their first ~145 tokens) at 64 and at 256 tokens.
2. The recipe's stages: the demo's Stage III + SFT (`finevit-vl quickstart`) from a random FineViT-tiny vs from the
   encoder of Stage I (MAE pixels) -> Stage II (`--set stage3:model.init_from=...`), same steps and data.

    python benchmarks/pretraining_ablation.py [--out runs/pretraining_ablation] [--only text,stages]

Writes `OUT/results.json` and `OUT/results.md` (and copies both to `benchmarks/results/pretraining_ablation.*`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "train_configs"
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false"}
# Every variant's text tower has 256 positions (the same architecture); only the caption length differs.
TEXT_VARIANTS = {  # name -> (run folder, overrides of tiny_cpu_stage2_contrastive.yaml)
    "64 tokens": ("len64", [
        "contrastive.text_max_length=64",
        ("contrastive.text_overrides={hidden_size: 128, intermediate_size: 256, num_hidden_layers: 2, "
         "num_attention_heads: 4, max_position_embeddings: 256}"),
    ]),
    "256 tokens": ("len256", []),  # the shipped tiny config
    "64 -> 256 (step 200)": ("len64to256", [
        "contrastive.text_max_length=64",
        "train.phases=[{start_step: 0, text_max_length: 64}, {start_step: 200, text_max_length: 256}]",
    ]),
}


def _cli(*args: str) -> None:
    command = [sys.executable, "-m", "finevit_vl.cli", *args]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def _zeroshot(model: Path, data: Path, length: int, out: Path) -> dict:
    _cli("eval-zeroshot", str(model), "--data", str(data), "--text-max-length", str(length), "--out", str(out))
    return json.loads((out / "results.json").read_text())


def text_length(out: Path, data: Path) -> list[dict]:
    rows = []
    for name, (folder, overrides) in TEXT_VARIANTS.items():
        run_dir = out / "stage2" / folder
        started = time.perf_counter()
        if not (run_dir / "final" / "config.json").exists():  # a finished variant is scored again, not retrained
            _cli("train", str(CONFIGS / "tiny_cpu_stage2_contrastive.yaml"), f"run_dir={run_dir}",
                 f"data.train.path={data / 'stage2' / 'train.jsonl'}", *overrides)
        row = {"variant": name, "train_seconds": round(time.perf_counter() - started)}
        for length in (64, 256):
            result = _zeroshot(run_dir / "final", data / "zeroshot" / "retrieval_long", length,
                               run_dir / f"zeroshot_long_{length}")
            row[f"long@{length}"] = {k: result["metrics"][k] for k in ("image_to_text_R@1", "text_to_image_R@1")}
            row[f"long@{length}"]["truncated"] = result["truncated_texts"]
            row["chance_R@1"] = result["chance"]["text_to_image_R@1"]
        rows.append(row)
    return rows


def stages(out: Path, data: Path) -> dict:
    stage1, stage2 = out / "chain" / "stage1", out / "chain" / "stage2"
    # MAE pixels: no pretrained teacher can be loaded here (no downloads), and regressing onto a random one teaches
    # nothing; raw pixels, since per-patch normalised ones are ~0 on the flat synthetic backgrounds.
    _cli("train", str(CONFIGS / "tiny_cpu_stage1_mim.yaml"), f"run_dir={stage1}", "train.max_steps=300",
         "mim.target=pixels", "mim.normalize_target=false", f"data.train.path={data / 'stage1' / 'train.jsonl'}")
    _cli("train", str(CONFIGS / "tiny_cpu_stage2_contrastive.yaml"), f"run_dir={stage2}",
         f"data.train.path={data / 'stage2' / 'train.jsonl'}", f"model.init_from={stage1 / 'final'}",
         *TEXT_VARIANTS["64 -> 256 (step 200)"][1])  # the variant the README's stage table was measured with
    scores = {}
    for name, extra in (("scratch", []), ("after I -> II", ["--set", f"stage3:model.init_from={stage2 / 'final'}"])):
        run = out / "quickstart" / name.split()[0]
        _cli("quickstart", "--out", str(run), *extra)
        scores[name] = json.loads((run / "eval" / "results.json").read_text())["results"]
    return scores


def markdown(results: dict) -> str:
    lines = []
    if "text" in results:
        lines += ["| Stage II captions | long-caption retrieval @64 tokens I2T / T2I R@1 | @256 tokens I2T / T2I R@1 | chance |",
                  "|---|---|---|---|"]
        for row in results["text"]:
            cells = [f"{row[k]['image_to_text_R@1']:.1f} / {row[k]['text_to_image_R@1']:.1f}" for k in ("long@64", "long@256")]
            lines.append(f"| {row['variant']} | {cells[0]} | {cells[1]} | {row['chance_R@1']:.1f} |")
    if "stages" in results:
        arms = list(results["stages"])
        metrics = sorted({(task, metric) for arm in arms for task, values in results["stages"][arm].items()
                          if isinstance(values, dict) for metric, v in values.items() if isinstance(v, (int, float))})
        lines += ["", "| task | metric | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
        for task, metric in metrics:
            values = [results["stages"][arm].get(task, {}).get(metric) for arm in arms]
            lines.append(f"| {task} | {metric} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/pretraining_ablation")
    parser.add_argument("--only", default="text,stages", help="comma-separated: text, stages")
    parser.add_argument("--train-images", type=int, default=8000)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "pretrain_manifest.json").exists():
        from finevit_vl.data.pretrain_data import make_pretrain_data

        make_pretrain_data(data, seed=0, num_train=args.train_images, num_eval=200, workers=2)
    results: dict = {}
    only = set(args.only.split(","))
    if "text" in only:
        results["text"] = text_length(out, data)
    if "stages" in only:
        results["stages"] = stages(out, data)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    target = ROOT / "benchmarks" / "results"
    for suffix in ("json", "md"):
        shutil.copy(out / f"results.{suffix}", target / f"pretraining_ablation.{suffix}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
