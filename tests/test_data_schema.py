"""The record schema (validation messages) and rendering of records into chat messages."""

import copy
import random

import pytest

from finevit_vl import prompts
from finevit_vl.data import BadRecordError, record_images, record_to_messages, validate_record


WHERE = "data/train.jsonl:17"


def _region_record() -> dict:
    return {
        "id": "abc",
        "image": "img/a.png",
        "task": "region",
        "regions": [{"box": [10, 20, 110, 70], "text": "a red circle"}, {"box": [0, 0, 50, 50], "text": "a cat"}],
    }


def _conversation_record() -> dict:
    return {
        "id": "conv",
        "image": ["a.png", "b.png"],
        "task": "conversation",
        "conversations": [
            {"role": "user", "content": "<image>\nCompare with <image>\nWhat is at <box>?"},
            {"role": "assistant", "content": "A dog, at <box>."},
        ],
        "boxes": [[0, 0, 10, 10], [50, 25, 100, 75]],
        "width": 100,
        "height": 100,
    }


VALID_RECORDS = [
    {"id": "c", "image": "a.png", "task": "caption", "caption": "A red circle."},
    _region_record(),
    {
        "id": "o",
        "image": "a.png",
        "task": "ocr",
        "ocr": [{"text": "hi", "box": [1, 1, 5, 5]}, {"text": "yo", "quad": [0, 0, 4, 0, 4, 4, 0, 4]}],
    },
    {"id": "g", "image": "a.png", "task": "grounding", "grounding": [{"expression": "the dog", "box": [1, 2, 3, 4]}]},
    _conversation_record(),
    {
        "id": "t",
        "image": None,
        "task": "conversation",
        "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    },
]


@pytest.mark.parametrize("record", VALID_RECORDS, ids=lambda r: r["task"] + ":" + r["id"])
def test_valid_records_pass(record):
    validate_record(record, WHERE)


def _broken(mutate) -> dict:
    record = _region_record()
    mutate(record)
    return record


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (_broken(lambda r: r.pop("id")), "missing field 'id'"),
        (_broken(lambda r: r.update(task="segmentation")), "unknown task 'segmentation'"),
        (_broken(lambda r: r.pop("regions")), "needs the field 'regions'"),
        (
            _broken(lambda r: r["regions"][1].update(box=[50, 50, 0, 0])),
            "regions[1].box: box [50, 50, 0, 0] is empty or inverted",
        ),
        (
            _broken(lambda r: r.update(width=100, height=60)),
            "regions[0].box: box [10, 20, 110, 70] lies outside the 100x60 image",
        ),
        (_broken(lambda r: r["regions"][0].update(box=[-20, 0, 5, 5])), "negative coordinates"),
        (_broken(lambda r: r["regions"][0].update(text="")), "regions[0].text must be a non-empty string"),
        (_broken(lambda r: r.update(image=None)), "needs an image"),
        (_broken(lambda r: r.update(conversation=[])), "unknown key(s) ['conversation']"),
        (_broken(lambda r: r.update(width=100)), "'width' and 'height' must be given together"),
    ],
)
def test_validation_names_location_id_and_problem(record, problem):
    with pytest.raises(BadRecordError) as info:
        validate_record(record, WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert problem in message
    if "id" in record:
        assert "(id=abc)" in message
    assert isinstance(info.value, ValueError)  # trainers may catch either


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda r: r["conversations"].reverse(), "must alternate user/assistant"),
        (lambda r: r["boxes"].pop(), "2 '<box>' placeholder(s) but 'boxes' has 1"),
        (lambda r: r.update(image=["a.png", "b.png", "c.png"]), "2 '<image>' marker(s) for 3 image(s)"),
        (lambda r: r["conversations"].pop(), "last turn must be the assistant's"),
        (lambda r: r["boxes"][1].__setitem__(2, 101), "lies outside the 100x100 image"),
    ],
)
def test_conversation_validation(mutate, problem):
    record = _conversation_record()
    mutate(record)
    with pytest.raises(BadRecordError, match="conv") as info:
        validate_record(record, WHERE)
    assert problem in str(info.value)


def test_parse_error_marker_becomes_bad_record():
    with pytest.raises(BadRecordError, match=r"^data/train.jsonl:17: malformed JSON"):
        validate_record({"_error": "malformed JSON (Expecting value at column 1)"}, WHERE)


def test_record_images():
    assert record_images({"image": None}) == []
    assert record_images({"image": "a.png"}) == ["a.png"]
    assert record_images({"image": ["a.png", "b.png"]}) == ["a.png", "b.png"]


def _texts(message: dict) -> list[str]:
    return [item["text"] for item in message["content"] if item["type"] == "text"]


def _num_images(message: dict) -> int:
    return sum(item["type"] == "image" for item in message["content"])


def test_region_record_yields_both_directions_with_int1000_boxes():
    # 200x100 image: [10, 20, 110, 70] px -> x / 200 * 1000, y / 100 * 1000 = [50, 200, 550, 700].
    messages = record_to_messages(_region_record(), 200, 100)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4
    pairs = [(_texts(messages[i])[0], _texts(messages[i + 1])[0]) for i in range(0, len(messages), 2)]
    assert (prompts.BOX_TO_CAPTION.format(box="[50, 200, 550, 700]"), "a red circle") in pairs
    assert (prompts.CAPTION_TO_BOX.format(text="a red circle"), "[50, 200, 550, 700]") in pairs
    assert (prompts.CAPTION_TO_BOX.format(text="a cat"), "[0, 0, 250, 500]") in pairs
    # One image, at the start of the first user turn only.
    assert messages[0]["content"][0] == {"type": "image"}
    assert [_num_images(m) for m in messages] == [1] + [0] * 7


def test_region_turns_shuffle_with_rng_and_limit():
    record = _region_record()
    plain = record_to_messages(record, 200, 100)
    shuffled = record_to_messages(record, 200, 100, rng=random.Random(3))
    as_pairs = lambda ms: sorted((_texts(ms[i])[0], _texts(ms[i + 1])[0]) for i in range(0, len(ms), 2))
    assert as_pairs(plain) == as_pairs(shuffled)
    assert shuffled == record_to_messages(record, 200, 100, rng=random.Random(3))
    assert _num_images(shuffled[0]) == 1
    assert len(record_to_messages(record, 200, 100, max_regions=1)) == 4


def test_ambiguous_text_skips_text_to_box_turn():
    record = _region_record()
    record["regions"][1]["text"] = "a red circle"
    prompts_used = [_texts(m)[0] for m in record_to_messages(record, 200, 100)[::2]]
    assert prompts.CAPTION_TO_BOX.format(text="a red circle") not in prompts_used
    assert len(prompts_used) == 2  # box -> text for both regions


def test_ocr_quads_read_all_and_norm1():
    record = VALID_RECORDS[2]
    messages = record_to_messages(record, 10, 10, box_format="norm1")
    pairs = {_texts(messages[i])[0]: _texts(messages[i + 1])[0] for i in range(0, len(messages), 2)}
    assert pairs[prompts.BOX_TO_OCR.format(box="[0.1, 0.1, 0.5, 0.5]")] == "hi"
    assert pairs[prompts.OCR_TO_BOX.format(text="yo")] == "[0.0, 0.0, 0.4, 0.0, 0.4, 0.4, 0.0, 0.4]"
    assert pairs[prompts.READ_ALL_TEXT] == "hi\nyo"
    assert prompts.READ_ALL_TEXT not in [_texts(m)[0] for m in record_to_messages(record, 10, 10, read_all_text=False)]


def test_caption_and_grounding():
    caption = record_to_messages(VALID_RECORDS[0], 10, 10)
    assert _texts(caption[0]) == [prompts.CAPTION] and _texts(caption[1]) == ["A red circle."]
    grounding = record_to_messages(VALID_RECORDS[3], 10, 10)
    assert _texts(grounding[0]) == [prompts.CAPTION_TO_BOX.format(text="the dog")]
    assert _texts(grounding[1]) == ["[100, 200, 300, 400]"]


def test_conversation_places_images_and_fills_boxes():
    messages = record_to_messages(_conversation_record(), 100, 100)
    assert messages[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Compare with"},
        {"type": "image"},
        {"type": "text", "text": "What is at [0, 0, 100, 100]?"},
    ]
    assert messages[1]["content"] == [{"type": "text", "text": "A dog, at [500, 250, 1000, 750]."}]


def test_conversation_without_markers_puts_images_first():
    record = copy.deepcopy(_conversation_record())
    record["conversations"][0]["content"] = "What is at <box>?"
    messages = record_to_messages(record, 100, 100)
    assert [item["type"] for item in messages[0]["content"]] == ["image", "image", "text"]
    assert messages[0]["content"][0] is not messages[0]["content"][1]  # distinct dicts for the collator to fill
    text_only = record_to_messages(VALID_RECORDS[5], 10, 10)
    assert text_only[0]["content"] == [{"type": "text", "text": "Hi"}]
