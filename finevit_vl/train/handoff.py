"""The hand-off between stages (`model.init_from`): I -> II -> III -> SFT, each starting from the previous output.

Every stage's model names its parts its own way (`vision_model.*` in Stage I and II, `model.vision_tower.*` in the
VL model, a bare FineViT encoder folder has no prefix). Both sides are mapped to the same part names (`encoder`,
`mim_decoder`, `text_tower`, `contrastive_head`, `projector`, `llm`, `lm_head`), and every tensor of the new model
whose part-name exists in the previous stage's weights is carried over:

* equal shapes: copied;
* the text tower's learned position table when the text context grows (Stage II's 64 -> 256 tokens): linearly
  interpolated to the new length ("resized");
* any other shape difference: kept at its new initialisation, and listed as such.

What the previous stage had and the new model does not (Stage I's decoder, Stage II's text tower and projections
when Stage III starts) is "dropped"; what the new model has and the previous stage did not (Stage III's projector and
LLM) is "initialised". The report is logged and written to `run_dir/handoff.json`.
"""

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


logger = logging.getLogger(__name__)

# model_type -> (prefix in that model's state dict, part name); the first matching prefix wins, "" matches all.
PART_PREFIXES: dict[str, list[tuple[str, str]]] = {
    "finevit": [("", "encoder.")],
    "finevit_mim": [("vision_model.", "encoder."), ("decoder.", "mim_decoder.")],
    "finevit_contrastive": [("vision_model.", "encoder."), ("text_model.", "text_tower."), ("", "contrastive_head.")],
    "finevit_vl": [("model.vision_tower.", "encoder."), ("model.multi_modal_projector.", "projector."),
                   ("model.language_model.", "llm."), ("lm_head.", "lm_head.")],
}
RESIZABLE = ("position_embedding.weight",)  # learned absolute position tables, interpolated along their first axis


@dataclass
class HandoffReport:
    source: str
    source_type: str
    carried: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # "name: (old) -> (new)"
    dropped: list[str] = field(default_factory=list)  # in the source, not in the new model
    initialised: list[str] = field(default_factory=list)  # in the new model, not carried

    def summary(self) -> str:
        def parts(names: list[str]) -> str:
            counts: dict[str, int] = {}
            for name in names:
                counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + 1
            return ", ".join(f"{part} ({n})" for part, n in counts.items()) or "none"

        return (f"hand-off from {self.source} ({self.source_type}): carried {len(self.carried)} tensors "
                f"[{parts(self.carried)}], resized {len(self.resized)} {self.resized or ''}, dropped "
                f"{len(self.dropped)} [{parts(self.dropped)}], newly initialised {len(self.initialised)} "
                f"[{parts(self.initialised)}]")


def part_name(model_type: str, key: str) -> str | None:
    for prefix, part in PART_PREFIXES.get(model_type, []):
        if key.startswith(prefix):
            return part + key[len(prefix):]
    return None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.exists() else [
        folder / "model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.exists():
            raise ValueError(f"model.init_from {folder}: {file.name} is missing (is it an exported model folder?)")
        state.update(load_file(str(file)))
    return state


def _resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A `(old_rows, dim)` table linearly interpolated to `(rows, dim)` (Long-CLIP-style stretching of positions)."""
    resized = F.interpolate(tensor.float().T[None], size=rows, mode="linear", align_corners=True)[0].T
    return resized.to(tensor.dtype)


def carry_weights(model: nn.Module, source: str | Path) -> HandoffReport:
    """Copy into `model` what the stage output at `source` shares with it; returns what happened to each tensor."""
    folder = Path(source)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ValueError(f"model.init_from {folder} is not a model folder (no config.json)")
    source_type = json.loads(config_file.read_text()).get("model_type")
    target_type = model.config.model_type
    for model_type, where in ((source_type, folder), (target_type, "the model being trained")):
        if model_type not in PART_PREFIXES:
            raise ValueError(f"model.init_from: {where} is a {model_type!r} model; the hand-off knows "
                             f"{sorted(PART_PREFIXES)}")
    previous = {}
    for key, tensor in read_weights(folder).items():
        if (name := part_name(source_type, key)) is not None:
            previous[name] = (key, tensor)
    report = HandoffReport(str(folder), source_type)
    own = model.state_dict()
    updates: dict[str, torch.Tensor] = {}
    used = set()
    for key, tensor in own.items():
        name = part_name(target_type, key)
        if name is None or name not in previous:
            report.initialised.append(name or key)
            continue
        used.add(name)
        old = previous[name][1]
        if old.shape == tensor.shape:
            updates[key] = old.to(tensor.dtype)
            report.carried.append(name)
        elif key.endswith(RESIZABLE) and old.ndim == 2 and old.shape[1] == tensor.shape[1]:
            updates[key] = _resize_rows(old, tensor.shape[0]).to(tensor.dtype)
            report.resized.append(f"{name}: {tuple(old.shape)} -> {tuple(tensor.shape)}")
        else:
            report.initialised.append(f"{name} (shape {tuple(old.shape)} there, {tuple(tensor.shape)} here)")
    report.dropped = sorted(set(previous) - used)
    model.load_state_dict(updates, strict=False)
    if not report.carried and not report.resized:
        raise ValueError(f"model.init_from {folder}: no tensor matches the model being trained ({report.summary()})")
    return report


def write_report(report: HandoffReport, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "handoff.json"
    path.write_text(json.dumps(asdict(report), indent=1))
    return path


__all__ = ["PART_PREFIXES", "HandoffReport", "carry_weights", "part_name", "write_report"]
