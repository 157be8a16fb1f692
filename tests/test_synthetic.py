"""`finevit-vl make-data`: deterministic output, valid records, boxes on the drawn objects, benchmark files that match SFT."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finevit_vl import prompts
from finevit_vl.benchmark_data import PARQUET_FILES
from finevit_vl.data import JsonlSource, load_record_images, record_to_messages
from finevit_vl.data.scenes import COLORS, FAMILIES
from finevit_vl.data.synthetic import main
from finevit_vl.eval import tasks_path
from finevit_vl.report import SYNTHETIC_TASKS


TRAIN, EVAL = 6, 5
COLUMNS = {
    "docvqa": {
        "questionId",
        "question",
        "answers",
        "question_types",
        "docId",
        "ucsf_document_id",
        "ucsf_document_page_no",
        "image",
    },
    "chartqa": {"question", "answer", "type", "image"},
    "ocrbench": {"question", "answer", "dataset", "question_type", "image"},
    "countbench": {"question", "number", "text", "image"},
    "refcoco": {"question_id", "answer", "bbox", "segmentation", "file_name", "image"},
}


def _run(out: Path, seed: int, workers: int) -> Path:
    argv = ["--out", str(out), "--seed", str(seed), "--train-per-task", str(TRAIN), "--eval-per-task", str(EVAL)]
    assert main([*argv, "--workers", str(workers)]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("make_data")
    return {"a": _run(root / "a", 0, 1), "b": _run(root / "b", 0, 2), "other_seed": _run(root / "c", 1, 1)}


def _files(out: Path, pattern: str) -> dict[str, bytes]:
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.glob(pattern))}


def _parquet_rows(path: Path) -> list[dict]:
    import datasets

    table = datasets.load_dataset(
        "parquet", data_files=str(path), split="train", cache_dir=str(path.parent / ".cache")
    )
    return list(table.cast_column("image", datasets.Image(decode=False)))


def test_same_seed_gives_identical_files_whatever_the_workers(runs):
    a, b = runs["a"], runs["b"]
    for pattern in ("*/*.jsonl", "images/*/*/*.png"):
        files = _files(a, pattern)
        assert files and files == _files(b, pattern)
    for relative in PARQUET_FILES.values():
        assert _parquet_rows(a / "eval" / relative) == _parquet_rows(b / "eval" / relative)
    assert _files(a, "*/*.jsonl") != _files(runs["other_seed"], "*/*.jsonl")


def test_manifest_counts(runs):
    manifest = json.loads((runs["a"] / "make_data.json").read_text())
    counts = manifest["counts"]
    assert counts["sft/train.jsonl"] == TRAIN * len(FAMILIES) and counts["sft/eval.jsonl"] == EVAL * len(FAMILIES)
    assert counts["images/train"] == TRAIN * len(FAMILIES)
    assert counts["eval/ocrbench/test.parquet"] == 2 * EVAL  # words/numbers + key information extraction
    assert manifest["arguments"]["seed"] == 0


def test_parquet_files_load_with_the_benchmark_columns(runs):
    for name, relative in PARQUET_FILES.items():
        rows = _parquet_rows(runs["a"] / "eval" / relative)
        assert rows and set(rows[0]) == COLUMNS[name], name
        assert all(Image.open(io.BytesIO(row["image"]["bytes"])).width >= 112 for row in rows)


def test_parquet_files_are_where_the_tasks_read_them(tmp_path):
    """Each file make-data writes is the local data file of the FineViT task the run report scores on it."""
    configs = tasks_path.task_configs()
    assert {relative for relative, _ in SYNTHETIC_TASKS.values()} == set(PARQUET_FILES.values())
    for task, (relative, _) in SYNTHETIC_TASKS.items():
        assert tasks_path.local_data_file(str(tmp_path), configs[task]) == tmp_path.resolve() / relative


def _records(out: Path, name: str) -> list[tuple[dict, list[Image.Image]]]:
    return [(record, load_record_images(record, location)) for record, location in JsonlSource(out / name)]


def test_records_validate_and_images_match_sizes(runs):
    for name in ("stage3/train.jsonl", "stage3/eval.jsonl", "sft/train.jsonl", "sft/eval.jsonl"):
        for record, images in _records(runs["a"], name):  # load_record_images validates, incl. boxes vs image size
            assert len(images) == 1 and images[0].width % 28 == 0 and images[0].height % 28 == 0
            assert record_to_messages(record, record["width"], record["height"])
    sizes = {image.size for _, (image,) in _records(runs["a"], "sft/train.jsonl")}
    assert len(sizes) > 3  # native resolution: several sizes and aspect ratios


def _tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_shape_boxes_are_the_drawn_objects(runs):
    checked = 0
    for record, (image,) in _records(runs["a"], "stage3/train.jsonl"):
        if record["task"] not in ("region", "grounding"):
            continue
        pixels = np.asarray(image)
        items = record.get("regions") or record.get("grounding")
        for item in items:
            text = item.get("text") or item["expression"]
            color = COLORS[text.split()[1]]
            x1, y1, x2, y2 = item["box"]
            inside = (pixels[y1:y2, x1:x2] == color).all(axis=-1)
            # The object fills its box edge to edge.
            assert _tight_box(inside) == [0, 0, x2 - x1, y2 - y1], record["id"]
            assert inside.mean() > 0.45  # triangles fill half the box, circles ~79%, squares all
            checked += 1
        # No pixel of an object's color lies outside the boxes of objects of that color.
        for color_name in {(i.get("text") or i["expression"]).split()[1] for i in items}:
            outside = (pixels == COLORS[color_name]).all(axis=-1)
            for item in items:
                if color_name in (item.get("text") or item["expression"]):
                    x1, y1, x2, y2 = item["box"]
                    outside[y1:y2, x1:x2] = False
            assert not outside.any(), record["id"]
    assert checked > 20


def test_text_boxes_cover_the_ink(runs):
    checked = 0
    for record, (image,) in _records(runs["a"], "stage3/train.jsonl"):
        family = record["id"].split("-")[1]
        if record["task"] != "ocr" or family not in ("ocr", "document"):
            continue
        pixels = np.asarray(image).astype(int)
        ink = np.abs(pixels - pixels[0, 0]).sum(axis=-1) > 0  # anything that is not the plain background
        for item in record["ocr"]:
            x1, y1, x2, y2 = item["box"]
            assert _tight_box(ink[y1:y2, x1:x2]) == [0, 0, x2 - x1, y2 - y1], record["id"]
            ink[y1:y2, x1:x2] = False
            checked += 1
        assert not ink.any(), f"{record['id']}: ink outside the OCR boxes"
    assert checked >= TRAIN * 2


def _sft_by_id(out: Path) -> dict[str, dict]:
    return {record["id"]: record for record, _ in JsonlSource(out / "sft/eval.jsonl")}


def test_eval_questions_match_the_sft_turns(runs):
    out = runs["a"]
    sft = _sft_by_id(out)

    def turns(family: str, index: int) -> tuple[str, str]:
        conversation = sft[f"eval-{family}-{index:06d}-qa"]["conversations"]
        return conversation[0]["content"], conversation[1]["content"]

    for row in _parquet_rows(out / "eval" / PARQUET_FILES["docvqa"]):
        user, answer = turns("document", row["docId"])
        assert user == prompts.short_answer(row["question"]) and row["answers"] == [answer]
    for index, row in enumerate(_parquet_rows(out / "eval" / PARQUET_FILES["chartqa"])):
        assert turns("chart", index) == (prompts.short_answer(row["question"]), row["answer"])
        assert row["type"] in ("human_test", "augmented_test")
    for index, row in enumerate(_parquet_rows(out / "eval" / PARQUET_FILES["countbench"])):
        user, answer = turns("counting", index)
        name = row["question"].removeprefix("How many ").removesuffix(" are there in the image?")
        assert user == prompts.count_question(name) and row["question"] == prompts.COUNT_QUESTION.format(name=name)
        assert answer == str(row["number"]) and str(row["number"]) not in row["text"]
    for index, row in enumerate(_parquet_rows(out / "eval" / PARQUET_FILES["refcoco"])):
        record = sft[f"eval-grounding-{index:06d}-qa"]
        assert record["conversations"][0]["content"] == prompts.CAPTION_TO_BOX.format(text=row["answer"][0])
        x, y, w, h = row["bbox"]
        assert record["boxes"] == [[x, y, x + w, y + h]]
    ocr_rows = _parquet_rows(out / "eval" / PARQUET_FILES["ocrbench"])
    recognition = [row for row in ocr_rows if row["question_type"] != "Key Information Extraction"]
    for index, row in enumerate(recognition):
        user, answer = turns("ocr", index)
        assert user == prompts.short_answer(row["question"]) and row["answer"] == [answer]
    assert {row["question_type"] for row in ocr_rows} <= {
        "Regular Text Recognition",
        "Digit String Recognition",
        "Key Information Extraction",
    }


def test_grounding_sft_renders_int1000_box(runs):
    record = next(r for r in _sft_by_id(runs["a"]).values() if "boxes" in r)
    messages = record_to_messages(record, record["width"], record["height"])
    x1, y1, x2, y2 = record["boxes"][0]
    expected = [
        round(x1 / record["width"] * 1000),
        round(y1 / record["height"] * 1000),
        round(x2 / record["width"] * 1000),
        round(y2 / record["height"] * 1000),
    ]
    assert messages[1]["content"][0]["text"] == "[" + ", ".join(map(str, expected)) + "]"


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--max-count", "12"])
    assert "--max-count 12: choose 1-9" in capsys.readouterr().err


def test_cli_dispatch_prints_a_summary(tmp_path, capsys):
    from finevit_vl.cli import main as cli_main

    argv = ["make-data", "--out", str(tmp_path), "--train-per-task", "2", "--eval-per-task", "0", "--tasks", "ocr"]
    assert cli_main([*argv, "--workers", "1"]) == 0
    summary = capsys.readouterr().out
    assert "sft/train.jsonl" in summary and "stage3/train.jsonl" in summary
    assert len((tmp_path / "sft/train.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "eval").exists()  # no eval images, no benchmark files


def test_chart_bars_sit_one_per_token_column_and_the_width_does_not_give_the_count():
    """Bar counting is learnable because each bar lies inside one 28 px token column; the canvas is always five columns
    wide, so the count must be read from the bars, not from the number of image tokens."""
    import random

    from finevit_vl.data.scenes import CHART_COLUMNS, TOKEN_CELL, Settings, make_chart

    widths, counts, asked = set(), set(), 0
    for index in range(40):
        scene = make_chart(random.Random(f"chart:{index}"), Settings(image_size=112, max_count=6))
        pixels = np.asarray(scene.image).astype(int)
        background = pixels[0, 0]
        count = len(scene.stage3[0]["ocr"]) // 2  # one value and one label per bar
        # Bar color: the most common non-background color.
        colors, freq = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        ranked = [tuple(c) for c in colors[np.argsort(-freq)] if tuple(c) != tuple(background)]
        bar = np.all(pixels == ranked[0], axis=-1)
        columns = [bar[:, c * TOKEN_CELL : (c + 1) * TOKEN_CELL].any() for c in range(CHART_COLUMNS)]
        # Every bar's pixels stay inside its column: no column boundary has bar color on both sides of it.
        for c in range(1, CHART_COLUMNS):
            assert not (bar[:, c * TOKEN_CELL - 1] & bar[:, c * TOKEN_CELL]).any(), index
        assert sum(columns) == count, index
        if scene.prompt.startswith("How many bars"):
            assert scene.answer == str(count)
            asked += 1
        widths.add(scene.image.width)
        counts.add(count)
    assert widths == {CHART_COLUMNS * TOKEN_CELL} and counts == {3, 4, 5} and 5 < asked < 30


def test_ocr_glyphs_sit_one_per_token_cell_left_aligned():
    """Word recognition is learnable because each glyph lies inside its own 28 px token cell, from the left edge of a
    strip of constant width: the answer's i-th character is drawn in the image's i-th token and nowhere else."""
    import random

    from finevit_vl.data.scenes import OCR_CELLS, TOKEN_CELL, Settings, make_ocr

    lengths, numbers = set(), 0
    for index in range(40):
        scene = make_ocr(random.Random(f"ocr:{index}"), Settings(image_size=112))
        pixels = np.asarray(scene.image).astype(int)
        ink = np.abs(pixels - pixels[0, 0]).sum(axis=-1) > 0
        assert scene.image.size == (OCR_CELLS * TOKEN_CELL, TOKEN_CELL), index
        inked = [bool(ink[:, c * TOKEN_CELL : (c + 1) * TOKEN_CELL].any()) for c in range(OCR_CELLS)]
        assert inked == [c < len(scene.answer) for c in range(OCR_CELLS)], (index, scene.answer)
        for c in range(1, OCR_CELLS):  # no glyph crosses a cell boundary
            assert not (ink[:, c * TOKEN_CELL - 1] & ink[:, c * TOKEN_CELL]).any(), (index, scene.answer)
        x1, y1, x2, y2 = scene.stage3[0]["ocr"][0]["box"]
        assert _tight_box(ink) == [x1, y1, x2, y2], index
        lengths.add(len(scene.answer))
        numbers += scene.answer.isdigit()
    assert len(lengths) >= 4 and 3 < numbers < 25
