"""Encoder pretraining data (`finevit_vl.data.pretrain_data`): valid records, deterministic output, long captions whose
shared start hides the details that tell a group's images apart, and zero-shot manifests that load."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finevit_vl.data import JsonlSource, load_record_images, validate_record
from finevit_vl.data.pretrain_data import CLASSNAMES, MIN_SHARED_WORDS, make_pretrain_data, shared_word_prefix
from finevit_vl.data.scenes import COLORS
from finevit_vl.data.synthetic import main
from finevit_vl.tiny import build_tokenizer


TRAIN, EVAL, GROUP = 48, 24, 8
CELLS = {
    name: (row, col)
    for row, names in enumerate(
        (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))
    )
    for col, name in enumerate(names)
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    for name, seed, workers in (("a", 0, 1), ("b", 0, 2), ("other_seed", 1, 1)):
        make_pretrain_data(root / name, seed=seed, num_train=TRAIN, num_eval=EVAL, workers=workers)
    return {name: root / name for name in ("a", "b", "other_seed")}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _groups(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["meta"]["group"], []).append(record)
    return groups


@pytest.fixture(scope="module")
def tokenizer(runs):
    captions = [r["caption"] for split in ("train", "eval") for r in _jsonl(runs["a"] / "stage2" / f"{split}.jsonl")]
    return build_tokenizer(captions, vocab_size=512)


def test_records_are_valid_and_images_have_the_recorded_size(runs):
    out = runs["a"]
    for relative in ("stage1/train.jsonl", "stage2/train.jsonl", "stage2/eval.jsonl"):
        records = _jsonl(out / relative)
        assert len(records) == (EVAL if "eval" in relative else TRAIN)
        for index, record in enumerate(records):
            validate_record(record, f"{relative}:{index + 1}")
            image = out / Path(relative).parent / record["image"]
            assert record["width"] % 28 == 0 and record["height"] % 28 == 0
            with Image.open(image) as opened:
                assert opened.size == (record["width"], record["height"])
    # Stage I's relative paths resolve through JsonlSource, as a trainer reads them.
    record, location = next(iter(JsonlSource(out / "stage1" / "train.jsonl")))
    images = load_record_images(record, location)
    assert images[0].size == (record["width"], record["height"])


def test_manifest_counts_and_zeroshot_images_exist(runs):
    out = runs["a"]
    manifest = json.loads((out / "pretrain_manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["group_size"] == GROUP
    assert manifest["counts"]["stage2/train.jsonl"] == TRAIN
    assert manifest["distinct_word_position"]["min"] >= MIN_SHARED_WORDS
    for split, count in (("retrieval", EVAL), ("retrieval_long", EVAL), ("classification", EVAL)):
        rows = _jsonl(out / "zeroshot" / split / "manifest.jsonl")
        assert len(rows) == count == manifest["counts"][f"zeroshot/{split}/manifest.jsonl"]
        for row in rows:
            assert (out / "zeroshot" / split / row["image"]).is_file()
    for row in _jsonl(out / "zeroshot" / "retrieval" / "manifest.jsonl"):
        short, paraphrase = row["captions"]
        assert 6 <= len(short.split()) <= 12 and short != paraphrase
    for row in _jsonl(out / "zeroshot" / "retrieval_long" / "manifest.jsonl"):
        assert 80 <= len(row["captions"][0].split()) <= 200


def test_generation_is_deterministic_and_independent_of_workers(runs):
    for relative in ("pretrain_manifest.json", "stage2/train.jsonl", "zeroshot/classification/manifest.jsonl"):
        assert (runs["a"] / relative).read_bytes() == (runs["b"] / relative).read_bytes()
    samples = ["stage2/images/train-g00003-5.png", "zeroshot/retrieval_long/images/long-g00001-2.png"]
    samples += ["zeroshot/classification/images/000007.png", "zeroshot/retrieval/images/short-g00011-0.png"]
    for relative in samples:
        assert (runs["a"] / relative).read_bytes() == (runs["b"] / relative).read_bytes()
    assert (runs["a"] / "stage2/train.jsonl").read_bytes() != (runs["other_seed"] / "stage2/train.jsonl").read_bytes()


def test_long_captions_share_64_tokens_within_a_group_and_differ_within_256(runs, tokenizer):
    groups = _groups(_jsonl(runs["a"] / "stage2" / "train.jsonl"))
    assert len(groups) == TRAIN // GROUP and all(len(g) == GROUP for g in groups.values())
    for records in groups.values():
        captions = [r["caption"] for r in records]
        assert all(len(c.split()) >= 60 for c in captions)
        assert len({r["meta"]["short_caption"] for r in records}) == 1  # short captions cannot tell them apart
        ids = [tokenizer(c)["input_ids"] for c in captions]
        assert len({tuple(i[:64]) for i in ids}) == 1  # identical first 64 tokens
        assert len({tuple(i[:256]) for i in ids}) == len(ids)  # all distinct within 256 tokens
        assert shared_word_prefix(captions) >= MIN_SHARED_WORDS
    # Different groups differ early: in their first 32 tokens (their main colors come first).
    starts = [tuple(tokenizer(g[0]["caption"])["input_ids"][:32]) for g in groups.values()]
    assert len(set(starts)) == len(starts)


def test_images_of_a_group_share_their_common_objects(runs):
    out = runs["a"] / "stage2"
    for records in _groups(_jsonl(out / "train.jsonl")).values():
        common = [[o for o in r["meta"]["objects"] if o["common"]] for r in records]
        assert all(c == common[0] for c in common) and 2 <= len(common[0]) <= 3
        assert len({r["meta"]["background"] for r in records}) == 1
        pixels = [np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in records]
        for obj in common[0]:
            x1, y1, x2, y2 = obj["box"]
            assert all(np.array_equal(p[y1:y2, x1:x2], pixels[0][y1:y2, x1:x2]) for p in pixels)
        # ... while the images themselves differ (the extra object and the word).
        assert len({p.tobytes() for p in pixels}) == len(pixels)
        # Every object and word stays inside its 3x3 cell, so member details never touch the common objects.
        for record in records:
            width, height = record["width"], record["height"]
            items = [(o["position"], o["box"]) for o in record["meta"]["objects"]]
            items += (
                [(record["meta"]["word"]["position"], record["meta"]["word"]["box"])] if record["meta"]["word"] else []
            )
            for position, (x1, y1, x2, y2) in items:
                row, col = CELLS[position]
                assert col * width // 3 <= x1 < x2 <= (col + 1) * width // 3
                assert row * height // 3 <= y1 < y2 <= (row + 1) * height // 3
        # The member details are what the caption tells late, after the shared words.
        shared = shared_word_prefix([r["caption"] for r in records])
        for record in records:
            extra = [o for o in record["meta"]["objects"] if not o["common"]]
            assert len(extra) == 1 and extra[0]["position"] in ("top left", "top right", "bottom left", "bottom right")
            late = " ".join(record["caption"].split()[shared:])
            assert f"{extra[0]['color']} {extra[0]['shape']}" in late and f"{extra[0]['position']} corner" in late
            word = record["meta"]["word"]
            assert word is None or f'"{word["text"]}"' in late and f"{word['position']} corner" in late


def test_classification_is_balanced_over_the_classnames(runs):
    folder = runs["a"] / "zeroshot" / "classification"
    classnames = json.loads((folder / "classnames.json").read_text())
    templates = json.loads((folder / "templates.json").read_text())
    assert classnames == list(CLASSNAMES) and len(classnames) == 15
    assert len(templates) >= 3 and all("{}" in t for t in templates)
    counts = Counter(row["label"] for row in _jsonl(folder / "manifest.jsonl"))
    assert set(counts) <= set(classnames)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == min(EVAL, len(classnames))
    # The dominant object's color covers more pixels than any other object color.
    for row in _jsonl(folder / "manifest.jsonl")[:6]:
        pixels = np.asarray(Image.open(folder / row["image"]).convert("RGB")).reshape(-1, 3)
        per_color = {name: int((pixels == rgb).all(axis=1).sum()) for name, rgb in COLORS.items()}
        assert max(per_color, key=per_color.get) == row["label"].split()[0]


def test_make_data_cli_writes_the_pretrain_set_in_addition(tmp_path):
    argv = ["--out", str(tmp_path), "--train-per-task", "1", "--eval-per-task", "1", "--workers", "1"]
    assert main([*argv, "--pretrain", "--pretrain-train", "16", "--pretrain-eval", "8", "--group-size", "4"]) == 0
    manifest = json.loads((tmp_path / "pretrain" / "pretrain_manifest.json").read_text())
    assert manifest["group_size"] == 4 and manifest["counts"]["stage2/train.jsonl"] == 16
    assert (tmp_path / "stage3" / "train.jsonl").is_file()  # the Stage III set is still written
    counts = json.loads((tmp_path / "make_data.json").read_text())["counts"]
    assert counts["pretrain/zeroshot/classification/manifest.jsonl"] == 8
    assert len(_groups(_jsonl(tmp_path / "pretrain" / "stage2" / "train.jsonl"))) == 4


def test_make_data_without_the_flag_writes_no_pretrain_set(tmp_path):
    assert main(["--out", str(tmp_path), "--train-per-task", "1", "--eval-per-task", "1", "--workers", "1"]) == 0
    assert not (tmp_path / "pretrain").exists()
    assert "pretrain" not in json.loads((tmp_path / "make_data.json").read_text())["arguments"]
