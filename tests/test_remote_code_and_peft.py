"""Loading without the package (trust_remote_code), PEFT LoRA, bitsandbytes quantization, assembly from parts."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WITHOUT_PACKAGE, assert_greedy_continuation
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
)

from finevit_vl import FineViTConfig, FineViTModel
from finevit_vl.parameters import count_parameters
from finevit_vl.tiny import TINY_TEXT_CONFIGS


REMOTE_SCRIPT = WITHOUT_PACKAGE + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    try:
        AutoModelForImageTextToText.from_pretrained(CKPT)
        raise SystemExit("loaded without trust_remote_code")
    except ValueError as error:
        assert "trust_remote_code" in str(error)
    model = AutoModelForImageTextToText.from_pretrained(CKPT, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(CKPT, trust_remote_code=True)
    inputs = torch.load(INPUTS)
    with torch.no_grad():
        torch.save(model(**inputs).logits, OUT)
    print(type(model).__module__, type(processor).__name__)
    """
)


def test_checkpoint_loads_without_the_package_with_identical_logits(tiny_checkpoint, tmp_path, images):
    with open(os.path.join(tiny_checkpoint, "config.json")) as file:
        config = json.load(file)
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_finevit_vl.FineViTVLForConditionalGeneration"
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = dict(processor(images=[images[0]], text=[f"{processor.image_token}How many?"]))
    torch.save(inputs, tmp_path / "inputs.pt")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"REPO={repo!r}\nCKPT={tiny_checkpoint!r}\nINPUTS={str(tmp_path / 'inputs.pt')!r}\nOUT={str(tmp_path / 'out.pt')!r}\n" + REMOTE_SCRIPT
    env = {**os.environ, "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and "FineViTVLProcessor" in result.stdout
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_lora_trains_saves_reloads_and_merges(tiny_checkpoint, tmp_path, images):
    peft = pytest.importorskip("peft")
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)|.*vision_tower.*\.qkv", init_lora_weights=False
    )
    peft_model = peft.get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("vision_tower" in n for n in trainable) and any("language_model" in n for n in trainable)
    inputs = processor(images=[images[0]], text=[f"{processor.image_token}How many? 3"])
    labels = inputs["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_checkpoint), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(final(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
    # The model card of a merged export counts the merged model, not the LoRA layers attached while training.
    total = sum(p.numel() for p in final.parameters())
    assert count_parameters(peft_model.base_model.model) == total == count_parameters(final)
    assert sum(p.numel() for p in peft_model.base_model.model.parameters()) > total


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantizes_only_the_llm(tiny_checkpoint, images, bits):
    pytest.importorskip("bitsandbytes")
    quantization = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, quantization_config=quantization)
    linear_types = lambda part: {type(m).__name__ for n, m in model.named_modules() if part in n and isinstance(m, torch.nn.Linear)}
    assert linear_types("language_model.layers") == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    assert linear_types("vision_tower") == {"Linear"} and linear_types("multi_modal_projector") == {"Linear"}
    # the model card counts the values a quantized weight holds (4-bit: two per stored byte), as unquantized
    assert count_parameters(model) == count_parameters(AutoModelForImageTextToText.from_pretrained(tiny_checkpoint))
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(images=[images[0]], text=[f"{processor.image_token}How many?"])
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert_greedy_continuation(model, inputs, out, 3)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_build_from_parts_keeps_both_checkpoints(tokenizer, tmp_path, model_type, images):
    text_config = AutoConfig.for_model(model_type, **TINY_TEXT_CONFIGS[model_type], vocab_size=len(tokenizer) - 5,
                                       tie_word_embeddings=model_type == "qwen3")
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(text_config).eval()
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    vit = FineViTModel(FineViTConfig.from_preset("finevit-test")).eval()
    vit.save_pretrained(tmp_path / "vit")
    from finevit_vl.cli import main

    assert main(["build", "--vision", str(tmp_path / "vit"), "--llm", str(tmp_path / "llm"), "--out", str(tmp_path / "vl")]) == 0
    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "vl", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(tmp_path / "vl")
    assert processor.image_token in processor.tokenizer.get_vocab()
    assert model.get_input_embeddings().num_embeddings >= len(processor.tokenizer)
    for (name, a), b in zip(vit.state_dict().items(), model.model.vision_tower.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, text_config.vocab_size, (1, 10))
    with torch.no_grad():  # without images, FineViT-VL is exactly the original LLM
        torch.testing.assert_close(model.eval()(input_ids=ids).logits[..., : text_config.vocab_size], llm(ids).logits)
    inputs = processor(images=[images[0]], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True, tokenize=False)])
    out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert_greedy_continuation(model, inputs, out, 2)
