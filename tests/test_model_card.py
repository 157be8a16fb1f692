"""Model cards (`finevit_vl.model_card`): Hub-readable metadata, the architecture of the model they describe, no local
paths, and scores filled in as a results table and as `model-index` results."""

import math

from huggingface_hub import ModelCard

from finevit_vl.model_card import USAGE_PATH, fill_model_card, without_local_paths, write_model_card


SCORES = {"finevit_countbench": {"acc": 0.75}, "finevit_ocrbench": {"ocrbench_score": 420.0, "ocrbench_kie": math.nan}}


def _card(tmp_path, tiny_qwen3):
    model, processor = tiny_qwen3
    folder = tmp_path / "final"
    processor.save_pretrained(folder)
    training = f"`finevit-vl train` run `{tmp_path}/run`: data `{{'path': '{tmp_path}/data/stage3/train.jsonl'}}`."
    return write_model_card(model, folder, "Tiny VL", "A test model.", training), model, processor


def test_card_describes_the_model_and_names_no_local_path(tmp_path, tiny_qwen3):
    path, model, processor = _card(tmp_path, tiny_qwen3)
    card = ModelCard.load(path)
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert card.data.model_name == "Tiny VL" and "finevit-vl" in card.data.tags
    vision, text = model.config.vision_config, model.config.text_config
    assert f"FineViT: native resolution, packed, 2D RoPE ({vision.num_hidden_layers} layers, width {vision.hidden_size}, patch {vision.patch_size})" in card.text
    assert f"images up to {processor.image_processor.max_pixels} pixels" in card.text  # the saved processor budget
    assert f"vocabulary {text.vocab_size})" in card.text and "not evaluated yet" in card.text
    assert str(tmp_path) not in card.content and f'from_pretrained("{USAGE_PATH}")' in card.text
    assert "…/stage3/train.jsonl" in card.text  # the informative end of the path is kept


def test_scores_fill_the_results_section_and_the_model_index(tmp_path, tiny_qwen3):
    path, _, _ = _card(tmp_path, tiny_qwen3)
    fill_model_card(path, SCORES)
    fill_model_card(path, SCORES)  # filling again replaces, never appends
    card = ModelCard.load(path)
    assert "not evaluated yet" not in card.text and card.text.count("<!-- results:start -->") == 1
    assert "| finevit_countbench | acc | 0.7500 |" in card.text and "| finevit_ocrbench | ocrbench_kie | n/a |" in card.text
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("finevit_countbench", "acc"): 0.75, ("finevit_ocrbench", "ocrbench_score"): 420.0}  # no NaN


def test_a_limited_run_is_marked_and_kept_out_of_the_metadata(tmp_path):
    """`finevit-vl eval --limit` scores a subset: the table says so and `model-index` gets nothing. A card written
    elsewhere keeps its other text; one without a results section gets it appended."""
    card_path = tmp_path / "README.md"
    card_path.write_text("# Tiny\n\nIntro.\n")
    fill_model_card(card_path, SCORES, limit=2)
    card = ModelCard.load(card_path)
    assert card.text.startswith("# Tiny\n\nIntro.\n\n## Evaluation\n\n<!-- results:start -->")
    assert "_Limited run (`limit=2` documents per task)" in card.text and not card.data.eval_results
    fill_model_card(card_path, SCORES)
    assert {r.dataset_type for r in ModelCard.load(card_path).data.eval_results} == {"finevit_countbench", "finevit_ocrbench"}


def test_local_paths_are_shortened_and_nothing_else():
    assert without_local_paths("run `/home/me/runs/x/stage3`, data '/tmp/a/data/sft/train.jsonl'") == (
        "run `…/x/stage3`, data '…/sft/train.jsonl'")
    kept = "https://huggingface.co/org/model, data/stage3/train.jsonl, 1/2 of the steps"
    assert without_local_paths(kept) == kept


def test_a_card_without_metadata_gets_none_from_a_limited_run(tmp_path):
    card_path = tmp_path / "README.md"
    card_path.write_text("# Tiny\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nFooter.\n")
    fill_model_card(card_path, SCORES, limit=2)
    text = card_path.read_text()
    assert text.startswith("# Tiny\n\n<!-- results:start -->\n| Task |") and text.endswith("<!-- results:end -->\n\nFooter.\n")
