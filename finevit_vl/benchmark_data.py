"""Where local copies of the benchmarks live: ``DATA_DIR/<folder>/<split>.parquet``, one folder per dataset, in the
dataset's own columns. The one owner of that layout, for the lmms-eval tasks that read it
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


__all__ = ["LOCAL_FOLDERS", "PARQUET_FILES", "parquet_file"]
