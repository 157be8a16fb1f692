"""Model cards for FineViT-VL checkpoints, as `huggingface_hub.ModelCard`: metadata (`ModelCardData`), architecture,
usage, training summary and a results section between `<!-- results:start/end -->`.

`write_model_card` writes a checkpoint's card (the trainer's export and the demo call it); `fill_model_card` puts
lmms-eval scores into a card (`finevit-vl eval --model-card`, the demo): the markdown table in the results section
and, for a full run, the `model-index` metadata the Hub displays. `update_zeroshot_section` keeps one subsection per
data set in the card's "Zero-shot evaluation" section (`finevit-vl eval-zeroshot --update-card`). A card travels with
its checkpoint, so it names no local path: the usage code loads from `USAGE_PATH`, and absolute paths in the given
texts are shortened.
"""

import json
import math
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .encoders import describe_encoder
from .parameters import count_parameters


CARD_START, CARD_END = "<!-- results:start -->", "<!-- results:end -->"
ZEROSHOT_TITLE = "Zero-shot evaluation"
USAGE_PATH = "path/to/checkpoint"  # where the reader put the folder (or its Hub id)
TAGS = ["finevit-vl", "vision-language", "native-resolution"]
TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ description }}

## Architecture

| part | configuration |
|---|---|
| vision encoder | {{ encoder }}{{ budget }} |
| projector | {{ merge }}x{{ merge }} patch merge + 2-layer MLP{{ position_note }} |
| language model | {{ text.model_type }} ({{ text.num_hidden_layers }} layers, width {{ text.hidden_size }}, vocabulary {{ text.vocab_size }}) |
| parameters | {{ n_params }} |

## Usage

```python
import finevit_vl  # or pass trust_remote_code=True without the package
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{{ path }}")
processor = AutoProcessor.from_pretrained("{{ path }}")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles are there in the image?\\nAnswer with a single number."}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[image], text=[text], return_tensors="pt")
answer = processor.batch_decode(model.generate(**inputs, max_new_tokens=24)[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
```

Boxes are written as integers 0-1000 relative to the image size, `[x1, y1, x2, y2]`.

## Training

{{ training }}

## Results

{{ results_start }}
(not evaluated yet: run `finevit-vl eval --model {{ path }} --model-card {{ path }}/README.md`)
{{ results_end }}
"""
# An absolute POSIX path of two parts or more, its last two captured (not a URL's `//`, nor `a/b` or `1/2`).
_PART = r"[^\s/'\"`,;()\[\]{}]+"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w:/.~-])/(?:{_PART}/)*({_PART}/{_PART})")


def without_local_paths(text: str) -> str:
    """`/home/me/runs/x/data/stage3/train.jsonl` -> `…/stage3/train.jsonl`: the informative end of a path, none of
    the machine it was written on."""
    return _ABSOLUTE_PATH.sub(r"…/\1", text)


def _pixel_budget(model_dir: Path) -> str:
    """The per-image budget of the image processor saved next to the weights, as card text ("" for fixed-size)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (path := model_dir / name).exists():
            config = json.loads(path.read_text())
            config = config.get("image_processor", config)
            if pixels := config.get("max_pixels") or (config.get("size") or {}).get("longest_edge"):
                return f", images up to {pixels} pixels"
            if patches := config.get("max_num_patches"):
                return f", images up to {patches} patches"
    return ""


def render_model_card(model, model_dir: str | Path, name: str, description: str, training: str) -> ModelCard:
    """The card of `model`, saved (or to be saved) in `model_dir`; results not filled in yet."""
    config = model.config
    frequencies = config.projector_position_frequencies
    return ModelCard.from_template(
        ModelCardData(library_name="transformers", pipeline_tag="image-text-to-text", license="apache-2.0", tags=TAGS,
                      model_name=name),
        template_str=TEMPLATE,
        name=name,
        description=without_local_paths(description),
        encoder=describe_encoder(config.vision_config),
        text=config.text_config,
        budget=_pixel_budget(Path(model_dir)),
        merge=config.spatial_merge_size,
        position_note=f" + normalised-position features ({frequencies} frequencies)" if frequencies else "",
        n_params=f"{count_parameters(model) / 1e6:.2f}M",
        path=USAGE_PATH,
        training=without_local_paths(training),
        results_start=CARD_START,
        results_end=CARD_END,
    )


def write_model_card(model, model_dir: str | Path, name: str, description: str, training: str) -> Path:
    """Write `model_dir/README.md`; returns its path."""
    path = Path(model_dir) / "README.md"
    render_model_card(model, model_dir, name, description, training).save(path)
    return path


def _format(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if abs(value) > 1 else f"{value:.4f}"


def results_markdown(scores: dict[str, dict[str, float]], limit: float | None = None) -> str:
    """`{task: {metric: value}}` as a markdown table (the card's results section, `results.md` of an eval run)."""
    lines = ["| Task | Metric | Value |", "|---|---|---:|"]
    lines += [f"| {task} | {metric} | {_format(value)} |" for task, metrics in scores.items() for metric, value in metrics.items()]
    if limit is not None:
        lines += ["", f"_Limited run (`limit={limit}` documents per task): not comparable to published numbers._"]
    return "\n".join(lines) + "\n"


def _eval_results(scores: dict[str, dict[str, float]]) -> list[EvalResult]:
    return [EvalResult(task_type="image-text-to-text", dataset_type=task, dataset_name=task, metric_type=metric,
                       metric_value=value)
            for task, metrics in scores.items() for metric, value in metrics.items()
            if value is not None and not math.isnan(value)]


def fill_model_card(card_path: str | Path, scores: dict[str, dict[str, float]], limit: float | None = None) -> None:
    """Put `scores` into the card at `card_path`: the results section (between the markers, appended if missing) and,
    unless `limit` made it a partial run, the `model-index` metadata. A missing card is created."""
    path = Path(card_path)
    card = ModelCard(path.read_text()) if path.exists() else ModelCard("")
    section = f"{CARD_START}\n{results_markdown(scores, limit).rstrip()}\n{CARD_END}"
    text = card.text
    start, end = text.find(CARD_START), text.find(CARD_END)
    if start != -1 and end > start:
        card.text = text[:start] + section + text[end + len(CARD_END) :]
    else:
        card.text = (text.rstrip() + "\n\n## Evaluation\n\n" if text.strip() else "## Evaluation\n\n") + section + "\n"
    if limit is None:
        # The Hub needs a model name for `model-index`; a card not written here is named after its folder.
        card.data.model_name = card.data.model_name or path.resolve().parent.name
        card.data.eval_results = _eval_results(scores)
    # A card without metadata is written back without (huggingface_hub would add an empty `{}` block).
    path.write_text(card.content if card.data.to_dict() else card.text)


def _headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """`(line index, level, title)` of each markdown heading, not counting the YAML metadata or code blocks."""
    headings, fenced, index = [], False, 0
    if lines and lines[0].strip() == "---":  # metadata: up to the closing `---`
        index = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), len(lines)) + 1
    for i in range(index, len(lines)):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) +(.*?)\s*$", line)):
            headings.append((i, len(match.group(1)), match.group(2)))
    return headings


def update_zeroshot_section(model_dir: str | Path, name: str, markdown: str) -> Path:
    """Put `markdown` under `### {name}` in the "## Zero-shot evaluation" section of `model_dir/README.md`: an earlier
    subsection of that name is replaced, others are kept, and the section is appended when the card has none. The
    rest of the card is left as it is; a missing card is created. Returns the card's path."""
    path = Path(model_dir) / "README.md"
    lines = path.read_text().splitlines() if path.exists() else []
    headings = _headings(lines)
    subsection = [f"### {name}", "", *without_local_paths(markdown).strip().splitlines(), ""]
    start = next((i for i, level, title in headings if level == 2 and title == ZEROSHOT_TITLE), None)
    if start is None:
        lines += ([""] if lines and lines[-1].strip() else []) + [f"## {ZEROSHOT_TITLE}", "", *subsection]
    else:
        end = next((i for i, level, _ in headings if i > start and level <= 2), len(lines))
        old = next((i for i, level, title in headings if start < i < end and level == 3 and title == name), None)
        if old is not None:
            old_end = next((i for i, level, _ in headings if i > old and level <= 3), end)
            lines[old:old_end] = subsection
        else:
            last = end
            while last > start + 1 and not lines[last - 1].strip():  # after the section's last text, one blank line
                last -= 1
            lines[last:end] = ["", *subsection]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return path


__all__ = ["CARD_END", "CARD_START", "USAGE_PATH", "ZEROSHOT_TITLE", "fill_model_card", "render_model_card",
           "results_markdown", "update_zeroshot_section", "without_local_paths", "write_model_card"]
