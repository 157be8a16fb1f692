"""The run report (`finevit_vl.report`): trivial baselines, where grounding boxes land, a stage's summary from its run
folder, and `report.md` itself."""

import json

import pytest
import yaml
from PIL import Image


def test_grounding_baseline_is_the_best_fixed_box(tmp_path):
    """The trivial grounding baseline tries the centred box and every quadrant (objects sit on a 2x2 grid, so a
    quadrant is the strongest constant answer) and keeps the best, so a model must beat the layout prior."""
    import io

    import pyarrow.parquet as pq

    from finevit_vl.data.synthetic import main as make_data
    from finevit_vl.eval import metrics
    from finevit_vl.report import FIXED_BOXES, baseline_scores

    make_data(["--out", str(tmp_path), "--seed", "3", "--train-per-task", "1", "--eval-per-task", "40",
               "--image-size", "112", "--tasks", "grounding", "counting"])
    rows = pq.read_table(tmp_path / "eval" / "refcoco" / "val.parquet").to_pylist()
    per_box = {}
    for name, box in FIXED_BOXES.items():
        hits = 0
        for row in rows:
            width, height = Image.open(io.BytesIO(row["image"]["bytes"])).size
            hits += metrics.rec_scores(box, metrics.xywh_to_normalized(row["bbox"], width, height))["acc"]
        per_box[name] = hits / len(rows)
    baselines = baseline_scores(tmp_path / "eval")
    grounding = baselines["finevit_refcoco_bbox_rec_val"]
    assert grounding["score"] == max(per_box.values()) and per_box["centred box"] < grounding["score"]
    assert grounding["baseline"].startswith(max(per_box, key=per_box.get))
    numbers = [row["number"] for row in pq.read_table(tmp_path / "eval" / "countbench" / "test.parquet").to_pylist()]
    assert baselines["finevit_countbench"]["score"] >= max(numbers.count(n) for n in set(numbers)) / len(numbers)


def test_blind_baseline_learns_answer_formats_per_question_without_memorising():
    """The blind baseline answers each question with the best constant chosen on the other rows of that question: it
    gets ANLS credit for a plausible date (what the demo's document model had learned), but a question seen once
    cannot answer itself."""
    from finevit_vl.eval import metrics
    from finevit_vl.report import _text_baselines

    dates = [{"question": "What is the date?", "answers": [f"2024-03-1{d}"]} for d in range(4)]
    names = [{"question": "Who?", "answers": [name]} for name in ("Ada", "Ada", "Bo", "Cy")]
    anls = lambda answer, row: metrics.anls(answer, row["answers"])
    candidates = _text_baselines(dates + names, lambda r: r["answers"][0], anls)
    blind = next(value for name, value in candidates.items() if name.startswith("blind"))
    # each date is one character from the others (ANLS 0.9); "Ada" answers both Adas, not Bo or Cy
    assert blind == pytest.approx((4 * 0.9 + 2) / 8)
    assert candidates["majority 'Ada'"] == pytest.approx(2 / 8)
    assert blind > max(value for name, value in candidates.items() if not name.startswith("blind"))
    unique = [{"question": f"Q{i}?", "answers": [f"answer {i}"]} for i in range(5)]
    candidates = _text_baselines(unique, lambda r: r["answers"][0], anls)
    assert next(v for n, v in candidates.items() if n.startswith("blind")) == candidates["majority 'answer 0'"]


def test_grounding_breakdown_tells_the_named_object_from_another(tmp_path, monkeypatch):
    """The report says whether boxes land on the object the expression names or on another object of the image, next
    to the chance level of a detector that ignores the expression: an ACC@0.5 below that level is no grounding."""
    import pyarrow.parquet as pq

    from finevit_vl import report
    from finevit_vl.boxes import box_to_text
    from finevit_vl.data.synthetic import main as make_data

    make_data(["--out", str(tmp_path), "--seed", "5", "--train-per-task", "1", "--eval-per-task", "30",
               "--image-size", "112", "--tasks", "grounding"])
    records = [json.loads(line) for line in (tmp_path / "stage3" / "eval.jsonl").read_text().splitlines()]
    objects = {r["id"].removesuffix("-grounding"): r["grounding"] for r in records if r["task"] == "grounding"}

    def answer_with(pick):
        # The breakdown asks about the refcoco rows in file order; answer each with a box `pick` chooses.
        row_ids = pq.read_table(tmp_path / "eval" / "refcoco" / "val.parquet").column("question_id").to_pylist()

        def answers(model, processor, images, questions):
            return [box_to_text(pick(objects[row_id], question.rsplit(": ", 1)[1]), *image.size)
                    for row_id, image, question in zip(row_ids, images, questions, strict=True)]
        return answers

    named = lambda items, e: next(g["box"] for g in items if g["expression"] == e)
    other = lambda items, e: next(g["box"] for g in items if g["expression"] != e)
    monkeypatch.setattr(report, "_answers", answer_with(named))
    breakdown = report.grounding_breakdown(None, None, tmp_path)
    assert breakdown["named object"] == 1.0 and breakdown["another object"] == 0.0
    expected_chance = sum(1 / len(items) for items in objects.values()) / len(objects)
    assert breakdown[report.BLIND_DETECTOR] == pytest.approx(expected_chance)
    assert 0.25 <= expected_chance <= 0.5  # 2-4 objects per image
    monkeypatch.setattr(report, "_answers", answer_with(other))
    breakdown = report.grounding_breakdown(None, None, tmp_path)
    assert breakdown["named object"] == 0.0 and breakdown["another object"] == 1.0 and breakdown["no object"] == 0.0


def test_stage_summary_reads_steps_from_the_config_and_losses_from_the_metrics(tmp_path):
    """The training table comes from the run folder alone: steps and samples from its `config.yaml` (the config in
    force), held-out loss at the first and last evaluation and mean throughput from its `metrics.jsonl`."""
    from finevit_vl.report import stage_summary

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 30, "global_batch_size": 16}}))
    records = [{"step": 0, "eval_loss": 5.0}, {"step": 5, "loss": 4.0, "tokens_per_s": 100.0, "images_per_s": 2.0},
               {"step": 10, "loss": 3.0, "tokens_per_s": 300.0, "images_per_s": 4.0}, {"step": 30, "eval_loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = stage_summary(tmp_path)
    assert (summary["steps"], summary["samples"]) == (30, 480)
    assert (summary["eval_start"], summary["eval_end"]) == (5.0, 2.5)
    assert (summary["tokens_per_s"], summary["images_per_s"]) == (200.0, 3.0)


def test_report_puts_each_score_next_to_its_baseline_and_the_margin(tmp_path):
    from finevit_vl.report import BLIND_DETECTOR, write_report

    rows = [{"task": "finevit_countbench", "metric": "acc", "model": 0.9, "baseline": 0.2, "baseline_name": "majority '3'"}]
    stages = {"stage3": {"steps": 10, "samples": 160, "eval_start": 4.0, "eval_end": 2.0, "tokens_per_s": 1000.0,
                         "images_per_s": 20.0}}
    grounding = {"named object": 0.5, "another object": 0.3, "no object": 0.2, BLIND_DETECTOR: 0.36}
    ocrbench = {"ocrbench_score": 300.0, "ocrbench_text_recognition": 150.0, "ocrbench_kie": float("nan")}
    report = write_report(tmp_path, rows, {"report": 1.0}, stages, "finevit-vl quickstart --seed 0", 1.5, ocrbench,
                          "counting 1.00", grounding)
    assert report == (tmp_path / "report.md").read_text()
    assert "`finevit-vl quickstart --seed 0`" in report and "1.50M-parameter" in report
    assert "| finevit_countbench | acc | 0.900 | 0.200 | +0.700 | majority '3' |" in report
    assert "| stage3 | 10 | 160 | 4.000 -> 2.000 | 1000 | 20.0 |" in report
    # 150 of the group's 300 points; a NaN group (no questions of that kind) is left out
    assert "accuracy by question group: text recognition 0.500." in report
    assert "named object 0.50, another object 0.30, no object 0.20" in report and "named object 0.36 of the time" in report
