"""`build_finevit_vl` with LLMs of every common family: the head, embeddings and tying come from the LLM whatever
their names, and without images the FineViT-VL is that LLM."""

import copy

import pytest
import torch
from conftest import assert_greedy_continuation, random_image
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from finevit_vl.assembly import build_finevit_vl


SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
FAMILIES = {
    "qwen3": {**SMALL, "num_key_value_heads": 2, "head_dim": 16},
    "qwen2": {**SMALL, "num_key_value_heads": 2},
    "llama": {**SMALL, "num_key_value_heads": 2},
    "mistral": {**SMALL, "num_key_value_heads": 2, "head_dim": 16},
    "gemma": {**SMALL, "num_key_value_heads": 1, "head_dim": 16},
    "gemma2": {**SMALL, "num_key_value_heads": 2, "head_dim": 16, "final_logit_softcapping": 3.0},
    "gemma3_text": {**SMALL, "num_key_value_heads": 2, "head_dim": 16, "final_logit_softcapping": 3.0},
    "phi3": {**SMALL, "num_key_value_heads": 2, "pad_token_id": 0},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "gpt_neox": {**SMALL, "tie_word_embeddings": False},
}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_llm_family_keeps_its_head_and_is_the_llm_on_text(tokenizer, tmp_path, model_type):
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type], vocab_size=len(tokenizer))
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config).eval()
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    build_finevit_vl("finevit-test", str(tmp_path / "llm"), str(tmp_path / "vl"), max_pixels=84 * 84)

    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "vl", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    assert torch.equal(model.lm_head.weight[: config.vocab_size], llm.get_output_embeddings().weight)
    assert model.config.tie_word_embeddings == llm.config.tie_word_embeddings
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., : config.vocab_size], llm(ids).logits)
    processor = AutoProcessor.from_pretrained(tmp_path / "vl")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    inputs = processor(images=[random_image(70, 90)],
                       text=[processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)])
    out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert_greedy_continuation(model, inputs, out, 2)


GEMMA_STYLE = ("{{ bos_token }}{%- for message in messages %}{%- set role = 'model' if message['role'] == 'assistant' "
               "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
               "{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}")


def test_the_llms_own_chat_template_is_kept_with_the_image_placeholder(tokenizer, tmp_path):
    from finevit_vl.data.collator import IGNORE_INDEX, SampleEncoder

    config = AutoConfig.for_model("gemma", **FAMILIES["gemma"], vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llm")
    own = copy.deepcopy(tokenizer)  # the session's tokenizer stays template-free
    own.chat_template = GEMMA_STYLE
    own.save_pretrained(tmp_path / "llm")
    build_finevit_vl("finevit-test", str(tmp_path / "llm"), str(tmp_path / "vl"), max_pixels=84 * 84)
    processor = AutoProcessor.from_pretrained(tmp_path / "vl")
    assert processor.chat_template.endswith(GEMMA_STYLE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "three"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert f"<start_of_turn>user\n{processor.image_token}How many?<end_of_turn>\n<start_of_turn>model\nthree" in text
    sample = SampleEncoder(processor, max_length=256).encode_messages(messages, [random_image(70, 90)])
    supervised = processor.tokenizer.decode(sample.input_ids[sample.labels != IGNORE_INDEX])
    assert supervised == "three<end_of_turn>"  # assistant tokens found turn by turn, without {% generation %}
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "vl")
    assert processor.tokenizer.eos_token_id in model.generation_config.eos_token_id


def test_the_shipped_cpu_config_trains_gemma2_which_has_no_sdpa(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from finevit_vl.data.synthetic import make_data

    make_data(tmp_path / "data", seed=0, train_per_task=4, eval_per_task=2, families=("counting",))
    config = Path(__file__).resolve().parents[1] / "train_configs" / "tiny_cpu_stage3.yaml"
    text = json.dumps({**FAMILIES["gemma2"], "max_position_embeddings": 2048})
    result = subprocess.run(
        [sys.executable, "-m", "finevit_vl.train", str(config), f"run_dir={tmp_path / 'run'}", "model.text_model_type=gemma2",
         f"model.text_overrides={text}", f"data.train.path={tmp_path / 'data/stage3/train.jsonl'}",
         f"data.eval.path={tmp_path / 'data/stage3/eval.jsonl'}", "train.max_steps=2", "eval.every=0",
         "train.checkpoint_every=2"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not support it; its LLM runs with eager attention" in result.stderr
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "final")
    assert final.config.text_config.model_type == "gemma2"
