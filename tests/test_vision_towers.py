"""Every supported vision tower in a FineViT-VL: build from saved parts, Auto loading, generate, pipeline, remote code,
text-only equivalence, packing, freezing, LoRA, gradient checkpointing, and image-token counts."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import WITHOUT_PACKAGE, assert_greedy_continuation, random_image
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

from finevit_vl.assembly import build_finevit_vl
from finevit_vl.data.collator import IMAGE_INPUT_NAMES, SampleEncoder, collate_rows, dummy_image_inputs
from finevit_vl.data.packing import attention_inputs, pack_rows
from finevit_vl.encoders import preset_config, tower_image_processor
from finevit_vl.models import FineViTVLConfig
from finevit_vl.models.vision_adapters import build_vision_tower
from finevit_vl.models.vision_tower_specs import num_image_tokens
from finevit_vl.tiny import TINY_TEXT_CONFIGS
from finevit_vl.train.freeze import apply_freeze, unused_vision_modules
from finevit_vl.train.loss import per_sample_losses


TOWERS = ["finevit", "qwen2-vl", "qwen2.5-vl", "siglip2-naflex", "siglip", "clip", "dinov2"]
MAX_PIXELS = 112 * 112
SIZES = [(100, 150), (84, 84), (150, 62)]  # (height, width): wide, square, tall


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("llm")
    config = AutoConfig.for_model("qwen3", **TINY_TEXT_CONFIGS["qwen3"], vocab_size=len(tokenizer))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, llm_dir):
    """Per tower: a saved random tower (with its image processor) -> `build_finevit_vl` -> a saved FineViT-VL."""
    out = {}
    for family in TOWERS:
        root = tmp_path_factory.mktemp(family)
        config = preset_config(f"{family}-test", MAX_PIXELS)
        torch.manual_seed(1)
        tower = build_vision_tower(config)
        tower.save_pretrained(root / "tower")
        tower_image_processor(config, MAX_PIXELS, 56 * 56, 2).save_pretrained(root / "tower")
        build_finevit_vl(str(root / "tower"), str(llm_dir), str(root / "vl"), max_pixels=MAX_PIXELS)
        out[family] = {"tower": tower, "dir": root / "vl"}
    return out


def _chat(processor, question: str = "How many?") -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("family", TOWERS)
def test_build_loads_every_weight_and_is_the_llm_on_text(built, llm_dir, family):
    model, info = AutoModelForImageTextToText.from_pretrained(built[family]["dir"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    source_tower = built[family]["tower"].state_dict()
    loaded_tower = model.model.vision_tower.state_dict()
    assert source_tower.keys() == loaded_tower.keys()
    for name, tensor in source_tower.items():
        assert torch.equal(tensor, loaded_tower[name]), name
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    ids = torch.randint(0, llm.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits[..., : llm.config.vocab_size]
        torch.testing.assert_close(logits, llm(ids).logits)


@pytest.mark.parametrize("family", TOWERS)
def test_generate_and_pipeline_on_images_of_several_sizes(built, family):
    model = AutoModelForImageTextToText.from_pretrained(built[family]["dir"]).eval()
    processor = AutoProcessor.from_pretrained(built[family]["dir"])
    assert type(processor.image_processor).__name__ == type(tower_image_processor(
        model.config.vision_config, MAX_PIXELS, 56 * 56, 2)).__name__  # the tower's own image processor, reloaded
    for index, (height, width) in enumerate(SIZES):
        inputs = processor(images=[random_image(height, width, index)], text=[_chat(processor)])
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert_greedy_continuation(model, inputs, out, 3)
    generator = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": random_image(90, 120)},
                                             {"type": "text", "text": "How many?"}]}]
    result = generator(text=messages, max_new_tokens=2, do_sample=False)
    assert result[0]["generated_text"][-1]["role"] == "assistant"


REMOTE_SCRIPT = WITHOUT_PACKAGE + """
import torch
from transformers import AutoModelForImageTextToText
for name, checkpoint, inputs, out in JOBS:
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(**torch.load(inputs)).logits, out)
    print(name, type(model).__module__)
"""


def test_every_tower_loads_without_the_package_with_identical_logits(built, tmp_path):
    jobs, expected = [], {}
    for family in TOWERS:
        model = AutoModelForImageTextToText.from_pretrained(built[family]["dir"]).eval()
        processor = AutoProcessor.from_pretrained(built[family]["dir"])
        inputs = dict(processor(images=[random_image(100, 150)], text=[_chat(processor)]))
        torch.save(inputs, tmp_path / f"{family}.pt")
        with torch.no_grad():
            expected[family] = model(**inputs).logits
        jobs.append((family, str(built[family]["dir"]), str(tmp_path / f"{family}.pt"), str(tmp_path / f"{family}.out")))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"REPO={repo!r}\nJOBS={jobs!r}\n" + REMOTE_SCRIPT
    env = {**os.environ, "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("transformers_modules") == len(TOWERS), result.stdout
    for family in TOWERS:
        assert torch.equal(torch.load(tmp_path / f"{family}.out"), expected[family]), family


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


@pytest.mark.parametrize("family", TOWERS)
def test_packed_rows_give_the_unpacked_per_sample_losses(built, family):
    model = AutoModelForImageTextToText.from_pretrained(built[family]["dir"]).eval()
    processor = AutoProcessor.from_pretrained(built[family]["dir"])
    encoder = SampleEncoder(processor, max_length=400)
    samples = [encoder.encode_messages(_conversation(f"What is shape {i}?", "a red circle " * (i + 1)),
                                       [random_image(*SIZES[i % 3], seed=i)]) for i in range(5)]
    dummy = dummy_image_inputs(processor)

    def losses(batch):  # as the trainer runs a micro-batch
        images = {name: batch[name] for name in IMAGE_INPUT_NAMES if name in batch}
        masks = attention_inputs(batch["segment_ids"], batch["position_ids"])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], use_cache=False, **images, **masks).logits
        return per_sample_losses(logits, batch["labels"], batch["sample_ids"])

    alone = torch.cat([losses(collate_rows([[s]], processor.tokenizer.pad_token_id, dummy)) for s in samples])
    rows = pack_rows([s.length for s in samples], 200)
    assert len(rows) < len(samples)
    packed_batch = collate_rows([[samples[i] for i in row] for row in rows], processor.tokenizer.pad_token_id, dummy)
    packed = losses(packed_batch)
    order = [i for row in rows for i in row]
    torch.testing.assert_close(packed, alone[order], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", TOWERS)
def test_freezing_lora_and_gradient_checkpointing_work_for_every_tower(built, family):
    from peft import LoraConfig, get_peft_model

    from finevit_vl.train.config import ModulesConfig

    model = AutoModelForImageTextToText.from_pretrained(built[family]["dir"])
    processor = AutoProcessor.from_pretrained(built[family]["dir"])
    batch = processor(images=[random_image(100, 150)], text=[_chat(processor) + "two"])
    labels = batch["input_ids"].clone()

    modules = ModulesConfig()
    modules.vision_tower.train = True
    apply_freeze(model, modules)  # everything trains, except what the tower's spec says the VL model never runs
    unused = unused_vision_modules(model)
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, f"{name} is trainable but gets no gradient"
        else:
            assert any(f".{prefix}." in f".{name}." for prefix in unused), f"{name} frozen though used"
    model.zero_grad()
    model.activation_checkpointing_enable({"use_reentrant": False})
    torch.testing.assert_close(model(**batch, labels=labels).loss, loss)

    modules.vision_tower.train = False
    apply_freeze(model, modules)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".vision_tower." in f".{n}")
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    lora(**batch, labels=labels).loss.backward()
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


@pytest.mark.parametrize("family, image_size, expected_grid", [
    ("clip", 98, (7, 7)),     # CLS + 49 patches: an odd grid, padded to 8 x 8 -> 16 tokens
    ("dinov2", 112, (8, 8)),  # CLS + 64 patches -> 16 tokens
    ("siglip", 80, (5, 5)),   # no prefix token, odd grid -> 9 tokens
])
def test_fixed_towers_image_token_count_follows_the_grid(tokenizer, family, image_size, expected_grid):
    from finevit_vl.tiny import build_tiny_model

    model, processor = build_tiny_model(vision_preset=f"{family}-test", tokenizer=tokenizer,
                                        vision_overrides={"image_size": image_size})
    processor.image_processor.size = {"height": image_size, "width": image_size}
    inputs = processor(images=[random_image(60, 90)], text=[_chat(processor)])
    assert inputs["image_grid_thw"].tolist() == [[1, *expected_grid]]
    expected_tokens = (-(-expected_grid[0] // 2)) * (-(-expected_grid[1] // 2))
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == expected_tokens
    with torch.no_grad():
        tower_tokens = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[1]
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    spec_prefix = {"clip": 1, "dinov2": 1, "siglip": 0}[family]
    assert tower_tokens == expected_grid[0] * expected_grid[1] + spec_prefix
    assert [f.shape[0] for f in features] == [expected_tokens]
    model(**inputs)  # placeholders and features line up


@pytest.mark.parametrize("family", ["finevit", "qwen2-vl", "siglip2-naflex"])
def test_native_towers_image_token_count_follows_each_images_grid(built, family):
    model = AutoModelForImageTextToText.from_pretrained(built[family]["dir"]).eval()
    processor = AutoProcessor.from_pretrained(built[family]["dir"])
    images = [random_image(height, width, i) for i, (height, width) in enumerate(SIZES)]
    inputs = processor(images=images, text=[_chat(processor) * 3])
    grids = inputs["image_grid_thw"]
    assert len(set(map(tuple, grids.tolist()))) == 3  # native resolution: a grid per aspect ratio
    counts = num_image_tokens(grids, 2)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == sum(counts)
    with torch.no_grad():
        features = model.get_image_features(**{k: inputs[k] for k in IMAGE_INPUT_NAMES if k in inputs}).pooler_output
    assert [f.shape[0] for f in features] == counts
    if family == "siglip2-naflex":  # odd patch grids happen here (patch 16, no merge-aware resize)
        assert [int(n) for n in inputs["pixel_attention_mask"].sum(-1)] == grids.prod(-1).tolist()


def test_unknown_vision_model_type_is_refused_by_name(tokenizer, llm_dir):
    text = AutoConfig.for_model("qwen3", **TINY_TEXT_CONFIGS["qwen3"], vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=r"'vit'.*supported.*siglip2_vision_model"):
        FineViTVLConfig(vision_config={"model_type": "vit", "hidden_size": 32}, text_config=text)
    config = FineViTVLConfig(vision_config={"model_type": "siglip_vision_model", "hidden_size": 32}, text_config=text)
    assert config.vision_config.model_type == "siglip_vision_model"  # a dict keeps its own model type
    with pytest.raises(ValueError, match="neither a directory nor an encoder preset"):
        build_finevit_vl("vit-huge", str(llm_dir))


def test_qwen2_5_window_order_is_restored_to_merge_group_order(tokenizer):
    from finevit_vl.tiny import build_tiny_model

    model, processor = build_tiny_model(vision_preset="qwen2.5-vl-test", tokenizer=tokenizer, max_pixels=336 * 336)
    inputs = processor.process_images([random_image(300, 200), random_image(120, 330, 1)])
    assert (inputs["image_grid_thw"][:, 1:].amax(-1) > 8).all()  # several 112 px attention windows per image
    tower = model.model.vision_tower
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).last_hidden_state
        own = tower(hidden_states=inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        # The tower un-permutes only its own merger output; merging our features must give exactly that.
        torch.testing.assert_close(tower.merger(features), own.pooler_output, rtol=0, atol=1e-6)
        assert not torch.allclose(features, own.last_hidden_state)  # the raw output really is window-ordered


def test_another_tower_is_added_with_a_spec(tokenizer):
    from transformers import ViTConfig, ViTImageProcessor

    from finevit_vl.models import (
        VISION_TOWER_SPECS,
        FineViTVLForConditionalGeneration,
        FineViTVLProcessor,
        VisionTowerSpec,
        register_vision_tower,
    )
    from finevit_vl.models.chat_templates import build_chat_template

    register_vision_tower("vit", VisionTowerSpec("fixed", num_prefix_tokens=1, unused_modules=("pooler",)))
    try:
        vision = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=84, patch_size=14)
        text = AutoConfig.for_model("qwen3", **TINY_TEXT_CONFIGS["qwen3"], vocab_size=len(tokenizer))
        model = FineViTVLForConditionalGeneration(FineViTVLConfig(
            vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"))).eval()
        processor = FineViTVLProcessor(ViTImageProcessor(size={"height": 84, "width": 84}), tokenizer,
                                       chat_template=build_chat_template("chatml", "<|image|>"), patch_size=14)
        inputs = processor(images=[random_image(60, 90)], text=[_chat(processor)])
        assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 9  # 6 x 6 patches, CLS dropped
        with torch.no_grad():
            assert model(**inputs).logits.isfinite().all()
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".pooler." in n)
    finally:
        VISION_TOWER_SPECS.pop("vit")
