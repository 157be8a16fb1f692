"""Tokenization with the chat template, assistant-only labels, bad samples and collation (`finevit_vl.data.collator`)."""

import json

import pytest
import torch
from PIL import Image

from finevit_vl import prompts
from finevit_vl.data import BadRecordError, JsonlSource
from finevit_vl.data.collator import IGNORE_INDEX, SampleEncoder, collate_rows, dummy_image_inputs
from finevit_vl.models.chat_templates import with_image_placeholder
from finevit_vl.tiny import build_tiny_model


def _messages(answers: list[str], with_image: bool = True) -> list[dict]:
    messages = []
    for index, answer in enumerate(answers):
        content = [{"type": "image"}] if with_image and index == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": f"Question {index}?"}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _supervised_spans(sample) -> list[list[int]]:
    """Runs of consecutive supervised tokens."""
    spans, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("text_model_type, end_of_turn", [("qwen3", "<|im_end|>"), ("llama", "<|eot_id|>")])
def test_labels_are_exactly_the_assistant_answers(text_model_type, end_of_turn):
    _, processor = build_tiny_model(text_model_type=text_model_type, max_pixels=56 * 56)
    encoder = SampleEncoder(processor, max_length=512)
    answers = ["A red circle [12, 40, 300, 512].", "7", "two words"]
    sample = encoder.encode_messages(_messages(answers), [Image.new("RGB", (64, 48), (200, 30, 30))])

    decoded = [processor.tokenizer.decode(span) for span in _supervised_spans(sample)]
    assert decoded == [answer + end_of_turn for answer in answers]
    assert int((sample.input_ids == processor.image_token_id).sum()) == sample.image_grid_thw.prod(-1).item() // processor.image_processor.merge_size**2
    assert sample.labels[sample.input_ids == processor.image_token_id].eq(IGNORE_INDEX).all()


def test_input_ids_match_the_processor():
    _, processor = build_tiny_model(max_pixels=84 * 84)
    encoder = SampleEncoder(processor, max_length=512)
    messages = _messages(["a blue square"])
    images = [Image.new("RGB", (100, 70), (20, 30, 200))]
    sample = encoder.encode_messages(messages, images)
    reference = processor(images=images, text=[processor.apply_chat_template(messages, tokenize=False)], return_tensors="pt")
    assert torch.equal(sample.input_ids, reference["input_ids"][0])
    assert torch.equal(sample.pixel_values, reference["pixel_values"])
    assert torch.equal(sample.image_grid_thw, reference["image_grid_thw"])


def test_too_long_sample_is_rejected_not_truncated(tmp_path):
    _, processor = build_tiny_model(max_pixels=112 * 112)
    Image.new("RGB", (112, 112), "white").save(tmp_path / "a.png")
    record = {"id": "r1", "image": "a.png", "task": "caption", "caption": "white " * 40}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    (record, location), = list(JsonlSource(tmp_path / "d.jsonl"))
    with pytest.raises(BadRecordError, match=r"d\.jsonl:1 \(id=r1\).*after image expansion.*not truncated"):
        SampleEncoder(processor, max_length=40).encode_record(record, location)
    assert SampleEncoder(processor, max_length=512).encode_record(record, location).length > 40


def test_boxes_are_rendered_at_collate_time(tmp_path):
    _, processor = build_tiny_model(max_pixels=56 * 56)
    Image.new("RGB", (200, 100), "white").save(tmp_path / "a.png")
    record = {"id": "g", "image": "a.png", "task": "grounding", "grounding": [{"expression": "the dot", "box": [20, 10, 100, 50]}],
              "_image_root": str(tmp_path)}
    encoder = SampleEncoder(processor, max_length=512, box_format="int1000")
    sample = encoder.encode_record(record, "mem:1")
    (answer,) = _supervised_spans(sample)
    assert processor.tokenizer.decode(answer) == "[100, 100, 500, 500]<|im_end|>"
    norm = SampleEncoder(processor, max_length=512, box_format="norm1").encode_record(record, "mem:1")
    assert processor.tokenizer.decode(_supervised_spans(norm)[0]) == "[0.1, 0.1, 0.5, 0.5]<|im_end|>"
    prompt = processor.tokenizer.decode(sample.input_ids[sample.labels == IGNORE_INDEX])
    assert prompts.CAPTION_TO_BOX.format(text="the dot") in prompt


# An LLM's own template (Qwen2.5-style): string contents only, no {% generation %} blocks.
OWN_CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def test_an_llms_own_template_gets_the_image_and_the_same_assistant_labels():
    _, processor = build_tiny_model(max_pixels=56 * 56)
    messages = [{"role": "system", "content": "Be brief."}, *_messages(["two", "a red one"])]
    image = [Image.new("RGB", (56, 56), "red")]
    ours = SampleEncoder(processor, max_length=256).encode_messages(messages, image)
    processor.chat_template = with_image_placeholder(OWN_CHATML, processor.image_token)
    own = SampleEncoder(processor, max_length=256).encode_messages(messages, image)
    assert torch.equal(own.input_ids, ours.input_ids)  # the image token lands where the user put it
    assert torch.equal(own.labels, ours.labels)  # found turn by turn, the same assistant tokens as the marked template


def test_a_template_that_rewrites_earlier_turns_is_refused():
    _, processor = build_tiny_model()
    processor.chat_template = ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}FINAL {% endif %}"
                               "{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}{% endfor %}")
    encoder = SampleEncoder(processor, max_length=64)
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ValueError, match="turn by turn"):
        encoder.encode_messages(turns)


def test_text_only_batch_gets_a_zero_weighted_dummy_image():
    model, processor = build_tiny_model()
    encoder = SampleEncoder(processor, max_length=128)
    samples = [encoder.encode_messages(_messages([answer], with_image=False)) for answer in ("yes", "no, it is not")]
    batch = collate_rows([[s] for s in samples], processor.tokenizer.pad_token_id, dummy_image_inputs(processor))
    assert batch["image_token_weight"].item() == 0 and batch["image_grid_thw"].shape == (1, 3)  # one small image
    mask = (batch["segment_ids"] >= 0).long()
    with_dummy = model(input_ids=batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"], image_token_weight=batch["image_token_weight"])
    text_only = model(input_ids=batch["input_ids"], attention_mask=mask)
    torch.testing.assert_close(with_dummy.logits, text_only.logits, rtol=0, atol=0)
    with_dummy.logits.sum().backward()  # the vision tower is part of the graph on every rank
    assert model.model.vision_tower.patch_embed.proj.weight.grad is not None


def test_collate_pads_and_numbers_samples():
    _, processor = build_tiny_model(max_pixels=56 * 56)
    encoder = SampleEncoder(processor, max_length=256)
    image = Image.new("RGB", (56, 56), "red")
    a = encoder.encode_messages(_messages(["one"]), [image])
    b = encoder.encode_messages(_messages(["two three four five"], with_image=False))
    batch = collate_rows([[a, b], [a]], processor.tokenizer.pad_token_id, dummy_image_inputs(processor))
    assert batch["input_ids"].shape == (2, a.length + b.length)
    assert batch["position_ids"][0, a.length].item() == 0 and batch["segment_ids"][0, a.length].item() == 1
    assert batch["sample_ids"].max().item() == 2 and batch["sample_ids"][1, a.length:].eq(-1).all()
    # a's image once per row it is in, in row order; b has none, and real images need no dummy-image weight
    assert torch.equal(batch["image_grid_thw"], torch.cat([a.image_grid_thw, a.image_grid_thw]))
    assert torch.equal(batch["pixel_values"], torch.cat([a.pixel_values, a.pixel_values]))
    assert "image_token_weight" not in batch
