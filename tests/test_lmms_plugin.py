"""The lmms-eval plugin `finevit_vl.eval.lmms_model.FineViTVL` on a tiny random FineViT-VL."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from finevit_vl.eval.lmms_model import FineViTVL
from finevit_vl.tiny import save_tiny_checkpoint


TASK, SPLIT = "toy_task", "test"
QUESTIONS = ["How many circles?", "What is written in the top left corner of the page?", "Red?", "Describe the chart.", "Total?"]
SIZES = [(64, 64), (120, 80), (56, 200), (90, 90), (150, 60)]
GREEDY = {"max_new_tokens": 12, "temperature": 0, "do_sample": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_vl")), text_model_type="qwen3", seed=0)


@pytest.fixture(scope="module")
def docs():
    colors = ["red", "green", "blue", "white", "black"]
    return [{"image": Image.new("RGB", size, color), "question": q} for size, color, q in zip(SIZES, colors, QUESTIONS)]


def _doc_to_messages(doc):
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]}]


def _requests(docs, gen_kwargs):
    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], _doc_to_messages, dict(gen_kwargs), doc_id, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]


def _run(model, docs, gen_kwargs=GREEDY):
    model.task_dict = {TASK: {SPLIT: docs}}
    return model.generate_until(_requests(docs, gen_kwargs))


def _reference_answers(checkpoint, docs, max_pixels: int | None = None) -> list[str]:
    """Each doc answered without the plugin: its image and question in the chat template, greedy `generate`."""
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.set_pixel_budget(max_pixels=max_pixels)
    answers = []
    for doc in docs:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[doc["image"]], text=[text])
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=GREEDY["max_new_tokens"], do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def test_batched_generation_matches_batch_size_one_and_the_model(checkpoint, docs):
    single = _run(FineViTVL(pretrained=checkpoint, batch_size=1, device="cpu", dtype="float32"), docs)
    batched = _run(FineViTVL(pretrained=checkpoint, batch_size="3", device="cpu", dtype="float32"), docs)
    expected = _reference_answers(checkpoint, docs)
    assert len(set(expected)) > 1, "the tiny model answers every doc alike; the comparison would be vacuous"
    assert single == expected  # each answer is the model's own answer to that doc's image and question
    assert batched == single


def test_batches_group_by_gen_kwargs_longest_first_and_answers_keep_request_order(monkeypatch):
    model = FineViTVL.__new__(FineViTVL)  # no checkpoint: only the batching is under test
    lmms.__init__(model)
    model.batch_size = 2
    batches = []

    def fake_generate(batch_args):
        batches.append([args[3] for args in batch_args])
        assert len({str(args[2]) for args in batch_args}) == 1, "a batch mixes generation kwargs"
        return [f"answer {args[3]}" for args in batch_args]

    monkeypatch.setattr(model, "_generate", fake_generate)
    short = {**GREEDY, "max_new_tokens": 4}
    prompts = [("aaaa", GREEDY), ("a", short), ("aaaaaa", GREEDY), ("aa", GREEDY), ("aaa", short), ("aaaaa", GREEDY)]
    requests = [
        Instance(request_type="generate_until", arguments=(ctx, _doc_to_messages, dict(kwargs), doc_id, TASK, SPLIT),
                 idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
        for doc_id, (ctx, kwargs) in enumerate(prompts)
    ]
    assert model.generate_until(requests) == [f"answer {doc_id}" for doc_id in range(len(prompts))]
    assert batches == [[2, 5], [0, 3], [4, 1]]


def test_until_cuts_the_answer(checkpoint, docs):
    model = FineViTVL(pretrained=checkpoint, batch_size=2)
    full = _run(model, docs)
    # Stop on a piece of the first answer: that answer is cut before it, answers without it are unchanged.
    index, text = next((i, t) for i, t in enumerate(full) if len(t.strip()) >= 4)
    stop = text[2:4]
    cut = _run(model, docs, {**GREEDY, "until": [stop]})
    for before, after in zip(full, cut):
        assert after == before.split(stop, 1)[0].strip()
    assert cut[index] == text.split(stop, 1)[0].strip()
    assert model._postprocess("12 apples\n\nand more", ["\n\n"]) == "12 apples"


def test_clean_keeps_the_model_and_from_model_reuses_it(checkpoint, docs):
    model = FineViTVL(pretrained=checkpoint, batch_size=2)
    first = _run(model, docs)
    model.clean()  # lmms-eval calls this at the end of every evaluate()
    assert model.model is not None
    assert _run(model, docs) == first

    # In-training use: wrap the live model; its train mode and the tokenizer's padding side are left as they were.
    model.model.train()
    model.processor.tokenizer.padding_side = "right"
    wrapped = FineViTVL.from_model(model.model, model.processor, batch_size=4)
    assert _run(wrapped, docs) == first
    assert wrapped.model.training
    assert model.processor.tokenizer.padding_side == "right"
    budget = model.processor.image_processor.max_pixels
    smaller = FineViTVL.from_model(model.model, model.processor, max_pixels=budget // 4)
    assert smaller.processor.image_processor.max_pixels == budget // 4
    assert model.processor.image_processor.max_pixels == budget


def test_model_args_are_validated_and_applied(checkpoint):
    model = FineViTVL(pretrained=checkpoint, max_pixels=100352, min_pixels=3136, box_format="norm1")
    assert model.processor.image_processor.max_pixels == 100352
    assert model._postprocess("It is [0.1, 0.2, 0.5, 1.0].", []) == "It is [100, 200, 500, 1000]."
    with pytest.raises(ValueError, match="Unknown finevit_vl model_args"):
        FineViTVL(pretrained=checkpoint, max_pixel=1)
    with pytest.raises(ValueError, match="dtype"):
        FineViTVL(pretrained=checkpoint, dtype="fp8")
    # lmms-eval calls these for multiple-choice and multi-round tasks: the error names what the model supports.
    with pytest.raises(NotImplementedError, match=r"only supports generation tasks \(output_type: generate_until\)"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])


def test_entry_point_manifest_resolves():
    from lmms_eval import models

    assert models.get_model("finevit_vl") is FineViTVL
    assert FineViTVL.is_simple is False


@pytest.mark.parametrize("vision_preset", ["siglip2-naflex-test", "qwen2-vl-test", "clip-test"])
def test_plugin_serves_other_vision_towers(tmp_path, docs, vision_preset):
    checkpoint = save_tiny_checkpoint(str(tmp_path / "vl"), text_model_type="qwen3", seed=0, vision_preset=vision_preset)
    batched = _run(FineViTVL(pretrained=checkpoint, batch_size=3, device="cpu", dtype="float32", max_pixels=96 * 96), docs)
    expected = _reference_answers(checkpoint, docs, max_pixels=96 * 96)
    assert len(set(expected)) > 1, "the tiny model answers every doc alike; the comparison would be vacuous"
    assert batched == expected


def test_builtin_bbox_rec_tasks_get_boxes_in_the_convention_they_parse(checkpoint, docs, monkeypatch):
    """An int1000 answer reaches lmms-eval's `refcoco*_bbox_rec_*` as [0, 1] floats, which its own parser scores
    IoU 1 against the matching ground truth; our tasks and `refcoco_grounding_*` (0-1000) get it unchanged."""
    datasets = pytest.importorskip("datasets")
    from lmms_eval.tasks.refcoco import utils_rec

    from finevit_vl.eval import lmms_model

    answer = "The dog is at [100, 200, 500, 600]."
    monkeypatch.setattr(lmms_model, "generate_answers", lambda model, processor, chats, *a, **k: [answer] * len(chats))
    tasks = [TASK, "refcoco_bbox_rec_val", "refcoco+_bbox_rec_testA", "refcocog_bbox_rec_test", "refcoco_grounding_testA"]
    model = FineViTVL(pretrained=checkpoint, batch_size=2)
    model.task_dict = {task: {SPLIT: docs[:1]} for task in tasks}
    requests = [
        Instance(request_type="generate_until", arguments=("q", _doc_to_messages, dict(GREEDY), 0, task, SPLIT),
                 idx=0, metadata={"task": task, "doc_id": 0, "repeats": 1})
        for task in tasks
    ]
    converted = "The dog is at [0.1, 0.2, 0.5, 0.6]."
    assert model.generate_until(requests) == [answer, converted, converted, converted, answer]

    # The built-in task's own preprocessing (pixels xywh -> [0, 1] xyxy) and parsing score it IoU 1.
    image = Image.new("RGB", (200, 100))
    rows = datasets.Dataset.from_list([{"question_id": 1, "image": image, "answer": ["the dog"], "bbox": [20, 20, 80, 40]}])
    doc = utils_rec.refcoco_bbox_rec_preprocess_dataset(rows)[0]
    scored = utils_rec.refcoco_bbox_rec_process_result(doc, [converted])["refcoco_IoU"]
    assert utils_rec.compute_iou(scored["pred"], scored["bbox"]) == pytest.approx(1.0)
    assert utils_rec.compute_iou(utils_rec.parse_float_sequence_within(answer), doc["bbox"]) == 0.0  # unconverted

    # A fixed convention for every task, and a norm1 model on our own int1000 tasks.
    fixed = FineViTVL.from_model(model.model, model.processor, task_box_format="int1000")
    assert fixed._postprocess(answer, [], "refcoco_bbox_rec_val") == answer
    norm1 = FineViTVL.from_model(model.model, model.processor, box_format="norm1")
    assert norm1._postprocess(converted, [], "refcoco_bbox_rec_val") == converted
    assert norm1._postprocess(converted, [], TASK) == answer
    with pytest.raises(ValueError, match="task_box_format"):
        FineViTVL.from_model(model.model, model.processor, task_box_format="pixels")
