"""`finevit-vl eval-zeroshot`: the metrics on embeddings with known outcomes, the chance levels against enumeration,
the manifest formats and their errors, the pipeline with a model whose embeddings match by construction, and the
command end to end on a tiny random CLIP."""

import itertools
import json
import logging

import pytest
import torch
from PIL import Image, ImageDraw

from finevit_vl.eval.zeroshot import (
    ClassificationData,
    RetrievalData,
    ZeroShotModel,
    class_prototypes,
    classification_metrics,
    evaluate_zeroshot,
    load_zeroshot_data,
    main,
    retrieval_chance,
    retrieval_metrics,
)
from finevit_vl.model_card import update_zeroshot_section


COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "cyan": (0, 255, 255)}


def _image(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, COLORS[color])
    ImageDraw.Draw(image).ellipse((4, 4, size[0] - 4, size[1] - 4), outline=COLORS[color])
    image.save(path)


def _folder(root, manifest_name, content, colors=("red", "green", "blue"), extra=None):
    """A data folder: images `images/<color>.png`, the manifest, and any `extra` {file name: JSON value}."""
    root.mkdir(parents=True, exist_ok=True)
    for color in colors:
        _image(root / "images" / f"{color}.png", color)
    text = content if isinstance(content, str) else "\n".join(json.dumps(row) for row in content) + "\n"
    (root / manifest_name).write_text(text)
    for name, value in (extra or {}).items():
        (root / name).write_text(json.dumps(value))
    return root


# ------------------------------------------------------------------------------------------------------- metrics


def test_classification_metrics_top1_top5_and_mean_per_class_recall():
    # Identity class embeddings: each image's row is its score for each of 6 classes.
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # class 0, right
        [0.8, 0.0, 0.1, 0.0, 0.0, 0.0],  # class 0, right
        [0.7, 0.0, 0.0, 0.1, 0.0, 0.0],  # class 0, right
        [0.6, 0.0, 0.0, 0.0, 0.1, 0.0],  # class 0, right
        [0.9, 0.5, 0.1, 0.2, 0.3, 0.4],  # class 1: second -> a top-5 hit only
        [0.9, 0.8, 0.0, 0.7, 0.6, 0.5],  # class 2: last of 6 -> missed at 5 too
    ])
    metrics = classification_metrics(scores, [0, 0, 0, 0, 1, 2], torch.eye(6))
    assert metrics["top1"] == pytest.approx(100 * 4 / 6)
    assert metrics["top5"] == pytest.approx(100 * 5 / 6)
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * (1 + 0 + 0) / 3)  # classes with images only
    assert (metrics["num_images"], metrics["num_classes"]) == (6, 6)
    # Fewer than 5 classes: top-5 is top-2, every label is found.
    assert classification_metrics(torch.tensor([[0.2, 0.8]]), [0], torch.eye(2))["top5"] == 100


def test_class_prototype_is_the_mean_of_normalised_template_embeddings():
    templates = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.0, 0.5]]])  # (classes, templates, D)
    prototypes = class_prototypes(templates)
    assert torch.allclose(prototypes, torch.tensor([[0.5**0.5, 0.5**0.5], [0.0, 1.0]]))  # not the raw mean [1, 0.5]


def test_retrieval_metrics_any_caption_counts_for_an_image():
    images = torch.eye(3)  # then a text's row is its score for each image
    texts = torch.tensor([
        [0.5, 0.9, 0.0],  # image 0's first caption: image 1 is nearer
        [0.8, 0.1, 0.0],  # image 0's second caption: nearest to image 0, and image 0's nearest text
        [0.0, 0.2, 0.7],  # image 1's caption: image 2 is nearer
        [0.1, 0.0, 0.6],  # image 2's caption
    ])
    metrics = retrieval_metrics(images, texts, [0, 0, 1, 2])
    # Image -> text top-1: image 0 -> text 1 (its own), image 1 -> text 0 (image 0's), image 2 -> text 2 (image 1's).
    assert metrics["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert metrics["image_to_text_R@5"] == metrics["image_to_text_R@10"] == 100
    assert metrics["text_to_image_R@1"] == pytest.approx(50)
    assert metrics["text_to_image_R@5"] == 100
    assert (metrics["num_images"], metrics["num_texts"]) == (3, 4)


def test_retrieval_chance_equals_enumerating_every_ranking():
    text_to_image = [0, 0, 1, 2, 2]  # 3 images with 2, 1 and 2 captions
    ks = (1, 2, 3, 10)
    chance = retrieval_chance(text_to_image, 3, ks)
    for k in ks:
        rankings = list(itertools.permutations(range(5)))
        hits = sum(any(text_to_image[t] == image for t in ranking[:k]) for ranking in rankings for image in range(3))
        assert chance[f"image_to_text_R@{k}"] == pytest.approx(100 * hits / (len(rankings) * 3))
        rankings = list(itertools.permutations(range(3)))
        hits = sum(image in ranking[:k] for ranking in rankings for image in text_to_image)
        assert chance[f"text_to_image_R@{k}"] == pytest.approx(100 * hits / (len(rankings) * 5))


# --------------------------------------------------------------------------------------------------------- data


def test_manifests_of_both_tasks_in_jsonl_json_and_csv(tmp_path):
    rows = [{"image": "images/red.png", "captions": ["a red disc", "something red"]},
            {"image": "images/green.png", "caption": "a green disc"},
            {"image": "images/red.png", "caption": "red again"}]  # the same image: one image, three captions
    for name, content in (
        ("manifest.jsonl", rows),
        ("manifest.json", json.dumps(rows)),
        ("manifest.csv", ("image,caption\nimages/red.png,a red disc\nimages/red.png,something red\n"
                          "images/green.png,a green disc\nimages/red.png,red again\n")),
    ):
        data = load_zeroshot_data(_folder(tmp_path / name, name, content))
        assert isinstance(data, RetrievalData)
        assert [p.name for p in data.images] == ["red.png", "green.png"]
        assert data.captions == ["a red disc", "something red", "a green disc", "red again"]
        assert data.text_to_image == [0, 0, 1, 0]

    rows = [{"image": "images/red.png", "label": "red"}, {"image": "images/blue.png", "label": "blue"}]
    data = load_zeroshot_data(_folder(tmp_path / "c1", "manifest.jsonl", rows))
    assert isinstance(data, ClassificationData)
    assert data.classnames == ["blue", "red"] and data.labels == [1, 0]  # default: sorted distinct labels
    assert "a photo of a {}." in data.templates
    extra = {"classnames.json": ["red", "green", "blue"], "templates.json": ["{} disc", "a {} thing"]}
    data = load_zeroshot_data(_folder(tmp_path / "c2", "manifest.json", json.dumps(
        [{"image": "images/blue.png", "label": 2}, {"image": "images/red.png", "label": "red"}]), extra=extra))
    assert data.labels == [2, 0] and data.classnames == ["red", "green", "blue"] and data.templates == ["{} disc", "a {} thing"]
    data = load_zeroshot_data(_folder(tmp_path / "c3", "manifest.csv",
                                      "image,label\nimages/green.png,1\nimages/red.png,red\n", extra=extra))
    assert data.labels == [1, 0]  # digits are an index into classnames.json
    # An explicit task wins over the first row's keys when rows have both.
    both = [{"image": "images/red.png", "label": "red", "caption": "a red disc"}]
    assert load_zeroshot_data(_folder(tmp_path / "b", "manifest.jsonl", both), task="retrieval").captions == ["a red disc"]


OK_ROW = {"image": "images/red.png", "caption": "red"}
LABEL_ROW = {"image": "images/red.png", "label": "red"}


@pytest.mark.parametrize(("manifest", "content", "extra", "expected"), [
    ("manifest.jsonl", [OK_ROW, {"image": "images/missing.png", "caption": "x"}], None,
     ["manifest.jsonl line 2", "image file not found", "missing.png"]),
    ("manifest.jsonl", [OK_ROW, OK_ROW, {"image": "images/red.png", "text": "x"}], None,
     ["manifest.jsonl line 3", "neither `label`", "['image', 'text']"]),
    ("manifest.jsonl", [{"image": "images/red.png", "label": 0}, {"image": "images/red.png", "label": 7}],
     {"classnames.json": ["red", "green"]}, ["manifest.jsonl line 2", "label index 7 is out of range", "classnames.json"]),
    ("manifest.jsonl", [LABEL_ROW, {"image": "images/red.png", "label": "purple"}], {"classnames.json": ["red"]},
     ["manifest.jsonl line 2", "'purple' is not in", "classnames.json"]),
    ("manifest.jsonl", [{"image": "images/red.png", "label": 1}], None, ["manifest.jsonl line 1", "needs", "classnames.json"]),
    ("manifest.jsonl", "\n\n", None, ["manifest.jsonl", "empty manifest"]),
    ("manifest.jsonl", json.dumps(OK_ROW) + "\n{not json\n", None, ["manifest.jsonl line 2", "not valid JSON"]),
    ("manifest.jsonl", [OK_ROW, LABEL_ROW], None, ["manifest.jsonl line 2", "a retrieval row needs `caption`"]),
    ("manifest.jsonl", [{"caption": "red"}], None, ["manifest.jsonl line 1", "missing `image`"]),
    ("manifest.jsonl", [{"image": "images/red.png", "captions": []}], None, ["line 1", "non-empty list"]),
    ("manifest.json", json.dumps([OK_ROW, {"image": "images/nope.png", "caption": "x"}]), None,
     ["manifest.json item 2", "image file not found"]),
    ("manifest.json", "[]", None, ["manifest.json", "empty manifest"]),
    ("manifest.csv", "image,caption\nimages/red.png,red\nimages/gone.png,x\n", None,
     ["manifest.csv line 3", "image file not found", "gone.png"]),
    ("manifest.csv", "image,label\nimages/red.png,red\nimages/red.png,5\n", {"classnames.json": ["red"]},
     ["manifest.csv line 3", "label index 5 is out of range"]),
    ("manifest.csv", "picture,caption\na.png,x\n", None, ["manifest.csv line 1", "`image` column"]),
    ("manifest.jsonl", [LABEL_ROW], {"templates.json": ["a photo"]}, ["templates.json", "exactly once"]),
])
@pytest.mark.reliability("zero-shot data", "bad manifest row / file", "ValueError naming the file and line")
def test_bad_manifests_name_the_file_and_line(tmp_path, manifest, content, extra, expected):
    folder = _folder(tmp_path / "data", manifest, content, extra=extra)
    with pytest.raises(ValueError) as error:
        load_zeroshot_data(folder)
    for text in expected:
        assert text in str(error.value)


def test_a_folder_without_a_manifest_is_named(tmp_path):
    with pytest.raises(ValueError, match="no manifest found"):
        load_zeroshot_data(tmp_path)
    with pytest.raises(ValueError, match="data folder not found"):
        load_zeroshot_data(tmp_path / "missing")


# ------------------------------------------------------------------------------------- pipeline with a fake model


class _ColorImageProcessor:
    """`pixel_values` (N, 3): each image's mean RGB, so the fake model sees the colour."""

    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.stack([torch.tensor(image.resize((1, 1)).getpixel((0, 0)), dtype=torch.float)
                                             for image in images]), "unused": [len(images)]}


class _ColorTokenizer:
    """`input_ids` (N, 3): the RGB of the colour word in each text; lengths grow with the text for the count."""

    model_max_length = 8
    pad_token = "<pad>"

    def __call__(self, texts, return_tensors=None, **kwargs):
        if return_tensors is None:
            return {"input_ids": [text.split() for text in texts]}
        rgb = [next(COLORS[word.strip(".,")] for word in text.split() if word.strip(".,") in COLORS) for text in texts]
        return {"input_ids": torch.tensor(rgb, dtype=torch.float), "attention_mask": torch.ones(len(texts), 3)}


class _ColorModel:
    """Image and text embeddings are both the RGB colour: each caption's nearest image is its own."""

    config = type("Config", (), {"model_type": "fake"})()

    def eval(self):
        return self

    def get_image_features(self, pixel_values):
        return pixel_values * 3.0  # any scale: the encoder normalises

    def get_text_features(self, input_ids, attention_mask):
        assert attention_mask.shape == input_ids.shape
        return input_ids


def _color_encoder(batch_size=2):
    processor = type("Processor", (), {"image_processor": _ColorImageProcessor(), "tokenizer": _ColorTokenizer()})()
    return ZeroShotModel(_ColorModel(), processor, batch_size=batch_size)


def test_matching_embeddings_give_perfect_scores_through_the_whole_pipeline(tmp_path):
    colors = list(COLORS)
    # Images out of colour order, split over batches of 2, captions grouped from separate rows.
    rows = [{"image": "images/cyan.png", "captions": ["a cyan disc", "cyan."]},
            {"image": "images/red.png", "caption": "the red one"},
            {"image": "images/yellow.png", "caption": "yellow"},
            {"image": "images/blue.png", "captions": ["a blue disc"]},
            {"image": "images/green.png", "caption": "green, round"},
            {"image": "images/red.png", "caption": "red again"}]
    data = load_zeroshot_data(_folder(tmp_path / "r", "manifest.jsonl", rows, colors=colors))
    encoder = _color_encoder()
    result = evaluate_zeroshot(encoder, data)
    assert result["metrics"]["image_to_text_R@1"] == result["metrics"]["text_to_image_R@1"] == 100
    assert (result["metrics"]["num_images"], result["metrics"]["num_texts"]) == (5, 7)
    assert result["chance"]["text_to_image_R@1"] == pytest.approx(20)
    assert encoder.truncated_texts == 0 and encoder.num_texts == 7 and encoder.text_max_length == 8

    rows = [{"image": f"images/{color}.png", "label": color} for color in reversed(colors)]
    extra = {"templates.json": ["a photo of a {} disc.", "{}", "a drawing in {}, of a circle, with a lot of words"]}
    data = load_zeroshot_data(_folder(tmp_path / "c", "manifest.jsonl", rows, colors=colors, extra=extra))
    encoder = _color_encoder(batch_size=3)
    result = evaluate_zeroshot(encoder, data)
    assert result["metrics"]["top1"] == result["metrics"]["mean_per_class_recall"] == 100
    assert result["chance"]["top1"] == pytest.approx(20)
    assert encoder.truncated_texts == 5  # the long template, once per class: 11 words > 8 "tokens"
    assert encoder.resize_mode.startswith("as _ColorImageProcessor")
    processor = type("Processor", (), {"image_processor": _ColorImageProcessor(), "tokenizer": _ColorTokenizer(),
                                       "text_max_length": 64})()
    assert ZeroShotModel(_ColorModel(), processor).text_max_length == 64  # the processor's trained context first


# ------------------------------------------------------------------------------------ end to end: tiny CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from finevit_vl.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot_data")
    colors = list(COLORS)
    classification = _folder(root / "colors", "manifest.jsonl",
                             [{"image": f"images/{c}.png", "label": f"{c} circle"} for c in colors], colors=colors)
    retrieval = _folder(root / "captions", "manifest.csv", "image,caption\n" + "".join(
        f"images/{c}.png,a {c} circle drawn on a {c} background\nimages/{c}.png,{c}\n" for c in colors), colors=colors)
    return classification, retrieval


def test_cli_classification_and_retrieval_on_a_tiny_clip(tiny_clip_dir, data_folders, tmp_path, caplog):
    classification, retrieval = data_folders
    assert main([str(tiny_clip_dir), "--data", str(classification), "--batch-size", "2"]) == 0
    out = tiny_clip_dir / "zeroshot" / "colors"
    result = json.loads((out / "results.json").read_text())
    assert {"task", "metrics", "chance", "units", "model_dir", "data_dir", "num_items", "text_max_length",
            "truncated_texts", "resize_mode", "padding", "elapsed_seconds"} <= set(result)
    assert result["task"] == "classification" and result["num_items"] == 5 and result["units"] == "percent"
    assert set(result["metrics"]) == {"top1", "top5", "mean_per_class_recall", "num_images", "num_classes"}
    assert all(0 <= result["metrics"][k] <= 100 for k in result["chance"])
    assert result["metrics"]["top5"] == 100  # 5 classes
    assert result["text_max_length"] == 32  # the tokenizer states no context: the text config's positions
    assert result["padding"] == "longest" and result["truncated_texts"] == 0
    assert result["resize_mode"] == "resize shortest side 32 + center crop 32x32"
    assert "| top1 |" in (out / "results.md").read_text()

    with caplog.at_level(logging.WARNING, logger="finevit_vl.eval.zeroshot"):
        code = main([str(tiny_clip_dir), "--data", str(retrieval), "--task", "retrieval", "--out", str(tmp_path / "r"),
                     "--text-max-length", "4", "--padding", "max_length"])
    assert code == 0
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    assert result["task"] == "retrieval" and result["num_items"] == 5 and result["num_encoded_texts"] == 10
    assert set(result["metrics"]) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} | {
        "num_images", "num_texts"}
    assert all(0 <= result["metrics"][k] <= 100 for k in result["chance"])
    assert result["metrics"]["text_to_image_R@5"] == result["metrics"]["image_to_text_R@10"] == 100
    assert result["chance"]["text_to_image_R@1"] == pytest.approx(20)
    assert result["truncated_texts"] == 5 and result["text_max_length"] == 4 and result["padding"] == "max_length"
    assert "5 of 10 captions were longer than the text context 4 and were truncated" in caplog.text


def test_cli_update_card_keeps_one_subsection_per_data_folder(tiny_clip_dir, data_folders, tmp_path):
    classification, retrieval = data_folders
    card = tiny_clip_dir / "README.md"
    head = "---\nlicense: apache-2.0\n---\n\n# Tiny CLIP\n\nIntro.\n\n```python\n## not a heading\n```\n"
    tail = "\n## Training\n\nSome text.\n"
    card.write_text(head + tail)
    out = ["--out", str(tmp_path / "out")]
    for folder in (classification, retrieval, classification):  # the third run replaces the first one's subsection
        assert main([str(tiny_clip_dir), "--data", str(folder), "--update-card", *out]) == 0
    text = card.read_text()
    assert text.startswith(head + tail)  # the rest of the card, as it was
    assert text.count("## Zero-shot evaluation") == 1
    assert text.count("### colors") == 1 and text.count("### captions") == 1
    assert text.index("### colors") < text.index("### captions")
    assert "| top1 |" in text and "| image_to_text_R@1 |" in text and str(tmp_path) not in text

    # A card without the section, and no card at all.
    update_zeroshot_section(tmp_path, "set", "| a | b |\n")
    assert (tmp_path / "README.md").read_text() == "## Zero-shot evaluation\n\n### set\n\n| a | b |\n"
    update_zeroshot_section(tmp_path, "other", "x\n")
    update_zeroshot_section(tmp_path, "set", "y\n")
    assert (tmp_path / "README.md").read_text() == "## Zero-shot evaluation\n\n### set\n\ny\n\n### other\n\nx\n"


def test_cli_reports_a_bad_manifest_as_a_user_error(tiny_clip_dir, tmp_path, capsys):
    folder = _folder(tmp_path / "bad", "manifest.jsonl", [OK_ROW, {"image": "images/none.png", "caption": "x"}])
    assert main([str(tiny_clip_dir), "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "finevit-vl eval-zeroshot: error:" in err and "manifest.jsonl line 2" in err and "image file not found" in err
    assert main([str(tmp_path), "--data", str(folder.parent / "none")]) == 2
