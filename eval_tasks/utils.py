"""Prompt and scoring hooks for the FineViT lmms-eval tasks (referenced from the yamls with ``!function utils.<name>``).

Prompts come from `finevit_vl.prompts.benchmark_prompt` (the wording the model is trained on), scores from lmms-eval's own task utils,
directly where our metric keys match theirs (ChartQA, CountBench), otherwise through `finevit_vl.eval.metrics`.
lmms-eval loads this file by path and runs ``process_results`` in threads, so everything here is stateless.
"""

import importlib

from finevit_vl import prompts
from finevit_vl.eval import metrics


def _lmms_task_utils(name):
    # Imported on first use, so this file also loads without lmms-eval (e.g. for `doc_to_visual` alone).
    return importlib.import_module(f"lmms_eval.tasks.{name}.utils")


def doc_to_visual(doc):
    # Undecoded: the model's image processor is the one decoder (EXIF, transparency on white, 16-bit) for every path.
    return [doc["image"]]


def _wrap(text, lmms_eval_specific_kwargs):
    # Optional per-model affixes from the yaml's `lmms_eval_specific_kwargs` (empty for finevit_vl).
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{text}{kwargs.get('post_prompt', '')}"


# ---------------------------------------------------------------------------------------------------------------------
# DocVQA


def docvqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _wrap(prompts.benchmark_prompt("docvqa", doc["question"]), lmms_eval_specific_kwargs)


def docvqa_process_results(doc, results):
    return {"anls": metrics.anls(results[0], doc["answers"])}


# ---------------------------------------------------------------------------------------------------------------------
# ChartQA


def chartqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _wrap(prompts.benchmark_prompt("chartqa", doc["question"]), lmms_eval_specific_kwargs)


def chartqa_process_results(doc, results):
    return _lmms_task_utils("chartqa").chartqa_process_results(doc, results)


# ---------------------------------------------------------------------------------------------------------------------
# OCRBench: every metric receives the same per-question item; each aggregation reads its own categories.


def ocrbench_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _wrap(prompts.benchmark_prompt("ocrbench", doc["question"]), lmms_eval_specific_kwargs)


def ocrbench_process_results(doc, results):
    item = (doc["question_type"], metrics.ocrbench_match(results[0], doc["answer"], doc["dataset"]))
    return {name: item for name in _OCRBENCH_METRICS}


def _ocrbench_aggregation(group):
    def aggregate(items):
        return metrics.ocrbench_scores(items)[group]

    aggregate.__name__ = f"ocrbench_{group}"
    return aggregate


_OCRBENCH_METRICS = ["ocrbench_score"] + [f"ocrbench_{group}" for group in metrics.OCRBENCH_GROUPS]
ocrbench_aggregate_score = _ocrbench_aggregation("total")
ocrbench_aggregate_text_recognition = _ocrbench_aggregation("text_recognition")
ocrbench_aggregate_scene_text_vqa = _ocrbench_aggregation("scene_text_vqa")
ocrbench_aggregate_doc_vqa = _ocrbench_aggregation("doc_vqa")
ocrbench_aggregate_kie = _ocrbench_aggregation("kie")
ocrbench_aggregate_hmer = _ocrbench_aggregation("hmer")


# ---------------------------------------------------------------------------------------------------------------------
# CountBench


def countbench_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _wrap(prompts.benchmark_prompt("countbench", doc["question"]), lmms_eval_specific_kwargs)


def countbench_doc_to_target(doc):
    return _lmms_task_utils("countbench").countbench_doc_to_target(doc)


def countbench_process_results(doc, results):
    return _lmms_task_utils("countbench").countbench_process_results(doc, results)


# ---------------------------------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg referring expression comprehension


def refcoco_process_docs(dataset):
    """lmms-eval's RefCOCO documents with the images as stored (its preprocess re-encodes them, lossily for JPEG).

    One row per referring sentence (``answer`` becomes a string) with ``bbox`` as normalized ``[x1, y1, x2, y2]``, as
    lmms-eval's ``refcoco_bbox_rec_preprocess_dataset`` builds them.
    """
    dataset = dataset.map(
        lambda image, bbox: {"bbox": metrics.xywh_to_normalized(bbox, image.width, image.height)},
        input_columns=["image", "bbox"],
    )
    sentences = dataset["answer"]
    rows = [row for row, sents in enumerate(sentences) for _ in sents]
    flat = [sentence for sents in sentences for sentence in sents]
    return dataset.select(rows).remove_columns("answer").add_column("answer", flat)


def refcoco_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _wrap(prompts.benchmark_prompt("refcoco", doc["answer"]), lmms_eval_specific_kwargs)


def refcoco_process_results(doc, results):
    # The model answers in our int 0-1000 convention (the plugin rewrites other conventions to it).
    scores = metrics.rec_scores(results[0], doc["bbox"], box_format="int1000")
    return {"refcoco_IoU": scores["iou"], "refcoco_ACC@0.5": scores["acc"], "refcoco_Center_ACC": scores["center_acc"]}
