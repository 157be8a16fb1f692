"""End to end: tiny local copies of the five benchmarks -> the `lmms-eval` CLI and `finevit-vl eval` on a tiny model."""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


datasets = pytest.importorskip("datasets")
pytest.importorskip("lmms_eval")

from finevit_vl.eval import suite, tasks_path
from finevit_vl.tiny import save_tiny_checkpoint


REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# task -> metric keys it must report
EXPECTED_METRICS = {
    "finevit_docvqa_val": {"anls"},
    "finevit_chartqa": {"relaxed_overall", "relaxed_human_split", "relaxed_augmented_split"},
    "finevit_ocrbench": {"ocrbench_score", "ocrbench_text_recognition", "ocrbench_scene_text_vqa", "ocrbench_doc_vqa", "ocrbench_kie", "ocrbench_hmer"},
    "finevit_countbench": {"acc"},
    "finevit_refcoco_bbox_rec_val": {"refcoco_ACC@0.5", "refcoco_IoU", "refcoco_Center_ACC"},
}


def _image(width: int, height: int, text: str = "") -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((4, 4), text, fill="black")
    return image


def write_tiny_benchmarks(root: Path) -> Path:
    """A few rows per benchmark, with exactly the columns of the HF datasets lmms-eval uses."""
    F = datasets.Features
    string, image = datasets.Value("string"), datasets.Image()
    strings = datasets.Sequence(datasets.Value("string"))
    tables = {
        "docvqa/validation": (
            F({"questionId": string, "question": string, "answers": strings, "image": image}),
            [{"questionId": str(i), "question": f"What is the total of invoice {i}?", "answers": [f"{i * 10}", f"${i * 10}"], "image": _image(120, 160, f"TOTAL {i * 10}")} for i in range(3)],
        ),
        "chartqa/test": (
            F({"question": string, "answer": string, "type": string, "image": image}),
            [{"question": "Highest bar?", "answer": "42", "type": t, "image": _image(160, 100, "42")} for t in ("human_test", "augmented_test", "human_test")],
        ),
        "ocrbench/test": (
            F({"question": string, "answer": strings, "dataset": string, "question_type": string, "image": image}),
            [
                {"question": "what is written in the image?", "answer": ["STOP"], "dataset": "IIIT5K", "question_type": "Regular Text Recognition", "image": _image(100, 40, "STOP")},
                {"question": "What is the date?", "answer": ["12/05"], "dataset": "FUNSD", "question_type": "Key Information Extraction", "image": _image(140, 90, "12/05")},
                {"question": "Write the expression in LaTeX.", "answer": ["x^{2}"], "dataset": "HME100k", "question_type": "Handwritten Mathematical Expression Recognition", "image": _image(80, 40, "x2")},
            ],
        ),
        "countbench/test": (
            F({"question": string, "number": datasets.Value("int64"), "image": image}),
            [{"question": "How many circles are there in the image?", "number": n, "image": _image(96, 96)} for n in (2, 3, 5)],
        ),
        "refcoco/val": (
            F({"question_id": string, "answer": strings, "bbox": datasets.Sequence(datasets.Value("float64")), "image": image}),
            [
                {"question_id": "0", "answer": ["left box", "the white area"], "bbox": [4.0, 8.0, 40.0, 30.0], "image": _image(120, 90)},
                {"question_id": "1", "answer": ["top text"], "bbox": [0.0, 0.0, 60.0, 20.0], "image": _image(80, 120, "hi")},
            ],
        ),
    }
    for name, (features, rows) in tables.items():
        path = root / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    checkpoint = save_tiny_checkpoint(str(root / "tiny_vl"), text_model_type="qwen3", seed=0)
    return checkpoint, write_tiny_benchmarks(root / "data"), root


def test_checkout_task_dir_indexes_every_task():
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(REPO / "eval_tasks"), include_defaults=False)
    expected = set(tasks_path.suite_tasks()) | {"finevit_suite", "finevit_refcoco_bbox_rec", "finevit_refcoco+_bbox_rec", "finevit_refcocog_bbox_rec"}
    assert expected <= set(manager.all_tasks)
    assert set(tasks_path.suite_tasks()) == set(tasks_path.task_configs())
    assert Path(tasks_path.tasks_dir()) == (REPO / "eval_tasks").resolve()


def test_lmms_eval_cli_runs_every_task_family(setup):
    checkpoint, data_dir, root = setup
    include = subprocess.run(
        [sys.executable, "-m", "finevit_vl.cli", "tasks-path", "--data-dir", str(data_dir)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    out = root / "lmms_out"
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "finevit_vl",
        "--model_args", f"pretrained={checkpoint},device=cpu", "--batch_size", "2",
        "--include_path", include, "--tasks", ",".join(EXPECTED_METRICS), "--output_path", str(out),
        "--gen_kwargs", "max_new_tokens=8",  # a random model never stops early; keep the test fast
    ]
    env = {**os.environ, **OFFLINE_ENV}
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    # lmms-eval exits 0 even when evaluation fails, so success is the results file.
    results_files = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert result.returncode == 0 and len(results_files) == 1, result.stderr[-4000:]
    results_file = results_files[0]
    results = json.loads(Path(results_file).read_text())["results"]
    for task, metrics in EXPECTED_METRICS.items():
        reported = {key.split(",")[0] for key in results[task] if "," in key and "_stderr" not in key}
        assert metrics <= reported, (task, reported)
    # RefCOCO documents are one per referring sentence: 3 sentences in 2 rows.
    n_samples = json.loads(Path(results_file).read_text())["n-samples"]
    assert n_samples["finevit_refcoco_bbox_rec_val"]["effective"] == 3


def test_finevit_eval_command_writes_reports_and_model_card(setup):
    checkpoint, data_dir, root = setup
    card = root / "README.md"
    card.write_text("# Tiny\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nFooter.\n")
    out = root / "suite_out"
    code = suite.main(
        ["--model", checkpoint, "--tasks", "finevit_suite", "--data-dir", str(data_dir), "--limit", "2",
         "--batch-size", "2", "--gen-kwargs", "max_new_tokens=8", "--out", str(out), "--model-card", str(card)]
    )
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == set(EXPECTED_METRICS)  # the suite = every task with local data
    for task, metrics in EXPECTED_METRICS.items():
        assert metrics <= set(report["results"][task])
    assert 0.0 <= report["results"]["finevit_countbench"]["acc"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| finevit_ocrbench | ocrbench_score |" in table
    text = card.read_text()
    assert "old" not in text and "| finevit_docvqa_val | anls |" in text and text.endswith("Footer.\n")


class _Oracle:
    """A chat model answering with the ground truth, to check each pipeline's scoring end to end."""

    @staticmethod
    def build():
        from lmms_eval.api.model import lmms

        from finevit_vl.boxes import box_to_text

        class Oracle(lmms):
            is_simple = False

            def generate_until(self, requests):
                answers = []
                for _, _, _, doc_id, task, split in (request.args for request in requests):
                    doc = self.task_dict[task][split][doc_id]
                    if task == "finevit_docvqa_val":
                        answers.append(doc["answers"][-1].upper())
                    elif task == "finevit_chartqa":  # numbers within the 5% tolerance
                        answer = doc["answer"]
                        answers.append(str(float(answer) * 1.04) if answer.replace(".", "", 1).isdigit() else answer)
                    elif task == "finevit_ocrbench":
                        answers.append(f"It reads {doc['answer'][0]}")
                    elif task == "finevit_countbench":
                        answers.append(["zero", "one", "two", "three", "four", "five"][doc["number"]] if doc["number"] <= 5 else str(doc["number"]))
                    else:  # REC: the normalized ground truth rendered in our int 0-1000 convention
                        answers.append(box_to_text(doc["bbox"], 1, 1))
                return answers

            def loglikelihood(self, requests):
                raise NotImplementedError

            def generate_until_multi_round(self, requests):
                raise NotImplementedError

        return Oracle()


def test_perfect_answers_get_full_marks(setup):
    _, data_dir, _ = setup
    scores = suite.run_eval_suite(_Oracle.build(), tasks=["finevit_suite"], data_dir=str(data_dir))
    assert list(scores) == list(EXPECTED_METRICS)
    # OCRBench: out of each category's points; the sample has no scene-text or document VQA question (NaN).
    ocrbench = {"ocrbench_score": 1000, "ocrbench_text_recognition": 300, "ocrbench_kie": 200, "ocrbench_hmer": 100}
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if task == "finevit_ocrbench":
                assert value == ocrbench[metric] if metric in ocrbench else math.isnan(value), metric
            else:  # REC IoU is just below 1: the int 0-1000 rendering rounds the box
                assert value == pytest.approx(1.0, abs=0.01), (task, metric)


def test_missing_local_data_is_reported(setup):
    checkpoint, data_dir, _ = setup
    with pytest.raises(ValueError, match="finevit_refcocog_bbox_rec_test"):
        suite.run_eval_suite(checkpoint, tasks=["finevit_refcocog_bbox_rec_test"], data_dir=str(data_dir))
