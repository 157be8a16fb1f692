"""FineViT-VL: any-LLM composition, image-token merge, loss, generation with KV cache, tying, save/load, Auto classes."""

import pytest
import torch
from conftest import assert_greedy_continuation, random_image
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

import finevit_vl
from finevit_vl import FineViTVLForConditionalGeneration
from finevit_vl.tiny import build_tiny_model


def _prompt(processor, question: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("fixture", ["tiny_qwen3", "tiny_llama"])
def test_forward_loss_and_gradients_reach_every_module(fixture, request, images):
    model, processor = request.getfixturevalue(fixture)
    model = model.train()
    texts = [_prompt(processor, "How many circles?") + "3", _prompt(processor, "Read the text.", 2) + "hello"]
    inputs = processor(images=[images[0], images[1], images[2]], text=texts, padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        grads = [p.grad for p in getattr(model.model, part).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"{part} got no gradient"
        assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_text_config_class_follows_llm(tiny_qwen3, tiny_llama):
    assert tiny_qwen3[0].model.language_model.__class__.__name__ == "Qwen3Model"
    assert tiny_llama[0].model.language_model.__class__.__name__ == "LlamaModel"
    assert tiny_llama[1].chat_template.startswith("{{ bos_token }}")  # Llama-3 format
    assert "<|im_start|>" in tiny_qwen3[1].chat_template  # ChatML


def test_image_tokens_are_replaced_by_projected_features(tiny_qwen3, images):
    model, processor = tiny_qwen3
    inputs = processor(images=[images[0]], text=[_prompt(processor, "What is this?")])
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_tokens == int(inputs["image_grid_thw"].prod()) // model.config.spatial_merge_size**2
    with torch.no_grad():
        out = model(**inputs)
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert out.image_hidden_states.shape == (n_tokens, model.config.text_config.hidden_size)
    torch.testing.assert_close(out.image_hidden_states, features[0])


def test_mismatched_image_tokens_raise_with_both_counts(tiny_qwen3, images):
    model, processor = tiny_qwen3
    inputs = processor(images=[images[0], images[1]], text=[_prompt(processor, "Compare.", 2)])
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    first_image_features = int(inputs["image_grid_thw"][0].prod()) // model.config.spatial_merge_size**2
    with pytest.raises(ValueError, match=rf"{n_tokens} image tokens but the images produce {first_image_features} features"):
        model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"][: int(inputs["image_grid_thw"][0].prod())],
            image_grid_thw=inputs["image_grid_thw"][:1],
        )
    with pytest.raises(ValueError, match="2 image tokens .* 1 images"):
        processor(images=[images[0]], text=[_prompt(processor, "Compare.", 2)])


def test_dummy_image_weight_leaves_text_logits_unchanged(tiny_qwen3, images):
    model, processor = tiny_qwen3
    text_inputs = processor.tokenizer(["just text, no image"], return_tensors="pt")
    dummy = processor.image_processor([random_image(28, 28)])
    with torch.no_grad():
        plain = model(**text_inputs).logits
        with_dummy = model(**text_inputs, **dummy, image_token_weight=torch.zeros(())).logits
    torch.testing.assert_close(plain, with_dummy)


def test_vision_feature_layers_can_be_selected_and_concatenated(tokenizer, images):
    model, processor = build_tiny_model("qwen3", tokenizer=tokenizer, vision_feature_layer=[0, -1])
    config = model.config
    # two layers' features, each of a merge group's patches side by side
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * config.vision_config.hidden_size * config.spatial_merge_size**2
    inputs = processor(images=[images[0]], text=[_prompt(processor, "Hi")])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_generate_uses_cache_and_encodes_images_once(tiny_qwen3, images):
    model, processor = tiny_qwen3
    inputs = processor(images=[images[0]], text=[_prompt(processor, "Describe.")])
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    finally:
        handle.remove()
    assert len(calls) == 1, "the encoder must run once (prefill only)"
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)
    assert_greedy_continuation(model, inputs, cached, 6)


@pytest.mark.parametrize("cache_argument", ["past_key_values", "cache"])
def test_kv_cache_is_taken_under_either_name(tiny_qwen3, images, cache_argument):
    """transformers 5.24 renamed the KV cache `past_key_values` -> `cache`: the forward takes both names, returns the
    installed version's, and a cached step equals the full forward."""
    from finevit_vl.models.modeling_finevit_vl import CACHE_NAME

    model, processor = tiny_qwen3
    inputs = processor(images=[images[0]], text=[_prompt(processor, "Describe.")])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        full = model(**inputs).logits
        prefix = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"], use_cache=True)
        cache = getattr(prefix, CACHE_NAME)
        assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{cache_argument: cache})
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_batched_left_padded_generation_matches_one_by_one(tiny_qwen3, images):
    model, processor = tiny_qwen3
    prompts = [_prompt(processor, "How many?"), _prompt(processor, "Read all the text in the image, please, now.", 2)]
    image_sets = [[images[0]], [images[1], images[2]]]
    single = []
    for prompt, imgs in zip(prompts, image_sets):
        inputs = processor(images=imgs, text=[prompt])
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        single.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    batch = processor(images=image_sets, text=prompts, padding=True, padding_side="left")
    out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    batched = out[:, batch["input_ids"].shape[1]:].tolist()
    assert batched == single


def _sequence_log_prob(model, inputs, sequence: torch.Tensor) -> float:
    """Sum of the log-probabilities a full forward (with the image) gives the tokens of `sequence` after the prompt."""
    with torch.no_grad():
        logits = model(input_ids=sequence[None], attention_mask=torch.ones_like(sequence[None]),
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits[0]
    prompt_len = inputs["input_ids"].shape[1]
    log_probs = logits[prompt_len - 1 : -1].float().log_softmax(-1)
    return log_probs.gather(-1, sequence[prompt_len:, None]).sum().item()


def test_beam_search_scores_its_beams_with_the_image(tiny_qwen3, images):
    """Beam search expands the image inputs with the beams: each returned beam's score is its log-probability under
    a full forward with the image, beams come best first, and the prompt is kept."""
    model, processor = tiny_qwen3
    inputs = processor(images=[images[0]], text=[_prompt(processor, "Describe.")])
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=3, num_return_sequences=2,
                         length_penalty=0.0, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (2, prompt_len + 4)
    assert torch.equal(out.sequences[:, :prompt_len], inputs["input_ids"].expand(2, -1))
    assert not torch.equal(out.sequences[0], out.sequences[1])
    recomputed = [_sequence_log_prob(model, inputs, sequence) for sequence in out.sequences]
    torch.testing.assert_close(out.sequences_scores, torch.tensor(recomputed), atol=1e-4, rtol=1e-4)
    assert recomputed[0] >= recomputed[1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_qwen3, images):
    model, processor = tiny_qwen3
    inputs = processor(images=[images[0]], text=[_prompt(processor, "Describe.")])
    prompt_len = inputs["input_ids"].shape[1]
    fixed_length = {"max_new_tokens": 4, "min_new_tokens": 4}
    greedy = model.generate(**inputs, **fixed_length, do_sample=False)
    assert greedy.shape == (1, prompt_len + 4)
    torch.manual_seed(0)
    assert torch.equal(model.generate(**inputs, **fixed_length, do_sample=True, top_k=1), greedy)
    samples = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        samples.append(model.generate(**inputs, **fixed_length, do_sample=True, temperature=1.5, top_k=0, top_p=1.0))
    assert all(sample.shape == greedy.shape for sample in samples)
    assert torch.equal(samples[0], samples[1])  # same seed, same sample
    assert any(not torch.equal(sample, greedy) for sample in samples), "sampling never left the greedy path"


GPT2_TINY = {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 512}


@pytest.mark.parametrize(
    "llm, overrides, tie",
    [("qwen3", None, True), ("qwen3", None, False), ("gpt2", GPT2_TINY, True)],  # gpt2 names its embedding `wte`
)
def test_tied_and_untied_embeddings_save_and_load(tokenizer, tmp_path, images, llm, overrides, tie):
    model, processor = build_tiny_model(llm, tokenizer=tokenizer, tie_word_embeddings=tie, text_overrides=overrides)
    model.eval()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tie
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) is (not tie)  # noqa: SIM118 (safe_open has no __contains__)
    reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()) is tie
    inputs = AutoProcessor.from_pretrained(tmp_path)(images=[images[0]], text=[_prompt(processor, "Hi")])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded.eval()(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_auto_classes_and_vision2seq_alias(tiny_checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    assert isinstance(model, FineViTVLForConditionalGeneration)
    assert isinstance(finevit_vl.AutoModelForVision2Seq.from_pretrained(tiny_checkpoint), FineViTVLForConditionalGeneration)
    assert type(AutoModel.from_pretrained(tiny_checkpoint)).__name__ == "FineViTVLModel"
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(processor).__name__ == "FineViTVLProcessor"
    assert type(processor.image_processor).__name__ == "FineViTImageProcessor"


def test_image_text_to_text_pipeline(tiny_checkpoint, images):
    """The pipeline answers what `generate` on the processor's chat-formatted inputs answers."""
    pipe = pipeline("image-text-to-text", model=tiny_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "How many?"}]}]
    out = pipe(text=messages, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_full_text=False)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(images=[images[0]], text=[_prompt(processor, "How many?")])
    generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert len(generated) == 4
    expected = processor.decode(generated, skip_special_tokens=True)
    assert expected.strip(), "the tiny model decoded to nothing; the comparison would be vacuous"
    assert out[0]["generated_text"] == expected


def test_no_split_modules_cover_encoder_and_llm(tiny_qwen3):
    assert {"FineViTBlock", "Qwen3DecoderLayer"} <= set(tiny_qwen3[0]._no_split_modules)


def test_projector_position_features_start_at_zero_and_follow_token_order(tokenizer, images):
    from finevit_vl.models.modeling_finevit_vl import normalized_position_features

    plain, processor = build_tiny_model("qwen3", tokenizer=tokenizer, seed=3)
    with_positions, _ = build_tiny_model("qwen3", tokenizer=tokenizer, seed=3, projector_position_frequencies=4)
    inputs = processor(images=[images[0]], text=[_prompt(processor, "Where?")])
    with torch.no_grad():  # zero-initialised: enabling it changes nothing until trained
        torch.testing.assert_close(plain(**inputs).logits, with_positions(**inputs).logits)
    features = normalized_position_features(torch.tensor([[1, 4, 6]]), merge_size=2, num_frequencies=1)
    # 2x3 merged grid, row-major: token 1 is row 0 / col 1, token 3 is row 1 / col 0.
    angles = torch.atan2(features[:, :2], features[:, 2:]) / torch.pi  # (y, x) centres in [0, 1]
    torch.testing.assert_close(angles[1], torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(angles[3], torch.tensor([0.75, 1 / 6]))
