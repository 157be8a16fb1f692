"""Where local copies of the benchmarks live: ``DATA_DIR/<folder>/<split>.parquet``, one folder per dataset, in the
dataset's own columns (`parquet_features`). The one owner of that layout, for the lmms-eval tasks that read it
(`finevit_vl.eval.tasks_path`), `finevit-vl make-data` that writes its held-out splits there, and the run report that
scores its baselines on them."""

# HF dataset used by the shipped task yamls -> folder holding its local copy inside a data directory.
LOCAL_FOLDERS: dict[str, str] = {
    "lmms-lab-encoder/DocVQA": "docvqa",
    "lmms-lab-encoder/ChartQA": "chartqa",
    "echo840/OCRBench": "ocrbench",
    "vikhyatk/CountBenchQA": "countbench",
    "lmms-lab-encoder/RefCOCO": "refcoco",
    "lmms-lab-encoder/RefCOCOplus": "refcoco+",
    "lmms-lab-encoder/RefCOCOg": "refcocog",
}


def parquet_file(folder: str, split: str) -> str:
    """``<folder>/<split>.parquet``, relative to the data directory."""
    return f"{folder}/{split}.parquet"


# Folder -> its file for the split the FineViT tasks evaluate (the `test_split` of `finevit_docvqa_val`,
# `finevit_chartqa`, `finevit_ocrbench`, `finevit_countbench`, `finevit_refcoco_bbox_rec_val`).
PARQUET_FILES: dict[str, str] = {
    "docvqa": parquet_file("docvqa", "validation"),
    "chartqa": parquet_file("chartqa", "test"),
    "ocrbench": parquet_file("ocrbench", "test"),
    "countbench": parquet_file("countbench", "test"),
    "refcoco": parquet_file("refcoco", "val"),
}


def parquet_features(name: str):
    """The `datasets.Features` of the ``PARQUET_FILES[name]`` file: the columns the benchmark's task reads, plus its image."""
    from datasets import Features, List, Value  # heavy; only the writers need it
    from datasets import Image as ImageFeature

    text, texts = Value("string"), List(Value("string"))
    columns = {
        "docvqa": {
            "questionId": text,
            "question": text,
            "answers": texts,
            "question_types": texts,
            "docId": Value("int64"),
            "ucsf_document_id": text,
            "ucsf_document_page_no": text,
        },
        "chartqa": {"question": text, "answer": text, "type": text},
        "ocrbench": {"question": text, "answer": texts, "dataset": text, "question_type": text},
        "countbench": {"question": text, "number": Value("int64"), "text": text},
        "refcoco": {
            "question_id": text,
            "answer": texts,
            "bbox": List(Value("float64")),
            "segmentation": List(Value("float64")),
            "file_name": text,
        },
    }[name]
    return Features({**columns, "image": ImageFeature()})


__all__ = ["LOCAL_FOLDERS", "PARQUET_FILES", "parquet_features", "parquet_file"]
