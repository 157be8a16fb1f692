"""The demo end to end on a short budget: data -> model -> Stage III -> SFT -> lmms-eval -> report.

One run, shared by the tests that read it: counting and OCR with five minutes of training (~3.5 min in all), to fit
the test budget; `make demo` runs all five families for eight. Both must beat the majority answer by a wide margin
(measured: counting 1.00 vs 0.20, OCR 0.79 vs 0.06)."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "finevit_vl.cli", "quickstart", "--out", str(out), "--seed", "0",
               "--families", "counting", "ocr", "--minutes", "5"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_results_are_scored_by_lmms_eval_next_to_the_baseline(quickstart_run):
    out, _ = quickstart_run
    results = json.loads((out / "results.json").read_text())
    rows = {row["task"]: row for row in results["rows"]}
    counting = rows["finevit_countbench"]
    assert 0.0 < counting["baseline"] < 0.4  # majority answer of the eval split (counts 1-6)
    # The model reads the image: it beats the majority answer by a wide margin.
    assert counting["model"] >= counting["baseline"] + 0.3, rows
    assert results["scores"]["finevit_countbench"]["acc"] == counting["model"]
    assert json.loads((out / "eval" / "results.json").read_text())  # lmms-eval's own report was written


def test_ocr_crops_are_read(quickstart_run):
    """Word and number recognition, the third task the default demo learns, clicks after ~350-400 SFT steps of its
    own (measured next to counting: 0.23 at --minutes 4, ~330 OCR steps; 0.79 at --minutes 5, ~410; majority word
    0.06). Guards the data design that makes it learnable (one glyph per token cell) and the OCR prompts through
    lmms-eval."""
    out, _ = quickstart_run
    rows = {row["task"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    ocr = rows["finevit_ocrbench"]
    assert ocr["baseline"] < 0.2 and ocr["model"] >= ocr["baseline"] + 0.5, rows
    # The report splits OCRBench by official question group, so crops read are not confused with documents.
    group = re.search(r"accuracy by question group: text recognition (\d\.\d{3})", (out / "report.md").read_text())
    assert group and float(group.group(1)) >= ocr["baseline"] + 0.5


def test_run_folder_has_checkpoint_card_report_and_real_plots(quickstart_run):
    out, stdout = quickstart_run
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out / "model")
    processor = AutoProcessor.from_pretrained(out / "model")
    assert type(model).__name__ == "FineViTVLForConditionalGeneration" and processor.chat_template
    card = (out / "model" / "README.md").read_text()
    assert "finevit_countbench" in card and "not evaluated yet" not in card
    report = (out / "report.md").read_text()
    assert "finevit_countbench" in report and "trivial baseline" in report
    assert "finevit_countbench" in stdout  # the results table is printed
    for name, min_size in (("loss_curves.png", (600, 300)), ("predictions.png", (600, 200))):
        image = Image.open(out / name)
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert len(set(image.convert("L").resize((64, 32)).get_flattened_data())) > 8  # not a blank canvas
    for stage in ("stage3", "sft"):
        records = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        held_out = [r["eval_loss"] for r in records if "eval_loss" in r]
        assert held_out[-1] < held_out[0]


def test_samples_do_not_depend_on_where_the_data_lives(tmp_path, tiny_qwen3):
    """Same seed, same data in another folder -> the same training samples (turn shuffling and region subsets are
    seeded by the record id, not by its absolute path); this made two demo runs in different folders diverge."""
    import shutil

    from finevit_vl.data.collator import SampleEncoder
    from finevit_vl.data.sources import JsonlSource
    from finevit_vl.data.synthetic import main as make_data

    make_data(["--out", str(tmp_path / "a"), "--seed", "0", "--train-per-task", "6", "--eval-per-task", "2",
               "--image-size", "112", "--tasks", "grounding", "ocr", "chart"])
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    tiny_processor = tiny_qwen3[1]
    encoder = SampleEncoder(tiny_processor, max_length=2048, max_regions=2, seed=0)

    def encoded(root):
        return [encoder.encode_record(r, loc, epoch=1).input_ids.tolist() for r, loc in JsonlSource(root / "stage3" / "train.jsonl")]

    first, second = encoded(tmp_path / "a"), encoded(tmp_path / "elsewhere" / "b")
    assert first == second
    # ... and the shuffle is live: another seed renders some record differently.
    other = SampleEncoder(tiny_processor, max_length=2048, max_regions=2, seed=1)
    assert first != [other.encode_record(r, loc, epoch=1).input_ids.tolist() for r, loc in JsonlSource(tmp_path / "a" / "stage3" / "train.jsonl")]


def test_grounding_baseline_is_the_best_fixed_box(tmp_path):
    """The trivial grounding baseline tries the centred box and every quadrant (objects sit on a 2x2 grid, so a
    quadrant is the strongest constant answer) and keeps the best, so a model must beat the layout prior."""
    import io

    import pyarrow.parquet as pq

    from finevit_vl.data.synthetic import main as make_data
    from finevit_vl.eval import metrics
    from finevit_vl.report import FIXED_BOXES, baseline_scores

    make_data(["--out", str(tmp_path), "--seed", "3", "--train-per-task", "1", "--eval-per-task", "40",
               "--image-size", "112", "--tasks", "grounding", "counting"])
    rows = pq.read_table(tmp_path / "eval" / "refcoco" / "val.parquet").to_pylist()
    per_box = {}
    for name, box in FIXED_BOXES.items():
        hits = 0
        for row in rows:
            width, height = Image.open(io.BytesIO(row["image"]["bytes"])).size
            hits += metrics.rec_scores(box, metrics.xywh_to_normalized(row["bbox"], width, height))["acc"]
        per_box[name] = hits / len(rows)
    baselines = baseline_scores(tmp_path / "eval")
    grounding = baselines["finevit_refcoco_bbox_rec_val"]
    assert grounding["score"] == max(per_box.values()) and per_box["centred box"] < grounding["score"]
    assert grounding["baseline"].startswith(max(per_box, key=per_box.get))
    numbers = [row["number"] for row in pq.read_table(tmp_path / "eval" / "countbench" / "test.parquet").to_pylist()]
    assert baselines["finevit_countbench"]["score"] >= max(numbers.count(n) for n in set(numbers)) / len(numbers)


def test_blind_baseline_learns_answer_formats_per_question_without_memorising():
    """The blind baseline answers each question with the best constant chosen on the other rows of that question: it
    gets ANLS credit for a plausible date (what the demo's document model had learned), but a question seen once
    cannot answer itself."""
    from finevit_vl.eval import metrics
    from finevit_vl.report import _text_baselines

    dates = [{"question": "What is the date?", "answers": [f"2024-03-1{d}"]} for d in range(4)]
    names = [{"question": "Who?", "answers": [name]} for name in ("Ada", "Ada", "Bo", "Cy")]
    anls = lambda answer, row: metrics.anls(answer, row["answers"])
    candidates = _text_baselines(dates + names, lambda r: r["answers"][0], anls)
    blind = next(value for name, value in candidates.items() if name.startswith("blind"))
    # each date is one character from the others (ANLS 0.9); "Ada" answers both Adas, not Bo or Cy
    assert blind == pytest.approx((4 * 0.9 + 2) / 8)
    assert candidates["majority 'Ada'"] == pytest.approx(2 / 8)
    assert blind > max(value for name, value in candidates.items() if not name.startswith("blind"))
    unique = [{"question": f"Q{i}?", "answers": [f"answer {i}"]} for i in range(5)]
    candidates = _text_baselines(unique, lambda r: r["answers"][0], anls)
    assert next(v for n, v in candidates.items() if n.startswith("blind")) == candidates["majority 'answer 0'"]


def test_longer_budgets_give_their_extra_steps_to_grounding():
    """Past SATURATED_SFT_STEPS the families learned within the default budget keep their sample counts and grounding,
    the one that still improves with steps, takes the rest; the default budget's mixture is the measured one."""
    from finevit_vl.quickstart import SATURATED_SFT_STEPS, SFT_WEIGHTS, sft_weights

    families = list(SFT_WEIGHTS)
    # the default budget's steps (half the saturation point) up to the saturation point itself
    assert sft_weights(families, SATURATED_SFT_STEPS // 2) == sft_weights(families, SATURATED_SFT_STEPS) == SFT_WEIGHTS
    long_run = sft_weights(families, 2 * SATURATED_SFT_STEPS)
    assert sum(long_run.values()) == pytest.approx(1.0)
    for family in families:
        if family != "grounding":  # same number of samples as at the saturation point
            assert long_run[family] * 2 * SATURATED_SFT_STEPS == pytest.approx(SFT_WEIGHTS[family] * SATURATED_SFT_STEPS)
    others = sum(weight for family, weight in SFT_WEIGHTS.items() if family != "grounding") / sum(SFT_WEIGHTS.values())
    assert 0 < others < 1 and long_run["grounding"] == pytest.approx(1 - others / 2)
    # Without grounding no family takes the extra steps: the mixture stays the measured one at any budget.
    assert sft_weights(["ocr", "counting"], 10 * SATURATED_SFT_STEPS) == {f: SFT_WEIGHTS[f] for f in ("ocr", "counting")}


def test_grounding_breakdown_tells_the_named_object_from_another(tmp_path, monkeypatch):
    """The report says whether boxes land on the object the expression names or on another object of the image, next
    to the chance level of a detector that ignores the expression: an ACC@0.5 below that level is no grounding."""
    import pyarrow.parquet as pq

    from finevit_vl import quickstart
    from finevit_vl.boxes import box_to_text
    from finevit_vl.data.synthetic import main as make_data

    make_data(["--out", str(tmp_path), "--seed", "5", "--train-per-task", "1", "--eval-per-task", "30",
               "--image-size", "112", "--tasks", "grounding"])
    records = [json.loads(line) for line in (tmp_path / "stage3" / "eval.jsonl").read_text().splitlines()]
    objects = {r["id"].removesuffix("-grounding"): r["grounding"] for r in records if r["task"] == "grounding"}

    def answer_with(pick):
        # The breakdown asks about the refcoco rows in file order; answer each with a box `pick` chooses.
        row_ids = pq.read_table(tmp_path / "eval" / "refcoco" / "val.parquet").column("question_id").to_pylist()

        def answers(model, processor, images, questions):
            return [box_to_text(pick(objects[row_id], question.rsplit(": ", 1)[1]), *image.size)
                    for row_id, image, question in zip(row_ids, images, questions, strict=True)]
        return answers

    named = lambda items, e: next(g["box"] for g in items if g["expression"] == e)
    other = lambda items, e: next(g["box"] for g in items if g["expression"] != e)
    monkeypatch.setattr(quickstart, "_answers", answer_with(named))
    breakdown = quickstart.grounding_breakdown(None, None, tmp_path)
    assert breakdown["named object"] == 1.0 and breakdown["another object"] == 0.0
    expected_chance = sum(1 / len(items) for items in objects.values()) / len(objects)
    assert breakdown[quickstart.BLIND_DETECTOR] == pytest.approx(expected_chance)
    assert 0.25 <= expected_chance <= 0.5  # 2-4 objects per image
    monkeypatch.setattr(quickstart, "_answers", answer_with(other))
    breakdown = quickstart.grounding_breakdown(None, None, tmp_path)
    assert breakdown["named object"] == 0.0 and breakdown["another object"] == 1.0 and breakdown["no object"] == 0.0
