"""Which modules train in a stage: one visible, logged decision (prismatic's `freeze_backbones`).

Parameters belong to one of three modules, by the standard attribute names: `vision_tower`, `multi_modal_projector`
and `language_model` (which also owns `lm_head`). PEFT-wrapped names (`base_model.model...`, `lora_A`,
`modules_to_save`) map the same way, so the report and the per-module learning rates work for LoRA runs too.

Modules of the encoder that the VL forward never runs (FineViT's attention-pooling head, used by contrastive Stage
II; SigLIP's head; Qwen-VL's own merger; ...: each tower's spec declares them) are always frozen: a trainable
parameter without gradients breaks DDP and wastes optimizer state.
"""

from torch import nn

from ..models.vision_tower_specs import vision_tower_spec
from ..parameters import is_peft_original
from .config import MODULES, ModulesConfig


# Attribute names of the pretraining models -> the config module they belong to.
MODULE_ALIASES: dict[str, str] = {
    "vision_model": "vision_tower", "lm_head": "language_model", "text_model": "text_tower", "decoder": "heads",
    "visual_projection": "heads", "text_projection": "heads", "logit_scale": "heads", "logit_bias": "heads",
}


def module_of(parameter_name: str) -> str:
    """`"model.language_model.layers.0.mlp.up_proj.weight"` -> `"language_model"`; `"vision_model.blocks.0..."`
    (a pretraining model) -> `"vision_tower"`."""
    parts = parameter_name.split(".")
    for module in MODULES:
        if module in parts:
            return module
    for part in parts:
        if part in MODULE_ALIASES:
            return MODULE_ALIASES[part]
    raise ValueError(f"parameter {parameter_name!r} belongs to none of {MODULES} (or {sorted(MODULE_ALIASES)})")


def unused_vision_modules(model: nn.Module) -> tuple[str, ...]:
    """Each module the model's training never runs: the VL model's, from the tower's spec; Stage I's pooling head
    (trained in Stage II); Stage II's bias under the softmax loss and the text tower's pooler when not pooled by it."""
    if model.config.model_type == "finevit_mim":
        return ("vision_model.head",)
    if model.config.model_type == "finevit_contrastive":
        unused = ("logit_bias",) if model.config.loss_type == "softmax" else ()
        if model.config.text_pooling != "auto":  # the text tower's own pooler (SigLIP's head, BERT's) goes unused
            unused += ("text_model.head", "text_model.pooler")
        return unused
    vision_config = model.config.vision_config
    return tuple(f"vision_tower.{name}" for name in vision_tower_spec(vision_config.model_type).unused_modules)


def unused_in_vl(parameter_name: str, unused_modules: tuple[str, ...]) -> bool:
    """True for parameters the FineViT-VL forward never touches (see `unused_vision_modules`)."""
    return any(f".{prefix}." in f".{parameter_name}." for prefix in unused_modules)


def apply_freeze(model: nn.Module, modules: ModulesConfig | None = None) -> None:
    """Set `requires_grad` of every parameter from its module's `train` flag (`None`: keep it, e.g. after PEFT
    wrapping); parameters unused by the VL forward are frozen either way."""
    unused = unused_vision_modules(model)
    for name, parameter in model.named_parameters():
        if unused_in_vl(name, unused):
            parameter.requires_grad_(False)
        elif modules is not None:
            parameter.requires_grad_(getattr(modules, module_of(name)).train)


def trainable_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """`{module: {"trainable": n, "total": n}}` in parameters (4-bit weights count their packed storage), for the
    modules the model has."""
    report = {module: {"trainable": 0, "total": 0} for module in MODULES}
    for name, parameter in model.named_parameters():
        if is_peft_original(name):
            continue
        entry = report[module_of(name)]
        entry["total"] += parameter.numel()
        entry["trainable"] += parameter.numel() if parameter.requires_grad else 0
    return {module: counts for module, counts in report.items() if counts["total"]}


def format_report(report: dict[str, dict[str, int]]) -> str:
    lines = []
    for module, counts in report.items():
        state = "frozen" if counts["trainable"] == 0 else ("trained" if counts["trainable"] == counts["total"] else "partly trained")
        lines.append(f"  {module:<22} {state:<15} {counts['trainable']:>13,} / {counts['total']:,} parameters")
    return "\n".join(lines)


__all__ = ["apply_freeze", "format_report", "module_of", "trainable_report", "unused_in_vl"]
