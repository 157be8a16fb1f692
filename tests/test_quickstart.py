"""The demo end to end on a short budget: data -> model -> Stage III -> SFT -> lmms-eval -> report, and the recipe's
parts (typed stage configs, the tokenizer corpus, the mixture).

One run, shared by the tests that read it: counting and OCR with five minutes of training (~3.5 min in all), to fit
the test budget; `make demo` runs all five families for eight. Both must beat the majority answer by a wide margin
(measured: counting 1.00 vs 0.20, OCR 0.87 vs 0.06). The report's own tests are in test_report.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    own (measured next to counting: 0.23 at --minutes 4, ~330 OCR steps; 0.87 at --minutes 5, ~410; majority word
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
    # Each stage's config is in its run folder, resolved; SFT continues from the Stage III export.
    from finevit_vl.train.config import config_to_dict, load_config

    stage3, sft = (load_config(out / stage / "config.yaml") for stage in ("stage3", "sft"))
    assert stage3.model.path == str(out / "init") and sft.model.path == str(out / "stage3" / "final")
    assert [s["path"] for s in config_to_dict(sft)["data"]["train"]["sources"]] == [
        str(out / "data" / "sft" / f"train_{f}.jsonl") for f in ("counting", "ocr")]


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


def test_stage_configs_are_the_recipe_with_the_set_overrides_last(tmp_path):
    """Each stage's trainer config is built in Python from its train_configs/ file and written to its run folder;
    `--set` overrides (both stages, or one with a `stage:` prefix) are applied last, through the trainer's loader."""
    from finevit_vl.data.synthetic import main as make_data
    from finevit_vl.quickstart import GLOBAL_BATCH, SIZES, Recipe, stage_config
    from finevit_vl.train.config import config_to_dict, load_config

    data = tmp_path / "data"
    make_data(["--out", str(data), "--seed", "0", "--train-per-task", "2", "--eval-per-task", "2", "--image-size", "112",
               "--tasks", "counting", "ocr"])
    recipe = Recipe(minutes=2, families=("ocr", "counting"), overrides=("train.log_every=7", "sft:optim.lr=0.003"))
    stage3 = stage_config(recipe, "stage3", tmp_path / "init", data, tmp_path / "stage3")
    sft = stage_config(recipe, "sft", tmp_path / "stage3" / "final", data, tmp_path / "sft")
    for stage, config in (("stage3", stage3), ("sft", sft)):  # the run folder holds the config in force
        assert config_to_dict(load_config(tmp_path / stage / "config.yaml")) == config_to_dict(config)
    tiny = SIZES["tiny"]
    assert stage3.model.init is None and stage3.model.path == str(tmp_path / "init")
    assert stage3.train.max_steps == recipe.steps("stage3") == int(2 * 0.4 * tiny.stage3_samples_per_minute) // GLOBAL_BATCH
    assert stage3.optim.lr == tiny.stage3_lr and stage3.modules.vision_tower.lr == tiny.stage3_lr / 20
    assert stage3.train.log_every == sft.train.log_every == 7  # an unprefixed override reaches both stages
    assert sft.optim.lr == 0.003 and sft.modules.language_model.lr == tiny.sft_lr  # the prefixed one only SFT
    mixture, held_out = config_to_dict(sft)["data"]["train"], config_to_dict(sft)["data"]["eval"]
    assert mixture["type"] == "mixture" and mixture["weights"] == [0.4, 0.15]  # in --families order
    assert [Path(source["path"]).name for source in mixture["sources"]] == ["train_ocr.jsonl", "train_counting.jsonl"]
    assert [line.split('"id": "')[1].split("-")[1] for line in Path(held_out["path"]).read_text().splitlines()] == [
        "counting", "ocr", "counting", "ocr"]  # families in turn, so the held-out subset covers each


def test_the_tokenizer_corpus_is_the_text_the_model_reads():
    """One rule for the demo and the trainer's `model.init: tiny`: every text field of the record schema, then the
    render prompts with their slots; ids, roles, task names and image paths are no corpus."""
    from finevit_vl.corpus import RENDER_PROMPTS, record_texts, tokenizer_corpus

    record = {"id": "train-ocr-1-qa", "image": "../images/x.png", "task": "conversation", "caption": "A cat.",
              "regions": [{"box": [0, 0, 1, 1], "text": "a red circle"}], "ocr": [{"text": "river", "box": [0, 0, 1, 1]}],
              "grounding": [{"expression": "the blue square", "box": [0, 0, 1, 1]}],
              "conversations": [{"role": "user", "content": "What is written?"}, {"role": "assistant", "content": "river"}]}
    assert record_texts(record) == ["What is written?", "river", "a red circle", "river", "the blue square", "A cat."]
    assert record_texts({"id": "x", "caption": ""}) == []
    corpus = tokenizer_corpus([record, {"caption": "Two dogs."}])
    assert corpus[-len(RENDER_PROMPTS):] == list(RENDER_PROMPTS)
    assert corpus[: -len(RENDER_PROMPTS)] == record_texts(record) + ["Two dogs."]
