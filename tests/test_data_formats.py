"""Records in the formats users already have (LLaVA, ShareGPT / LLaMA-Factory; JSON arrays and JSONL; with and without
``<image>``; with a system turn) read by the sources and encoded exactly like the same record in our own schema."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from finevit_vl.data import BadRecordError, JsonlSource, load_record_images
from finevit_vl.data.collator import IGNORE_INDEX, SampleEncoder
from finevit_vl.data.formats import record_format, to_schema
from finevit_vl.tiny import build_tiny_model


SYSTEM = "You are a careful assistant."
QUESTIONS = ["What is in the picture?", "And its colour?"]
ANSWERS = ["A red square.", "Red."]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model(text_model_type="qwen3", max_pixels=56 * 56)[1]


def _turns(markers: bool, system: bool) -> list[dict]:
    """Our schema's turns; the question of the first turn carries the marker in the middle when ``markers``."""
    first = f"Look: <image>\n{QUESTIONS[0]}" if markers else QUESTIONS[0]
    turns = [{"role": "system", "content": SYSTEM}] if system else []
    for question, answer in zip([first, *QUESTIONS[1:]], ANSWERS):
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def _native(markers: bool, system: bool) -> dict:
    return {"id": "r0", "task": "conversation", "image": "red.png", "conversations": _turns(markers, system)}


def _llava(markers: bool, system: bool) -> dict:
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": speaker[t["role"]], "value": t["content"]} for t in _turns(markers, system)]
    return {"id": "r0", "image": "red.png", "conversations": turns}


def _sharegpt(markers: bool, system: bool) -> dict:
    return {"id": "r0", "messages": _turns(markers, system), "images": ["red.png"]}


def _llama_factory(markers: bool, system: bool) -> dict:
    """LLaMA-Factory's sharegpt layout: from/value turns, ``images`` and a top-level ``system``."""
    record = _llava(markers, system=False)
    record["images"] = [record.pop("image")]
    return {**record, "system": SYSTEM} if system else record


FORMATS = {"llava": _llava, "sharegpt": _sharegpt, "llama_factory": _llama_factory}


def _write(folder: Path, records: list, suffix: str) -> Path:
    Image.new("RGB", (56, 56), (200, 30, 30)).save(folder / "red.png")
    path = folder / f"train{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    else:
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("system", [False, True], ids=["no_system", "system"])
@pytest.mark.parametrize("markers", [False, True], ids=["no_marker", "marker"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_encodes_like_our_schema(tmp_path, processor, name, suffix, markers, system):
    path = _write(tmp_path, [FORMATS[name](markers, system)], suffix)
    [(record, location)] = list(JsonlSource(path))
    assert location == f"{path}:{2 if suffix == '.json' else 1}"
    encoder = SampleEncoder(processor, max_length=512)
    sample = encoder.encode_record(record, location)
    native = {**_native(markers, system), "_image_root": str(tmp_path)}
    expected = encoder.encode_record(native, location)
    assert torch.equal(sample.input_ids, expected.input_ids) and torch.equal(sample.labels, expected.labels)

    # Labels are the assistant answers (and their end-of-turn token) only; the system turn is in the prompt.
    supervised = processor.tokenizer.decode(sample.input_ids[sample.labels != IGNORE_INDEX])
    assert supervised == "".join(answer + "<|im_end|>" for answer in ANSWERS)
    text = processor.tokenizer.decode(sample.input_ids)
    assert (f"<|im_start|>system\n{SYSTEM}<|im_end|>" in text) == system
    # The image goes where the marker is, else first in the first user turn (never into the system turn).
    image_at = text.index(processor.image_token)
    assert text.index(QUESTIONS[0]) > image_at
    assert (text.index("Look:") < image_at) if markers else text[:image_at].endswith("<|im_start|>user\n")
    assert not system or text.index(SYSTEM) < image_at


def test_text_only_and_multi_image_records(tmp_path, processor):
    for size, name in (((56, 56), "a.png"), ((64, 48), "b.png")):
        Image.new("RGB", size, "blue").save(tmp_path / name)
    records = [
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Left, then "},
                                                    {"type": "image"}, {"type": "text", "text": "right?"}]},
                      {"role": "assistant", "content": "Both blue."}], "images": ["a.png", "b.png"]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    encoder = SampleEncoder(processor, max_length=512)
    samples = [encoder.encode_record(record, location) for record, location in JsonlSource(path)]
    assert [sample.num_images for sample in samples] == [0, 2]
    assert samples[1].location == f"{path}:2 (id=mixed.jsonl:2)"  # no id in the record: file name and line
    text = processor.tokenizer.decode(samples[1].input_ids)
    assert text.index("Left, then") < text.rindex(processor.image_token) < text.index("right?")


def test_unknown_format_names_the_file_line_and_the_accepted_formats(tmp_path, processor):
    path = _write(tmp_path, [_llava(True, False), {"id": "q1", "question": "What?", "answer": "Red."}], ".json")
    (good, good_location), (bad, bad_location) = list(JsonlSource(path))
    load_record_images(good, good_location)
    with pytest.raises(BadRecordError) as caught:
        load_record_images(bad, bad_location)
    message = str(caught.value)
    line = max(number for number, text in enumerate(path.read_text().splitlines(), start=1) if text == "  {")
    assert message.startswith(f"{path}:{line} (id=q1): record with keys ['answer', 'id', 'question'] is in none of")
    assert all(name in message for name in ("FineViT-VL", "LLaVA", "ShareGPT")) and "Nearest: FineViT-VL" in message
    assert caught.value.kind == "schema"


def test_unreadable_turns_say_what_is_wrong():
    tool = {"id": "x", "conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"}]}
    with pytest.raises(BadRecordError, match=r"f\.jsonl:3 \(id=x\): LLaVA record: conversations\[1\] has role 'function_call'"):
        to_schema(tool, "f.jsonl:3")
    with pytest.raises(BadRecordError, match=r"Nearest: LLaVA, but its 'conversations' must be a non-empty list of"):
        to_schema({"conversations": [{"speaker": "human", "text": "Hi"}]}, "f.jsonl:4")
    assert record_format(_native(False, False)) == "FineViT-VL" and record_format({"messages": []}) == "ShareGPT"


def test_system_turn_only_first_and_without_images(tmp_path):
    record = _native(True, True)
    record["conversations"] = [record["conversations"][1], record["conversations"][0], *record["conversations"][2:]]
    with pytest.raises(BadRecordError, match=r"conversations\[1\]\.role is 'system'.*optional first system turn"):
        load_record_images({**record, "_image_root": str(tmp_path)}, "x.jsonl:1")
    record = _native(False, True)
    record["conversations"][0]["content"] = "<image> " + SYSTEM
    with pytest.raises(BadRecordError, match=r"'<image>' may only appear in user turns"):
        load_record_images(record, "x.jsonl:1")


def test_json_array_errors_sharding_and_extra_keys(tmp_path):
    records = [{**_llava(False, False), "id": f"r{i}", "source": "coco"} for i in range(5)]
    path = _write(tmp_path, records, ".json")
    source = JsonlSource(path)
    assert len(source) == 5
    assert [r["id"] for r, _ in source.shard(1, 2)] == ["r1", "r3"]
    assert all(r["meta"] == {"source": "coco"} for r, _ in source)

    text = path.read_text()
    broken = tmp_path / "broken.json"
    broken.write_text(text.replace('"id": "r2"', '"id": r2', 1))
    pairs = list(JsonlSource(broken))
    assert [r.get("id") for r, _ in pairs[:2]] == ["r0", "r1"] and len(pairs) == 3
    starts = [number for number, line in enumerate(text.splitlines(), start=1) if line == "  {"]
    assert [location for _, location in pairs] == [f"{broken}:{line}" for line in starts[:3]]
    assert pairs[2][0]["_error"].startswith("malformed JSON") and "the rest of the array is not read" in pairs[2][0]["_error"]
