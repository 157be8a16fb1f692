"""``finevit-vl eval-zeroshot``: zero-shot classification and image-text retrieval of a contrastive model.

    finevit-vl eval-zeroshot MODEL_DIR --data DIR [--task classification|retrieval|auto] [--out OUT]
        [--batch-size N] [--text-max-length N] [--padding max_length|longest] [--device D] [--update-card]

The model is anything with the transformers CLIP / SigLIP interface (``AutoModel`` + ``AutoProcessor``,
``get_image_features`` / ``get_text_features``), our ``finevit_contrastive`` included. The protocol is
CLIP_benchmark's: classification top-1, top-5 and mean per-class recall against class prototypes (the mean of the
normalised template embeddings, renormalised); retrieval recall@k both ways, a query being a hit when any of its
positives is in the top k. Every number is a percentage (0-100) and comes with the chance level of a random ranking.

``DIR`` holds ``manifest.jsonl`` (or ``manifest.json``, a JSON array, or ``manifest.csv``), image paths relative to
``DIR``:

* retrieval: ``{"image": "images/a.png", "captions": ["...", "..."]}`` or ``"caption": "..."``; CSV ``image,caption``,
  one row per caption. Rows naming the same image are one image with all their captions.
* classification: ``{"image": "...", "label": "red circle"}``, the label a class name or an integer index into the
  class names; CSV ``image,label`` (a label of digits that is not itself a class name is an index). Optional
  ``classnames.json`` (a list; default: the sorted distinct labels) and ``templates.json`` (strings with ``{}``;
  default `DEFAULT_TEMPLATES`).

Writes ``OUT/results.json`` and ``OUT/results.md`` (default ``OUT``: ``MODEL_DIR/zeroshot/<DIR name>``) and, with
``--update-card``, the "Zero-shot evaluation" section of ``MODEL_DIR/README.md``
(`finevit_vl.model_card.update_zeroshot_section`). Results state the text context, the number of truncated texts, the
padding and the resize mode, since numbers are not comparable without them.
"""

import argparse
import csv
import datetime
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import report_user_error
from ..model_card import update_zeroshot_section


if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.jsonl", "manifest.json", "manifest.csv")
TASKS = ("classification", "retrieval")
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a rendering of a {}.",
)
RETRIEVAL_KS = (1, 5, 10)
SANE_MAX_LENGTH = 100_000  # tokenizers without a context say 1e30


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class RetrievalData:
    """Images and their captions; ``text_to_image[j]`` is the index of caption ``j``'s image."""

    images: list[Path]
    image_locations: list[str]  # "manifest.jsonl line 3": where each image was named, for decoding errors
    captions: list[str]
    text_to_image: list[int]
    task: str = field(default="retrieval", init=False)


@dataclass
class ClassificationData:
    """Images, their class indices into ``classnames``, and the prompt templates (each with one ``{}``)."""

    images: list[Path]
    image_locations: list[str]
    labels: list[int]
    classnames: list[str]
    templates: list[str]
    task: str = field(default="classification", init=False)


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """The rows of a manifest as ``(location, row)``, location like ``".../manifest.jsonl line 3"``."""
    rows = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            rows.append((where, row))
    elif path.suffix == ".json":
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: must be a JSON array of rows, got {type(items).__name__}")
        rows = [(f"{path} item {number}", item) for number, item in enumerate(items, start=1)]
    else:
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            if not reader.fieldnames or "image" not in reader.fieldnames or not {"caption", "label"} & set(reader.fieldnames):
                raise ValueError(f"{path} line 1: the header must have an `image` column and a `caption` or `label` "
                                 f"column, got {reader.fieldnames}")
            for row in reader:
                # Empty cells are absent keys, as in JSON; line_num is the line just read (the header is line 1).
                rows.append((f"{path} line {reader.line_num}", {k: v for k, v in row.items() if k and v not in (None, "")}))
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be an object with `image` and `label` or `caption(s)`, got {row!r}")
    if not rows:
        raise ValueError(f"{path}: empty manifest (no rows)")
    return rows


def _find_manifest(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise ValueError(f"data folder not found: {data_dir}")
    for name in MANIFEST_NAMES:
        if (path := data_dir / name).is_file():
            return path
    raise ValueError(f"{data_dir}: no manifest found (expected one of {', '.join(MANIFEST_NAMES)})")


def _row_task(where: str, row: dict) -> str:
    if "label" in row:
        return "classification"
    if "caption" in row or "captions" in row:
        return "retrieval"
    raise ValueError(f"{where}: row has neither `label` (classification) nor `caption`/`captions` (retrieval); "
                     f"its keys are {sorted(row)}")


def _image_path(data_dir: Path, where: str, row: dict) -> Path:
    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: missing `image` (a path relative to {data_dir})")
    path = data_dir / image
    if not path.is_file():
        raise ValueError(f"{where}: image file not found: {path}")
    return path


def _json_strings(path: Path, what: str) -> list[str] | None:
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{path}: must be a non-empty JSON list of {what}")
    return values


def load_zeroshot_data(data_dir: str | Path, task: str = "auto") -> RetrievalData | ClassificationData:
    """Read the manifest of ``data_dir`` (see the module docstring); `ValueError` naming the file and line otherwise.

    ``task="auto"`` takes the task of the first row (``label``: classification, ``caption(s)``: retrieval); every row
    must then have that task's key."""
    if task not in (*TASKS, "auto"):
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)} or auto")
    data_dir = Path(data_dir)
    manifest = _find_manifest(data_dir)
    rows = _read_rows(manifest)
    task = _row_task(*rows[0]) if task == "auto" else task
    key = "`label`" if task == "classification" else "`caption` or `captions`"
    for where, row in rows:
        _row_task(where, row)  # neither key: the same message whatever the task
        if not ("label" in row if task == "classification" else "caption" in row or "captions" in row):
            raise ValueError(f"{where}: a {task} row needs {key}; its keys are {sorted(row)}")
    if task == "retrieval":
        return _retrieval_data(data_dir, rows)
    return _classification_data(data_dir, rows)


def _retrieval_data(data_dir: Path, rows: list[tuple[str, dict]]) -> RetrievalData:
    index: dict[Path, int] = {}
    images, locations, captions, text_to_image = [], [], [], []
    for where, row in rows:
        path = _image_path(data_dir, where, row)
        texts = row["captions"] if "captions" in row else [row["caption"]]
        if isinstance(texts, str) or not isinstance(texts, list) or not texts:
            raise ValueError(f"{where}: `captions` must be a non-empty list of strings")
        if not all(isinstance(text, str) and text.strip() for text in texts):
            raise ValueError(f"{where}: every caption must be a non-empty string, got {texts!r}")
        if path not in index:  # rows naming the same image add captions to it
            index[path] = len(images)
            images.append(path)
            locations.append(f"{where} image {row['image']!r}")
        captions += texts
        text_to_image += [index[path]] * len(texts)
    return RetrievalData(images, locations, captions, text_to_image)


def _classification_data(data_dir: Path, rows: list[tuple[str, dict]]) -> ClassificationData:
    classnames_path, templates_path = data_dir / "classnames.json", data_dir / "templates.json"
    classnames = _json_strings(classnames_path, "class names")
    templates = _json_strings(templates_path, "templates") or list(DEFAULT_TEMPLATES)
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"{templates_path}: template {template!r} must contain `{{}}` exactly once")
    if classnames is None:
        names = {row["label"] for where, row in rows if isinstance(row["label"], str)}
        classnames = sorted(names)
    position = {name: index for index, name in enumerate(classnames)}
    images, locations, labels = [], [], []
    for where, row in rows:
        label = row["label"]
        if isinstance(label, str) and label not in position and label.isdigit():
            label = int(label)  # a CSV index
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError(f"{where}: `label` must be a class name or an integer index, got {label!r}")
        if isinstance(label, int):
            if not classnames_path.is_file():
                raise ValueError(f"{where}: integer label {label} needs {classnames_path} (the list it indexes)")
            if not 0 <= label < len(classnames):
                raise ValueError(f"{where}: label index {label} is out of range for the {len(classnames)} class "
                                 f"names of {classnames_path}")
        elif label not in position:
            raise ValueError(f"{where}: label {label!r} is not in {classnames_path}")
        images.append(_image_path(data_dir, where, row))
        locations.append(f"{where} image {row['image']!r}")
        labels.append(label if isinstance(label, int) else position[label])
    return ClassificationData(images, locations, labels, classnames, templates)


# ------------------------------------------------------------------------------------------------------- metrics


def _normalise(embeds):
    import torch

    return torch.nn.functional.normalize(embeds.float(), dim=-1)


def class_prototypes(template_embeds):
    """``(num_classes, num_templates, D)`` template embeddings -> ``(num_classes, D)``: the mean of the normalised
    embeddings of each class, renormalised (CLIP's zero-shot classifier)."""
    return _normalise(_normalise(template_embeds).mean(dim=1))


def classification_metrics(image_embeds, labels: Sequence[int], class_embeds) -> dict[str, float]:
    """Top-1, top-5 (top-min(5, C)) accuracy and mean per-class recall (balanced accuracy over the classes that have
    images, as CLIP_benchmark's sklearn call), in percent. ``image_embeds`` ``(N, D)``, ``class_embeds`` ``(C, D)``,
    both normalised; ``labels`` the class index of each image."""
    import torch

    labels = torch.as_tensor(list(labels), dtype=torch.long)
    num_classes = class_embeds.shape[0]
    logits = image_embeds.float() @ class_embeds.float().T  # (N, C)
    ranked = logits.topk(min(5, num_classes), dim=1).indices  # (N, k)
    hits1 = ranked[:, 0] == labels
    recalls = [hits1[labels == c].double().mean() for c in labels.unique()]
    return {
        "top1": 100 * hits1.double().mean().item(),
        "top5": 100 * (ranked == labels[:, None]).any(dim=1).double().mean().item(),
        "mean_per_class_recall": 100 * torch.stack(recalls).mean().item(),
        "num_images": len(labels),
        "num_classes": num_classes,
    }


def classification_chance(num_classes: int) -> dict[str, float]:
    """The expected metrics of a random classifier, in percent."""
    return {"top1": 100 / num_classes, "top5": 100 * min(5, num_classes) / num_classes,
            "mean_per_class_recall": 100 / num_classes}


def retrieval_metrics(image_embeds, text_embeds, text_to_image: Sequence[int], ks: Sequence[int] = RETRIEVAL_KS):
    """Recall@k in percent, both directions. Image -> text: an image is a hit at k when any of its captions is among
    the k texts nearest to it; text -> image: a caption is a hit when its image is among its k nearest images.
    ``image_embeds`` ``(N, D)``, ``text_embeds`` ``(T, D)``, normalised; ``text_to_image[j]`` is caption j's image."""
    import torch

    text_to_image = torch.as_tensor(list(text_to_image), dtype=torch.long)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    scores = text_embeds.float() @ image_embeds.float().T  # (T, N)
    positive = torch.zeros(num_texts, num_images, dtype=torch.bool)
    positive[torch.arange(num_texts), text_to_image] = True
    metrics = {}
    for k in ks:
        top_texts = scores.T.topk(min(k, num_texts), dim=1).indices  # (N, k): texts nearest each image
        hits = positive.T.gather(1, top_texts).any(dim=1)
        metrics[f"image_to_text_R@{k}"] = 100 * hits.double().mean().item()
    for k in ks:
        top_images = scores.topk(min(k, num_images), dim=1).indices  # (T, k)
        hits = (top_images == text_to_image[:, None]).any(dim=1)
        metrics[f"text_to_image_R@{k}"] = 100 * hits.double().mean().item()
    return {**metrics, "num_images": num_images, "num_texts": num_texts}


def retrieval_chance(text_to_image: Sequence[int], num_images: int, ks: Sequence[int] = RETRIEVAL_KS):
    """The expected recall@k of a random ranking, in percent: text -> image ``k / N``; image -> text, for an image with
    ``c`` of the ``T`` captions, ``1 - C(T - c, k) / C(T, k)`` (some positive among k random texts), averaged."""
    num_texts = len(text_to_image)
    counts = [0] * num_images
    for image in text_to_image:
        counts[image] += 1
    chance = {}
    for k in ks:
        k_texts = min(k, num_texts)
        misses = [math.comb(num_texts - c, k_texts) / math.comb(num_texts, k_texts) for c in counts]
        chance[f"image_to_text_R@{k}"] = 100 * (1 - sum(misses) / num_images)
    for k in ks:
        chance[f"text_to_image_R@{k}"] = 100 * min(k, num_images) / num_images
    return chance


# --------------------------------------------------------------------------------------------------------- model


def describe_resize(image_processor) -> str:
    """How the image processor sizes images, as results text: native resolution or resize + crop."""
    def get(value, key):
        return value.get(key) if isinstance(value, dict) else getattr(value, key, None)

    size = getattr(image_processor, "size", None)
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    if getattr(image_processor, "max_num_patches", None):  # SigLIP2 NaFlex
        return f"native (aspect kept, {patch}px patches, up to {image_processor.max_num_patches} patches)"
    if patch and merge and not getattr(image_processor, "do_center_crop", False):  # FineViT, Qwen2-VL
        low = getattr(image_processor, "min_pixels", None) or get(size, "shortest_edge")
        high = getattr(image_processor, "max_pixels", None) or get(size, "longest_edge")
        return f"native (aspect kept, multiples of {patch * merge}, pixel budget {low}-{high})"
    if getattr(image_processor, "do_center_crop", False):
        crop = getattr(image_processor, "crop_size", None)
        crop_text = f"{get(crop, 'height')}x{get(crop, 'width')}" if get(crop, "height") else str(crop)
        if get(size, "shortest_edge"):
            return f"resize shortest side {get(size, 'shortest_edge')} + center crop {crop_text}"
        return f"resize to {get(size, 'height')}x{get(size, 'width')} + center crop {crop_text}"
    if get(size, "height"):
        return f"resize to {get(size, 'height')}x{get(size, 'width')} (aspect not kept)"
    if get(size, "shortest_edge"):
        return f"resize shortest side {get(size, 'shortest_edge')}, no crop"
    return f"as {type(image_processor).__name__} does (size={size})"


def _features(output):
    """``get_*_features`` returns a tensor, or (transformers 5.x CLIP / SigLIP) an output whose ``pooler_output`` is
    the projected embedding."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ValueError(f"get_*_features returned {type(output).__name__} without `pooler_output`")
    return pooled


class ZeroShotModel:
    """A contrastive model and its processor as two encoders of L2-normalised float32 embeddings.

    Texts are tokenised to ``text_max_length`` tokens (default: the processor's ``text_max_length`` (FineViT's), else
    the tokenizer's ``model_max_length`` when it states one, else the text config's ``max_position_embeddings``); ``truncated_texts`` counts the texts that were
    longer, out of ``num_texts``. ``padding`` is the tokenizer's padding mode (SigLIP's text tower was trained with
    ``"max_length"``)."""

    def __init__(self, model, processor, text_max_length: int | None = None, padding: str = "longest",
                 batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be `longest` or `max_length`, got {padding!r}")
        self.model = model.eval()
        self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        self.text_max_length = text_max_length or self._default_text_max_length(processor)
        config = self.model.config
        positions = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        if positions and self.text_max_length > positions:
            raise ValueError(f"--text-max-length {self.text_max_length} is longer than the text tower's context "
                             f"({positions} positions)")
        self.padding, self.batch_size = padding, batch_size
        self.resize_mode = describe_resize(self.image_processor)
        self.truncated_texts = self.num_texts = 0
        if getattr(self.tokenizer, "pad_token", "") is None and getattr(self.tokenizer, "eos_token", None):
            self.tokenizer.pad_token = self.tokenizer.eos_token  # batching needs one; the mask hides it

    def _default_text_max_length(self, processor) -> int:
        # FineViT's contrastive processor states the context it was trained with; tokenizers without one say 1e30.
        for length in (getattr(processor, "text_max_length", None), getattr(self.tokenizer, "model_max_length", None)):
            if isinstance(length, int) and 0 < length < SANE_MAX_LENGTH:
                return length
        config = self.model.config
        length = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        if not length:
            raise ValueError("cannot tell the text context of this model: pass --text-max-length")
        return length

    @property
    def device(self):
        import torch

        return getattr(self.model, "device", None) or torch.device("cpu")

    def encode_images(self, images: list) -> "torch.Tensor":
        """PIL images -> ``(N, D)`` normalised float32, ``batch_size`` images per forward."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                inputs = self.image_processor(images=images[start : start + self.batch_size], return_tensors="pt")
                tensors = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                chunks.append(_normalise(_features(self.model.get_image_features(**tensors))).cpu())
        return torch.cat(chunks)

    def encode_texts(self, texts: list[str]) -> "torch.Tensor":
        """Texts -> ``(N, D)`` normalised float32; counts the texts cut at ``text_max_length``."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                lengths = [len(ids) for ids in self.tokenizer(batch, truncation=False, verbose=False)["input_ids"]]
                self.truncated_texts += sum(length > self.text_max_length for length in lengths)
                self.num_texts += len(batch)
                tokens = self.tokenizer(batch, padding=self.padding, truncation=True, max_length=self.text_max_length,
                                        return_tensors="pt")
                # SigLIP's tokenizer returns no attention_mask (its tower attends to the padding it was trained with).
                inputs = {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask") if k in tokens}
                chunks.append(_normalise(_features(self.model.get_text_features(**inputs))).cpu())
        return torch.cat(chunks)


def _open_images(paths: list[Path], locations: list[str]) -> list:
    from ..models.image_processing_finevit import to_rgb_image  # the one decoder of the package

    return [to_rgb_image(str(path), where) for path, where in zip(paths, locations)]


def encode_data_images(encoder: ZeroShotModel, data: RetrievalData | ClassificationData):
    """All images of ``data``, decoded ``batch_size`` at a time (never all in memory) -> ``(N, D)``."""
    import torch

    step = encoder.batch_size
    return torch.cat([encoder.encode_images(_open_images(data.images[i : i + step], data.image_locations[i : i + step]))
                      for i in range(0, len(data.images), step)])


def evaluate_zeroshot(encoder: ZeroShotModel, data: RetrievalData | ClassificationData) -> dict:
    """``{"metrics": ..., "chance": ...}`` of ``encoder`` on ``data`` (percentages; counts are plain numbers)."""
    image_embeds = encode_data_images(encoder, data)
    if isinstance(data, RetrievalData):
        text_embeds = encoder.encode_texts(data.captions)
        return {"metrics": retrieval_metrics(image_embeds, text_embeds, data.text_to_image),
                "chance": retrieval_chance(data.text_to_image, len(data.images))}
    prompts = [template.format(name) for name in data.classnames for template in data.templates]
    template_embeds = encoder.encode_texts(prompts).view(len(data.classnames), len(data.templates), -1)
    return {"metrics": classification_metrics(image_embeds, data.labels, class_prototypes(template_embeds)),
            "chance": classification_chance(len(data.classnames))}


# ------------------------------------------------------------------------------------------------------- reports


def results_markdown(result: dict) -> str:
    """A run's metrics beside their chance levels, and the settings that make them comparable (no heading)."""
    metrics, chance = result["metrics"], result["chance"]
    lines = ["| Metric | Value (%) | Chance (%) |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:.2f} | {chance[name]:.2f} |" for name, value in metrics.items() if name in chance]
    counts = ", ".join(f"{name.removeprefix('num_')}: {value}" for name, value in metrics.items() if name not in chance)
    lines += [
        "",
        f"- task: {result['task']} ({counts})",
        f"- text context: {result['text_max_length']} tokens ({result['truncated_texts']} of "
        + f"{result['num_encoded_texts']} texts truncated); padding: {result['padding']}",
        f"- image resize: {result['resize_mode']}",
    ]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "results.md").write_text(f"# Zero-shot {result['task']}: {name}\n\n{results_markdown(result)}")


def load_model(model_dir: Path, device: str | None = None):
    """``AutoModel`` + ``AutoProcessor`` from ``model_dir`` (FineViT classes are registered by importing the
    package), in eval mode on ``device`` (default: CUDA when available)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model folder (no config.json)")
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except OSError as error:
        raise ValueError(f"{model_dir}: cannot load its processor ({error})") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ValueError(f"{model_dir}: the processor ({type(processor).__name__}) needs an image processor and a tokenizer")
    model = AutoModel.from_pretrained(model_dir)
    for method in ("get_image_features", "get_text_features"):
        if not hasattr(model, method):
            raise ValueError(f"{model_dir}: {type(model).__name__} has no {method}; it is not a contrastive model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def run_zeroshot(model_dir: str | Path, data_dir: str | Path, task: str = "auto", out_dir: str | Path | None = None,
                 batch_size: int = 32, text_max_length: int | None = None, padding: str | None = None,
                 device: str | None = None, update_card: bool = False) -> dict:
    """Evaluate the model in ``model_dir`` on ``data_dir``, write the reports and return the ``results.json`` dict.

    ``padding=None``: ``"max_length"`` for SigLIP-family models, ``"longest"`` otherwise."""
    started = time.perf_counter()
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    data = load_zeroshot_data(data_dir, task)  # before the model: a bad manifest fails fast
    model, processor = load_model(model_dir, device)
    model_type = getattr(model.config, "model_type", "")
    padding = padding or ("max_length" if "siglip" in model_type else "longest")
    encoder = ZeroShotModel(model, processor, text_max_length, padding, batch_size)
    scores = evaluate_zeroshot(encoder, data)
    if encoder.truncated_texts:
        what = "captions" if data.task == "retrieval" else "class prompts"
        logger.warning(f"{encoder.truncated_texts} of {encoder.num_texts} {what} were longer than the text context "
                       f"{encoder.text_max_length} and were truncated")
    name = data_dir.resolve().name
    result = {
        "task": data.task,
        **scores,
        "units": "percent",
        "model_dir": str(model_dir.resolve()),
        "model_type": model_type,
        "data_dir": str(data_dir.resolve()),
        "num_items": len(data.images),
        "num_encoded_texts": encoder.num_texts,
        "text_max_length": encoder.text_max_length,
        "truncated_texts": encoder.truncated_texts,
        "padding": padding,
        "resize_mode": encoder.resize_mode,
        "batch_size": batch_size,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    result["elapsed_seconds"] = round(time.perf_counter() - started, 3)
    write_results(result, Path(out_dir) if out_dir else model_dir / "zeroshot" / name, name)
    if update_card:
        update_zeroshot_section(model_dir, name, results_markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finevit-vl eval-zeroshot",
        description="Zero-shot classification or image-text retrieval of a contrastive (CLIP / SigLIP / FineViT) model.",
    )
    parser.add_argument("model_dir", help="model folder loadable with AutoModel + AutoProcessor")
    parser.add_argument("--data", required=True, help="folder with manifest.jsonl|json|csv and the images (see the module docs)")
    parser.add_argument("--task", choices=(*TASKS, "auto"), default="auto",
                        help="auto: classification when rows have `label`, retrieval when they have `caption(s)`")
    parser.add_argument("--out", help="output folder for results.json and results.md (default: MODEL_DIR/zeroshot/<data name>)")
    parser.add_argument("--batch-size", type=int, default=32, help="images or texts per forward (default: 32)")
    parser.add_argument("--text-max-length", type=int,
                        help="text context in tokens; longer texts are truncated (default: the tokenizer's / the model's)")
    parser.add_argument("--padding", choices=("max_length", "longest"),
                        help="text padding (default: max_length for SigLIP models, longest otherwise)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--update-card", action="store_true",
                        help="add the results to the 'Zero-shot evaluation' section of MODEL_DIR/README.md")
    args = parser.parse_args(argv)
    try:
        result = run_zeroshot(
            args.model_dir, args.data, task=args.task, out_dir=args.out, batch_size=args.batch_size,
            text_max_length=args.text_max_length, padding=args.padding, device=args.device, update_card=args.update_card,
        )
    except ValueError as error:
        return report_user_error("eval-zeroshot", error)
    print(results_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
