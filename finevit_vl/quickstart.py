"""`finevit-vl quickstart` (`make demo`): the whole toolkit on this machine, with nothing to download.

1. generate the synthetic fine-grained data (counting, grounding, OCR, bar charts, documents; train + held-out eval);
2. build a small FineViT-VL from an embedded default (FineViT preset + Qwen3-architecture LLM + a tokenizer trained
   on the data, with the image token and ChatML template), random-initialised;
3. Stage III alignment, then instruction tuning, with the real trainer through `accelerate launch`;
4. evaluate the final model with the project's lmms-eval tasks on the held-out splits (local data in the benchmark
   schemas), next to trivial baselines (majority answer, a blind answer per question, fixed boxes: centred and each
   quadrant, the empty string);
5. write the run folder: HF checkpoint + filled model card, `report.md`, loss curves and a prediction grid (PNG).

Step counts are fixed per `--minutes` (calibrated on a 2-core CPU) rather than timed, so two runs with the same seed
give the same scores.

The steps are functions of a `Recipe` and explicit folders (`prepare_data`, `build_initial_model`, `stage_config`,
`train_stages`, `evaluate`), so another command can run the same recipe, e.g. from other initial models.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .train.config import Config


@dataclass(frozen=True)
class DemoSize:
    """One `--size` choice: model shape, image size and throughput on a 2-core CPU (training samples per minute;
    Stage III samples are multi-turn region records, SFT samples single Q/A turns)."""

    vision_preset: str
    text: dict
    image_size: int
    stage3_samples_per_minute: int
    sft_samples_per_minute: int
    eval_per_task: int = 100
    position_frequencies: int = 8
    stage3_lr: float = 2e-3
    sft_lr: float = 5e-4
    micro_batch_size: int = 4

    @property
    def max_pixels(self) -> int:
        """Pixel budget of the model and both stages: the largest generated image (sides vary up to 1.25x)."""
        return int((self.image_size * 1.25) ** 2) + 1


SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(
        vision_preset="finevit-tiny",
        text={"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32},
        image_size=112,
        stage3_samples_per_minute=900,
        sft_samples_per_minute=3000,
    ),
    "small": DemoSize(
        vision_preset="finevit-small",
        text={"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 32},
        image_size=168,
        stage3_samples_per_minute=150,
        sft_samples_per_minute=500,
        stage3_lr=1e-3,
        sft_lr=1e-3,
    ),
    "base": DemoSize(
        vision_preset="finevit-base",
        text={"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 64},
        image_size=224,
        stage3_samples_per_minute=30,
        sft_samples_per_minute=100,
        stage3_lr=5e-4,
        sft_lr=5e-4,
    ),
}
GLOBAL_BATCH = 16
STAGE3_SHARE = 0.4  # of the training minutes; the rest is instruction tuning
# Instruction-tuning mixture over the generator's task families, weighted by the steps each needs of its own before it
# is learned (word recognition the most; grounding far more than the default budget has: EXPERIMENTS.md).
SFT_WEIGHTS = {"counting": 0.15, "grounding": 0.25, "ocr": 0.4, "chart": 0.15, "document": 0.05}
# Past twice the default budget's SFT steps the families learned within it stop gaining, so their sample counts stay
# and grounding, which keeps improving with steps, takes every further step.
SATURATED_SFT_STEPS = 1800
# The encoder trains in both stages (the paper unfreezes it for local tasks), at the stage's rate divided by this:
# from random initialisation at the LLM's rate it collapses (EXPERIMENTS.md).
ENCODER_LR_DIVISOR = {"stage3": 20, "sft": 12}
STAGE_CONFIGS = {"stage3": "tiny_cpu_stage3.yaml", "sft": "tiny_cpu_sft.yaml"}  # in training order
TOKENIZER_RECORDS_PER_FILE = 4000  # Stage III and SFT training records each that the tokenizer is trained on
VOCAB_SIZE = 1024


def sft_weights(families: list[str], sft_steps: int) -> dict[str, float]:
    """Instruction-tuning mixture weights of `families` for a run of `sft_steps` optimizer steps."""
    weights = {family: SFT_WEIGHTS[family] for family in families}
    if "grounding" not in weights or len(weights) == 1 or sft_steps <= SATURATED_SFT_STEPS:
        return weights
    total = sum(weights.values())
    others = {f: w / total * SATURATED_SFT_STEPS / sft_steps for f, w in weights.items() if f != "grounding"}
    return {**others, "grounding": 1 - sum(others.values())}


@dataclass(frozen=True)
class Recipe:
    """The demo's settings; every step count, learning rate and mixture weight follows from them."""

    minutes: float = 8.0  # training budget in CPU minutes
    size: str = "tiny"  # a key of SIZES
    seed: int = 0
    families: tuple[str, ...] = tuple(SFT_WEIGHTS)
    overrides: tuple[str, ...] = ()  # trainer `[STAGE:]key=value` overrides, applied last
    encoder: str = "finevit"  # an encoder family (`finevit_vl.encoders`), at the size's FineViT width / depth

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose from {sorted(SIZES)}")
        unknown = [family for family in self.families if family not in SFT_WEIGHTS]
        if unknown or not self.families:
            raise ValueError(f"families {list(self.families)}: choose one or more of {list(SFT_WEIGHTS)}")

    @property
    def demo_size(self) -> DemoSize:
        return SIZES[self.size]

    @property
    def vision_preset(self) -> str:
        """The encoder preset: `encoder` at the size of the demo size's FineViT preset."""
        return f"{self.encoder}-{self.demo_size.vision_preset.removeprefix('finevit-')}"

    def steps(self, stage: str) -> int:
        """Optimizer steps of `stage` ("stage3" or "sft") for this budget."""
        if stage == "stage3":
            share, per_minute = STAGE3_SHARE, self.demo_size.stage3_samples_per_minute
        else:
            share, per_minute = 1 - STAGE3_SHARE, self.demo_size.sft_samples_per_minute
        return max(10, int(self.minutes * share * per_minute) // GLOBAL_BATCH)

    @property
    def train_per_task(self) -> int:
        """Training images per family: enough that the model sees each only a few times."""
        return min(4000, max(300, self.steps("sft") * GLOBAL_BATCH // 8))

    @property
    def mixture(self) -> dict[str, float]:
        return sft_weights(list(self.families), self.steps("sft"))

    def mixture_text(self) -> str:
        return ", ".join(f"{family} {weight:.2f}" for family, weight in self.mixture.items())

    def stage_overrides(self, stage: str) -> list[str]:
        """The `--set` overrides for `stage`: unprefixed ones, and `stage:`-prefixed ones without the prefix."""
        prefixes = tuple(f"{name}:" for name in STAGE_CONFIGS)
        return [o.split(":", 1)[1] if o.startswith(prefixes) else o for o in self.overrides
                if not o.startswith(prefixes) or o.startswith(f"{stage}:")]

    def command(self) -> str:
        encoder = f" --encoder {self.encoder}" if self.encoder != "finevit" else ""
        return f"finevit-vl quickstart --size {self.size} --minutes {self.minutes:g} --seed {self.seed}{encoder}"


def _log(message: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(command: list[str], log_path: Path, env: dict[str, str]) -> None:
    """Run a step in a subprocess, streaming its output to the console and a log file."""
    _log("$ " + " ".join(command))
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            log.write(line)
            if "it/s" not in line and "s/it" not in line:  # keep tqdm redraws out of the console
                sys.stdout.write(line)
        if process.wait() != 0:
            raise RuntimeError(f"step failed (exit {process.returncode}): {' '.join(command)}; see {log_path}")


def step_env(seed: int) -> dict[str, str]:
    """Environment of the subprocess steps: offline, and hashing seeded so runs repeat."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONHASHSEED": str(seed)}


def _lines_by_family(jsonl: Path) -> dict[str, list[str]]:
    """The lines of a make-data JSONL grouped by task family (ids are `<split>-<family>-<index>-<kind>`)."""
    groups: dict[str, list[str]] = {}
    for line in jsonl.read_text().splitlines():
        groups.setdefault(json.loads(line)["id"].split("-")[1], []).append(line)
    return groups


def split_by_family(jsonl: Path) -> dict[str, Path]:
    """`sft/train.jsonl` -> `sft/train_<family>.jsonl`, next to it so the relative image paths still resolve."""
    paths = {}
    for family, family_lines in _lines_by_family(jsonl).items():
        paths[family] = jsonl.with_name(f"{jsonl.stem}_{family}.jsonl")
        paths[family].write_text("\n".join(family_lines) + "\n")
    return paths


def interleave_by_family(jsonl: Path) -> Path:
    """`eval.jsonl` (grouped by family) -> `eval_interleaved.jsonl`, families in turn, so the held-out subset the
    trainer scores (`eval.max_samples`) covers every family."""
    groups = _lines_by_family(jsonl)
    longest = max(len(lines) for lines in groups.values())
    lines = [group[i] for i in range(longest) for group in groups.values() if i < len(group)]
    path = jsonl.with_name(f"{jsonl.stem}_interleaved.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_data(recipe: Recipe, data_dir: Path) -> Path:
    """The synthetic data of `recipe` in `data_dir` (`finevit-vl make-data`), kept if already there."""
    if not (data_dir / "make_data.json").exists():
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "finevit_vl.cli", "make-data", "--out", str(data_dir), "--seed", str(recipe.seed),
              "--train-per-task", str(recipe.train_per_task), "--eval-per-task", str(recipe.demo_size.eval_per_task),
              "--image-size", str(recipe.demo_size.image_size), "--tasks", *recipe.families],
             data_dir.parent / "make_data.log", step_env(recipe.seed))
    return data_dir


def build_initial_model(size: DemoSize, data_dir: Path, out_dir: Path, seed: int, **model_overrides: Any) -> Path:
    """A random-initialised FineViT-VL of `size` with a tokenizer trained on the data, saved to `out_dir`.

    `model_overrides` replace `finevit_vl.tiny.build_tiny_model` arguments (e.g. `vision_preset`, `text_overrides`)."""
    from itertools import islice

    from .corpus import tokenizer_corpus
    from .data import build_source
    from .parameters import count_parameters
    from .tiny import build_tiny_model, build_tokenizer

    records = [record for name in ("stage3", "sft") for record, _ in
               islice(build_source({"type": "jsonl", "path": str(data_dir / name / "train.jsonl")}),
                      TOKENIZER_RECORDS_PER_FILE)]
    tokenizer = build_tokenizer(tokenizer_corpus(records), vocab_size=VOCAB_SIZE)
    arguments = {"text_model_type": "qwen3", "vision_preset": size.vision_preset, "seed": seed,
                 "text_overrides": size.text, "max_pixels": size.max_pixels,
                 "projector_position_frequencies": size.position_frequencies, **model_overrides}
    model, processor = build_tiny_model(tokenizer=tokenizer, **arguments)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    text = model.config.text_config
    _log(f"built {arguments['vision_preset']} + {text.model_type} ({text.num_hidden_layers} layers, width "
         f"{text.hidden_size}), {count_parameters(model) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)} -> {out_dir}")
    return out_dir


def train_configs_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "train_configs"
    return packaged if packaged.exists() else Path(__file__).resolve().parents[1] / "train_configs"


def _recipe_config(recipe: Recipe, stage: str, model_path: Path, data_dir: Path, run_dir: Path) -> "Config":
    """The stage's `train_configs/` file with the recipe's settings; writes the per-family SFT files and the
    interleaved eval file it names next to the data."""
    from .train.config import load_config

    data_dir = data_dir.resolve()
    size = recipe.demo_size
    steps = recipe.steps(stage)
    lr = size.stage3_lr if stage == "stage3" else size.sft_lr
    config = load_config(train_configs_dir() / STAGE_CONFIGS[stage])
    config.run_dir, config.seed = str(run_dir.resolve()), recipe.seed
    config.model.init, config.model.path = None, str(model_path.resolve())
    # Sources as mappings: the trainer's loader types them on the way back in (`stage_config`).
    if stage == "stage3":
        config.data.train = {"type": "jsonl", "path": str(data_dir / "stage3" / "train.jsonl")}
    else:
        families = split_by_family(data_dir / "sft" / "train.jsonl")
        weights = recipe.mixture
        config.data.train = {"type": "mixture", "seed": recipe.seed,
                             "sources": [{"type": "jsonl", "path": str(families[f])} for f in recipe.families],
                             "weights": [weights[f] for f in recipe.families]}
    config.data.eval = {"type": "jsonl", "path": str(interleave_by_family(data_dir / stage / "eval.jsonl"))}
    config.data.pack, config.data.max_length, config.data.max_pixels = True, 1024, size.max_pixels
    config.train.global_batch_size, config.train.micro_batch_size = GLOBAL_BATCH, size.micro_batch_size
    config.train.max_steps, config.train.checkpoint_every = steps, steps
    config.train.log_every, config.train.keep_last = 5, 1
    config.eval.every, config.eval.max_samples = max(10, steps // 5), 64
    config.optim.lr, config.optim.warmup_steps = lr, max(2, steps // 20)
    config.modules.multi_modal_projector.lr = config.modules.language_model.lr = lr
    config.modules.vision_tower.train, config.modules.vision_tower.lr = True, lr / ENCODER_LR_DIVISOR[stage]
    return config


def stage_config(recipe: Recipe, stage: str, model_path: Path, data_dir: Path, run_dir: Path) -> "Config":
    """The trainer `Config` of one stage ("stage3" or "sft") from the checkpoint `model_path`, written to
    `run_dir/config.yaml`: its `train_configs/` file with the recipe's settings, then the recipe's `--set` overrides
    for the stage through the trainer's own loader (so they mean what they mean on `finevit-vl train`)."""
    from .train.config import load_config, save_config

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    save_config(_recipe_config(recipe, stage, model_path, data_dir, run_dir), path)
    config = load_config(path, recipe.stage_overrides(stage))
    save_config(config, path)
    return config


def _train(config_path: Path, log_path: Path, env: dict[str, str]) -> None:
    # One process: on 2 cores a second process only splits the same cores (see tests for the 2-process path).
    _run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finevit_vl.train", str(config_path)],
         log_path, env)


def train_stages(recipe: Recipe, init_dir: Path, data_dir: Path, out: Path,
                 timings: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Stage III from `init_dir`, then SFT from its export, in `out/<stage>/` (config, metrics, checkpoint, `final/`).

    Each stage's config is written to `out/<stage>/config.yaml` (`stage_config`) and the trainer started on it.
    Returns `{stage: report.stage_summary(...)}` in training order; the last stage's `final/` is the trained model.
    Stage wall times are added to `timings` if given."""
    from .report import stage_summary

    _log(f"instruction-tuning mixture: {recipe.mixture_text()}")
    summaries = {}
    model_path = init_dir
    for stage in STAGE_CONFIGS:
        started = time.perf_counter()
        run_dir = out / stage
        stage_config(recipe, stage, model_path, data_dir, run_dir)
        _train(run_dir / "config.yaml", out / f"{stage}.log", step_env(recipe.seed))
        summaries[stage] = stage_summary(run_dir)
        if timings is not None:
            timings[f"{stage} training ({summaries[stage]['steps']} steps)"] = time.perf_counter() - started
        model_path = run_dir / "final"
    return summaries


def evaluate(model_dir: Path, data_dir: Path, out: Path) -> dict[str, dict[str, float]]:
    """lmms-eval scores of `model_dir` on every synthetic task `data_dir` has held-out data for; reports in `out`."""
    from .eval.suite import run_eval_suite
    from .report import SYNTHETIC_TASKS

    tasks = [task for task, (relative, _) in SYNTHETIC_TASKS.items() if (data_dir / "eval" / relative).exists()]
    return run_eval_suite(str(model_dir), tasks=tasks, data_dir=str(data_dir / "eval"), batch_size=16, out_dir=str(out))


def write_card(model_dir: Path, recipe: Recipe, scores: dict[str, dict[str, float]]) -> Path:
    """The demo model's card, with its recipe and scores."""
    from transformers import AutoModelForImageTextToText

    from .model_card import fill_model_card, write_model_card

    training = (f"Stage III alignment ({recipe.steps('stage3')} steps x {GLOBAL_BATCH} samples: global captions, "
                f"box->caption, caption->box, OCR with boxes; encoder unfrozen), then instruction tuning "
                f"({recipe.steps('sft')} steps x {GLOBAL_BATCH}, mixture {recipe.mixture_text()}), on data from `finevit-vl make-data "
                f"--seed {recipe.seed}`; made by `finevit-vl quickstart --size {recipe.size} --minutes {recipe.minutes:g}`.")
    card = write_model_card(AutoModelForImageTextToText.from_pretrained(model_dir), model_dir,
                            "FineViT-VL quickstart model",
                            "A small FineViT-VL trained from scratch on CPU by the FineViT-VL quickstart, on synthetic "
                            "fine-grained data. A demonstration of the toolkit, not a useful model.", training)
    fill_model_card(card, scores)
    return card


def main(argv: list[str] | None = None) -> int:
    from .encoders import ENCODER_FAMILIES

    parser = argparse.ArgumentParser(prog="finevit-vl quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget in CPU minutes (sets step counts)")
    parser.add_argument("--out", default="runs/quickstart", help="run folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initial model and training (default: 0)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (bigger needs more minutes)")
    parser.add_argument("--families", nargs="+", choices=list(SFT_WEIGHTS), default=list(SFT_WEIGHTS),
                        help="task families to generate, train and evaluate (default: all five)")
    parser.add_argument("--encoder", choices=ENCODER_FAMILIES, default="finevit",
                        help="vision encoder family, random-initialised at the size's width and depth (default: finevit)")
    parser.add_argument("--keep", action="store_true", help="reuse the data of an earlier run in --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                        help="extra trainer override for both stages, or one (`sft:optim.lr=1e-3`); repeatable")
    args = parser.parse_args(argv)
    recipe = Recipe(args.minutes, args.size, args.seed, tuple(args.families), tuple(args.overrides), args.encoder)
    out = Path(args.out).resolve()
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    data_dir = prepare_data(recipe, out / "data")
    timings["data generation"] = time.perf_counter() - started
    started = time.perf_counter()
    init_dir = build_initial_model(recipe.demo_size, data_dir, out / "init", recipe.seed, vision_preset=recipe.vision_preset)
    timings["model build"] = time.perf_counter() - started
    stages = train_stages(recipe, init_dir, data_dir, out, timings)

    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(Path(stages[list(stages)[-1]]["run_dir"]) / "final", model_dir)
    started = time.perf_counter()
    scores = evaluate(model_dir, data_dir, out / "eval")
    timings[f"lmms-eval ({len(scores)} tasks)"] = time.perf_counter() - started

    from .report import write_run_report

    write_card(model_dir, recipe, scores)
    report = write_run_report(out, model_dir, data_dir, scores, stages, timings, recipe.command(), recipe.mixture_text())

    print()
    print("\n".join(line for line in report.splitlines() if line.startswith("|"))[:4000])
    print(f"\nreport: {out / 'report.md'}\nmodel:  {model_dir}\nplots:  {out / 'loss_curves.png'}, {out / 'predictions.png'}")
    return 0


__all__ = ["SIZES", "Recipe", "build_initial_model", "evaluate", "main", "prepare_data", "sft_weights", "stage_config",
           "train_stages"]
