"""The training config: one YAML file, `key=value` overrides on the command line, written back resolved to the run.

```
finevit-vl train train_configs/tiny_cpu_stage3.yaml train.max_steps=50 data.pack=true run_dir=runs/x
```

Every section is a dataclass below, and so is each data source (`data.train`, `data.eval`: the `SourceConfig`s of
`finevit_vl.data.sources`, chosen by their `type`); unknown or missing keys and wrong types raise `ValueError` naming
the dotted key. Relative data and model paths resolve against the current directory and are stored absolute in
`run_dir/config.yaml`, so a run can be reproduced from its folder (`finevit-vl train runs/x/config.yaml`).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.configs import from_mapping, to_mapping
from ..data.sources import SourceConfig, resolve_source_paths


# Every trainable module of every stage, upstream first. The encoder is `vision_tower` in all of them (the stage
# models call it `vision_model`, the transformers name in dual encoders); `text_tower` is Stage II's text encoder and
# `heads` what only pretraining uses (Stage I's decoder, Stage II's projections, temperature and bias).
MODULES: tuple[str, ...] = ("vision_tower", "multi_modal_projector", "language_model", "text_tower", "heads")
# The modules each objective's model has.
OBJECTIVE_MODULES: dict[str, tuple[str, ...]] = {
    "next_token": ("vision_tower", "multi_modal_projector", "language_model"),
    "masked_image": ("vision_tower", "heads"),
    "contrastive": ("vision_tower", "text_tower", "heads"),
}
OBJECTIVES: tuple[str, ...] = tuple(OBJECTIVE_MODULES)


@dataclass
class ModelConfig:
    """Where the model comes from: `init: tiny` (built locally, tokenizer trained on the training text) or `path`."""

    init: str | None = None  # "tiny" / "preset": built from the presets below, random weights
    path: str | None = None  # a FineViT-VL checkpoint (e.g. from `finevit-vl build`), loaded with from_pretrained
    text_model_type: str = "qwen3"  # tiny only
    vision_preset: str = "finevit-test"  # init: tiny only; any encoder preset (finevit_vl.encoders), e.g. siglip2-naflex-test
    vocab_size: int = 512  # tiny only
    tokenizer_corpus_records: int = 2000  # tiny only: training records read to train the tokenizer
    text_overrides: dict[str, Any] = field(default_factory=dict)  # tiny only
    dtype: str = "float32"  # weights: float32 | bfloat16 (mixed precision is train.mixed_precision)
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2 | None (model default)
    quantization: str | None = None  # 4bit | 8bit (QLoRA; needs lora.enabled and path)
    gradient_checkpointing: bool = False
    # The previous stage's output folder (Stage I / II / III / SFT, or a FineViT encoder folder): after the model is
    # built (init or path), every tensor it shares with this one is carried over, shape-adapted where needed, and the
    # carried / resized / dropped / newly initialised tensors are logged and written to run_dir/handoff.json.
    init_from: str | None = None


@dataclass
class ModuleConfig:
    train: bool = True
    lr: float | None = None  # None: optim.lr


@dataclass
class ModulesConfig:
    """Freeze policy and learning rate per module; `language_model` includes `lm_head`."""

    vision_tower: ModuleConfig = field(default_factory=lambda: ModuleConfig(train=False))
    multi_modal_projector: ModuleConfig = field(default_factory=ModuleConfig)
    language_model: ModuleConfig = field(default_factory=ModuleConfig)
    text_tower: ModuleConfig = field(default_factory=ModuleConfig)  # Stage II
    heads: ModuleConfig = field(default_factory=ModuleConfig)  # Stages I and II


@dataclass
class LoraConfig:
    """LoRA on the language model (PEFT); modules with `train: true` besides it are trained fully (`modules_to_save`)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    export: str = "both"  # adapter | merged | both


@dataclass
class DataConfig:
    train: SourceConfig | None = None  # e.g. {type: jsonl, path: data/stage3/train.jsonl}
    eval: SourceConfig | None = None
    box_format: str = "int1000"
    max_length: int = 2048  # tokens after image expansion; longer samples are skipped (bad records), never truncated
    min_pixels: int | None = None  # pixel budget of this stage, set on the image processor
    max_pixels: int | None = None
    pack: bool = False
    max_regions: int | None = 16
    region_directions: str = "both"  # both | box_to_text | text_to_box: which region / OCR / grounding turns are rendered
    shuffle_turns: bool = True
    max_bad_records: int | None = 100  # stop once more records than this were skipped (all ranks); None: no count limit
    max_bad_fraction: float | None = 0.1  # stop once skipped / read exceeds this (all ranks); None: no fraction limit
    bad_fraction_min_records: int = 200  # records read (all ranks) before the fraction limit applies
    prefetch_steps: int = 2  # steps prepared ahead in a background thread (0: inline)
    num_workers: int = 0  # DataLoader worker processes per rank that decode, resize and tokenize (0: in-process)


@dataclass
class MaskedImageConfig:
    """Stage I (`objective: masked_image`): what the decoder predicts at the hidden patches."""

    target: str = "features"  # features: a frozen teacher's patch features (the paper) | pixels: MAE
    teacher: str | None = None  # features: a local folder of any transformers vision model (AutoModel), e.g. DINOv2
    teacher_preset: str = "dinov2-test"  # no teacher folder (tests, demo): a random tiny teacher of this preset
    teacher_layer: int = -1  # -1: last_hidden_state; i: hidden_states[i]
    mask_ratio: float = 0.75
    feature_loss: str = "l2"  # l2 | cosine (EVA-02)
    normalize_target: bool = True  # layer-normed teacher tokens (l2) / per-patch normalised pixels (MAE)
    decoder_hidden_size: int = 256
    decoder_num_layers: int = 2
    decoder_num_attention_heads: int = 4


@dataclass
class ContrastiveConfig:
    """Stage II (`objective: contrastive`): FineViT + pooling head against a text tower."""

    loss: str = "sigmoid"  # sigmoid (SigLIP, the paper) | softmax (CLIP)
    text_model: str | None = None  # a local folder of any transformers text encoder + tokenizer (SigLIP2's text model, a BERT)
    text_model_type: str = "siglip_text_model"  # init: tiny only: the tiny text tower's class
    text_overrides: dict[str, Any] = field(default_factory=dict)  # init: tiny only
    projection_dim: int = 512
    text_pooling: str = "auto"  # auto (the tower's pooler_output, else mean) | mean | first | last (non-padding token)
    text_max_length: int = 64  # caption tokens; longer captions are cut (counted and logged); train.phases can raise it


@dataclass
class PhaseConfig:
    """One phase of a stage's schedule (unset fields keep the previous phase's value)."""

    start_step: int = 0  # in force once this many optimizer steps are done (0: from the first; logs count steps done)
    min_pixels: int | None = None
    max_pixels: int | None = None  # the pixel budget (e.g. Stage II: 336*336 -> 448*448 native)
    text_max_length: int | None = None  # Stage II: caption tokens (64 -> 256)
    train_text_tower: bool | None = None  # Stage II: false = the text tower's learning rate is 0 (frozen, then unfrozen)
    frozen_modules: list[str] | None = None  # GranViT's phases in one run: these modules' learning rates are 0 ([] none)
    region_directions: str | None = None  # both | box_to_text | text_to_box, for records encoded from this phase on
    distill_weight: float | None = None  # the self-distillation term's weight (0: off) while this phase is in force


@dataclass
class RegionDistillConfig:
    """GranViT's region self-distillation in the next-token stages (off by default): an EMA teacher encoder encodes
    each box crop, the student's patch features (the layer the projector takes) are ROIAligned at the same box, and
    the two pooled maps are matched with MSE, a loss term beside the next-token loss (`distill_loss` in the logs)."""

    enabled: bool = False
    momentum: float = 0.9  # teacher <- momentum * teacher + (1 - momentum) * student, after every optimizer step
    weight: float = 1.0
    crop_pixels: int = 112 * 112  # each crop is resized (aspect kept) to about this many pixels for the teacher
    output_size: int = 2  # ROIAlign output side (pooled map output_size x output_size)
    max_regions: int = 4  # boxes distilled per image (a seeded random subset beyond)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # Train for this many passes over data.train instead: max_steps = ceil(epochs * records / global_batch_size), with
    # records counted in the source (jsonl, hf; bad ones included). Sets the schedule's length too.
    epochs: float | None = None
    global_batch_size: int = 32  # samples per optimizer step, over all ranks
    micro_batch_size: int = 4  # rows per forward on one rank (a row holds several samples when packing)
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: str | bool = "auto"  # auto: this run's newest intact checkpoint | false: a new run | a checkpoint dir
    overwrite: bool = False  # start a new run in a run_dir that holds another run, deleting that run's files
    stop_after_steps: int | None = None  # stop (checkpoint, no export) after this many steps in this invocation
    phases: list[PhaseConfig] = field(default_factory=list)  # a schedule of pixel budget / text length / freezing


@dataclass
class EvalConfig:
    every: int = 200  # held-out loss every N steps (0: only before and after training)
    max_samples: int = 256
    tasks: list[str] = field(default_factory=list)  # lmms-eval tasks via finevit_vl.eval.suite
    tasks_every: int = 0  # 0: at the end only
    limit: int | None = None
    data_dir: str | None = None
    batch_size: int = 8


@dataclass
class LoggingConfig:
    log_with: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb
    project_name: str = "finevit-vl"
    peak_tflops: float | None = None  # per device; None: a table on GPU, a measured GEMM on CPU


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: str | None = None  # default: run_dir/final (LoRA adapter: run_dir/adapter)


@dataclass
class Config:
    run_dir: str = "runs/finevit-vl"
    seed: int = 0
    # next_token: Stage III / SFT (a FineViT-VL) | masked_image: Stage I | contrastive: Stage II (the encoder alone)
    objective: str = "next_token"
    model: ModelConfig = field(default_factory=ModelConfig)
    modules: ModulesConfig = field(default_factory=ModulesConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    mim: MaskedImageConfig = field(default_factory=MaskedImageConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    distill: RegionDistillConfig = field(default_factory=RegionDistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        """Raise `ValueError` for inconsistent settings, before anything expensive runs."""
        if (self.model.init is None) == (self.model.path is None):
            raise ValueError("set exactly one of model.init (tiny) and model.path (a FineViT-VL checkpoint)")
        if self.model.init not in (None, "tiny", "preset"):
            raise ValueError(f"model.init must be 'tiny' (or 'preset', the same: built from model.vision_preset with "
                             f"random weights), got {self.model.init!r}")
        if self.model.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"model.quantization must be 4bit, 8bit or null, got {self.model.quantization!r}")
        if self.model.quantization and not (self.lora.enabled and self.model.path):
            raise ValueError("model.quantization (QLoRA) needs lora.enabled: true and a model.path")
        if self.model.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.model.dtype!r}")
        if self.data.train is None:
            raise ValueError("data.train is required, e.g. {type: jsonl, path: data/stage3/train.jsonl}")
        if self.lora.export not in ("adapter", "merged", "both"):
            raise ValueError(f"lora.export must be adapter, merged or both, got {self.lora.export!r}")
        if self.train.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.train.mixed_precision!r}")
        if self.train.epochs is not None and not self.train.epochs > 0:
            raise ValueError(f"train.epochs must be > 0 or null, got {self.train.epochs}")
        if min(self.train.max_steps, self.train.global_batch_size, self.train.micro_batch_size) < 1:
            raise ValueError("train.max_steps, train.global_batch_size and train.micro_batch_size must be >= 1")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not any(getattr(self.modules, name).train for name in OBJECTIVE_MODULES[self.objective]):
            raise ValueError("every module is frozen (modules.*.train: false): nothing to train")
        if self.objective != "next_token":
            self._validate_encoder_stage()
        if self.data.region_directions not in ("both", "box_to_text", "text_to_box"):
            raise ValueError(f"data.region_directions must be both, box_to_text or text_to_box, got "
                             f"{self.data.region_directions!r}")
        if self.distill.enabled:
            if self.objective != "next_token" or self.lora.enabled:
                raise ValueError("distill.enabled (GranViT region self-distillation) needs objective next_token, no LoRA")
            if not 0.0 <= self.distill.momentum < 1.0:
                raise ValueError(f"distill.momentum must be in [0, 1), got {self.distill.momentum}")
            if not self.modules.vision_tower.train:
                raise ValueError("distill.enabled trains the encoder: set modules.vision_tower.train: true")
        starts = [phase.start_step for phase in self.train.phases]
        if starts != sorted(set(starts)) or any(step < 0 for step in starts):
            raise ValueError(f"train.phases must have distinct, increasing start_step values >= 0, got {starts}")
        from ..data.render import REGION_DIRECTIONS

        for index, phase in enumerate(self.train.phases):
            unknown = sorted(set(phase.frozen_modules or ()) - set(MODULES))
            if unknown:
                raise ValueError(f"train.phases[{index}].frozen_modules: unknown module(s) {unknown}; modules are {list(MODULES)}")
            if phase.region_directions is not None and phase.region_directions not in REGION_DIRECTIONS:
                raise ValueError(f"train.phases[{index}].region_directions must be one of {REGION_DIRECTIONS}, got "
                                 f"{phase.region_directions!r}")
            if phase.distill_weight is not None and not self.distill.enabled:
                raise ValueError(f"train.phases[{index}].distill_weight needs distill.enabled: true")

    def _validate_encoder_stage(self) -> None:
        if self.lora.enabled or self.model.quantization:
            raise ValueError(f"objective {self.objective} trains the encoder itself: lora and quantization are not supported")
        if self.eval.tasks:
            raise ValueError(f"eval.tasks (lmms-eval) needs a FineViT-VL; objective {self.objective} trains the encoder "
                             "alone (evaluate it with `finevit-vl eval-zeroshot` after Stage II)")
        if self.data.pack:
            raise ValueError(f"data.pack is for token rows; objective {self.objective} packs images by construction")
        if self.data.eval is not None:
            raise ValueError(f"data.eval (a held-out next-token loss) does not apply to objective {self.objective}; "
                             "score a Stage II model with `finevit-vl eval-zeroshot`")
        if self.objective == "masked_image":
            if self.mim.target not in ("features", "pixels"):
                raise ValueError(f"mim.target must be features or pixels, got {self.mim.target!r}")
            if self.mim.feature_loss not in ("l2", "cosine"):
                raise ValueError(f"mim.feature_loss must be l2 or cosine, got {self.mim.feature_loss!r}")
            if not 0.0 < self.mim.mask_ratio < 1.0:
                raise ValueError(f"mim.mask_ratio must be in (0, 1), got {self.mim.mask_ratio}")
        if self.objective == "contrastive" and self.contrastive.loss not in ("sigmoid", "softmax"):
            raise ValueError(f"contrastive.loss must be sigmoid or softmax, got {self.contrastive.loss!r}")

    def check_world_size(self, world_size: int) -> None:
        if self.train.global_batch_size % world_size:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not divisible by the {world_size} "
                "processes; each rank takes an equal share of every global batch"
            )


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["train.max_steps=10", "data.pack=true"]` -> `[("train.max_steps", 10), ("data.pack", True)]` (YAML values)."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
        parsed.append((key.strip(), yaml.safe_load(value)))
    return parsed


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `key=value` overrides, resolve paths and validate."""
    data: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file not found: {path} (the shipped ones are in train_configs/)")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config is a mapping of sections (model:, data:, train:, ...), got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    config = from_mapping(Config, data)
    config.run_dir = _absolute(config.run_dir)
    config.model.path = _absolute(config.model.path)  # a local checkpoint folder (from_pretrained)
    config.model.init_from = _absolute(config.model.init_from)
    config.mim.teacher = _absolute(config.mim.teacher)
    config.contrastive.text_model = _absolute(config.contrastive.text_model)
    if config.data.train is not None:
        config.data.train = resolve_source_paths(config.data.train)
    if config.data.eval is not None:
        config.data.eval = resolve_source_paths(config.data.eval)
    if config.eval.data_dir is not None:
        config.eval.data_dir = _absolute(config.eval.data_dir)
    config.validate()
    return config


def config_to_dict(config: Config) -> dict:
    """The YAML form of ``config`` (what `save_config` writes and `load_config` reads back to an equal config)."""
    return to_mapping(config)


def save_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


__all__ = ["MODULES", "OBJECTIVES", "OBJECTIVE_MODULES", "Config", "config_to_dict", "load_config", "parse_overrides", "save_config"]
