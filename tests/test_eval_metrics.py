"""`finevit_vl.eval.metrics` scores with lmms-eval 0.7.3's own functions: the wrappers agree with lmms-eval on
randomized answers, and each deviation we keep has a test showing where lmms-eval scores differently."""

import importlib
import importlib.util
import io
import math
import random
import types
from pathlib import Path

import pytest
from PIL import Image

from finevit_vl.boxes import parse_box
from finevit_vl.eval import metrics


lmms_metrics = pytest.importorskip("lmms_eval.api.metrics")
chartqa_utils = importlib.import_module("lmms_eval.tasks.chartqa.utils")
ocrbench_utils = importlib.import_module("lmms_eval.tasks.ocrbench.utils")
countbench_utils = importlib.import_module("lmms_eval.tasks.countbench.utils")
refcoco_utils = importlib.import_module("lmms_eval.tasks.refcoco.utils_rec")

N_CASES = 600
WORDS = ["invoice", "Total", "42", "ACME Corp.", "12/05/1998", "straße", "Ｈｅｌｌｏ", "n/a", "the  answer", "x"]


def _task_utils():
    path = Path(__file__).resolve().parents[1] / "eval_tasks" / "utils.py"
    spec = importlib.util.spec_from_file_location("finevit_eval_tasks_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mutate(rng: random.Random, text: str) -> str:
    """A near miss: a few character edits, case changes or extra whitespace."""
    chars = list(text)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 6])):
        op = rng.choice(["insert", "delete", "replace", "case", "space"])
        pos = rng.randrange(len(chars) + 1)
        if op == "insert":
            chars.insert(pos, rng.choice("abcxyz019 .,%ß"))
        elif chars and op == "delete":
            del chars[min(pos, len(chars) - 1)]
        elif chars and op == "replace":
            chars[min(pos, len(chars) - 1)] = rng.choice("abcxyz019")
        elif op == "case":
            chars = list("".join(chars).swapcase())
        else:
            chars.insert(pos, rng.choice([" ", "  ", "\n", "\t"]))
    return "".join(chars)


def test_anls_matches_lmms_eval():
    rng = random.Random(0)
    for _ in range(N_CASES):
        answers = [" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        prediction = _mutate(rng, rng.choice(answers)) if rng.random() < 0.8 else rng.choice(WORDS + [""])
        expected = lmms_metrics.anls(answers, [prediction])["anls"]
        assert metrics.anls(prediction, answers) == pytest.approx(expected, abs=1e-12), (prediction, answers)


def _number_text(rng: random.Random, value: float) -> str:
    style = rng.choice(["int", "float", "percent", "sci", "spaced"])
    if style == "int":
        return str(round(value))
    if style == "percent":
        return f"{value:.2f}%"
    if style == "sci":
        return f"{value:.3e}"
    if style == "spaced":
        return f" {value:.1f}"
    return f"{value:.{rng.randint(0, 4)}f}"


def test_relaxed_correctness_matches_lmms_eval():
    rng = random.Random(1)
    for _ in range(N_CASES):
        kind = rng.random()
        if kind < 0.7:  # numbers within / around / outside 5%
            target_value = rng.choice([0.0, rng.uniform(-1000, 1000), rng.uniform(0, 1), float(rng.randint(1, 100))])
            target = _number_text(rng, target_value)
            factor = 1 + rng.choice([0.0, rng.uniform(-0.05, 0.05), rng.uniform(-0.06, 0.06), rng.uniform(-1, 1)])
            prediction = _number_text(rng, target_value * factor) if rng.random() < 0.9 else rng.choice(["nan", "inf", "1e3", "-0"])
        else:  # words: exact case-insensitive match only
            target = rng.choice(["Yes", "No", "Blue", "2019", "Q3 2020"])
            prediction = rng.choice([target, target.upper(), target.lower(), f" {target}", _mutate(rng, target)])
        expected = chartqa_utils.relaxed_correctness(prediction, target)
        assert metrics.relaxed_correctness(prediction, target) == expected, (prediction, target)


def test_ocrbench_match_matches_lmms_eval():
    rng = random.Random(2)
    answers_pool = ["Coca-Cola", "ＳＴＯＰ", "x^{2}+1", "2024", "Main Street", "a b\nc"]
    for _ in range(N_CASES):
        answer = rng.sample(answers_pool, rng.randint(1, 2)) if rng.random() < 0.7 else rng.choice(answers_pool)
        target = answer if isinstance(answer, str) else rng.choice(answer)
        prediction = rng.choice([target, f"The text says {target}.", _mutate(rng, target), target.upper(), " " + target.replace(" ", "")])
        dataset = rng.choice(["IIIT5K", "HME100k", "FUNSD"])
        doc = {"answer": answer, "dataset": dataset, "question_type": "Regular Text Recognition"}
        expected = ocrbench_utils.ocrbench_process_results(doc, [prediction])["ocrbench_accuracy"]["score"]
        assert metrics.ocrbench_match(prediction, answer, dataset) == bool(expected), (prediction, answer, dataset)


def test_ocrbench_total_matches_lmms_eval_times_1000(tmp_path):
    rng = random.Random(3)
    qtypes = [qtype for group, _ in metrics.OCRBENCH_GROUPS.values() for qtype in group]
    items = [(rng.choice(qtypes), rng.random() < 0.6) for _ in range(1000)]
    for qtype in ocrbench_utils.OCRBench_score:  # lmms-eval accumulates in a module-level dict
        ocrbench_utils.OCRBench_score[qtype] = 0
    lmms_items = [{"question_type": qtype, "score": int(ok)} for qtype, ok in items]
    expected = ocrbench_utils.ocrbench_aggregate_accuracy(lmms_items, types.SimpleNamespace(output_path=str(tmp_path)))
    scores = metrics.ocrbench_scores(items)
    assert scores["total"] == pytest.approx(1000 * expected)
    hmer = [ok for qtype, ok in items if qtype == "Handwritten Mathematical Expression Recognition"]
    assert scores["hmer"] == pytest.approx(100 * sum(hmer) / len(hmer))


def test_ocrbench_scores_full_benchmark_are_counts():
    # On the real 1000-question layout each group's score is its number of correct answers.
    items = []
    for qtypes, points in metrics.OCRBENCH_GROUPS.values():
        per_type = points // len(qtypes)
        for qtype in qtypes:
            items += [(qtype, i < per_type // 2) for i in range(per_type)]
    scores = metrics.ocrbench_scores(items)
    assert scores == {"total": 500.0, "text_recognition": 150.0, "scene_text_vqa": 100.0, "doc_vqa": 100.0, "kie": 100.0, "hmer": 50.0}
    assert math.isnan(metrics.ocrbench_scores([("Doc-oriented VQA", True)])["kie"])
    with pytest.raises(ValueError, match="question_type"):
        metrics.ocrbench_scores([("Not a category", True)])


def test_countbench_matches_lmms_eval():
    rng = random.Random(4)
    words = list(countbench_utils.NUMBER_WORD_TO_NUMERAL)
    for _ in range(N_CASES):
        number = rng.randint(0, 25)
        prediction = rng.choice(
            [str(number), str(number + rng.choice([-1, 1])), f" {number}\n", f"{number}.", rng.choice(words), rng.choice(words).upper(), f"{rng.choice(words)} apples", "None", ""]
        )
        expected = countbench_utils.countbench_process_results({"number": number}, [prediction])["acc"]
        assert float(metrics.count_correct(prediction, number)) == expected, (prediction, number)
    assert metrics.count_correct("Seven", 7) and metrics.count_correct("none", 0) and not metrics.count_correct("7.", 7)


def _random_box(rng: random.Random) -> list[float]:
    x1, x2 = sorted(rng.uniform(0, 1) for _ in range(2))
    y1, y2 = sorted(rng.uniform(0, 1) for _ in range(2))
    return [x1, y1, x2 + 1e-3, y2 + 1e-3]


def test_rec_scores_match_lmms_eval():
    rng = random.Random(5)
    for _ in range(N_CASES):
        gt = _random_box(rng)
        # Predictions near the ground truth, so all IoU regimes (0, ~0.5, ~1) are exercised.
        jitter = rng.choice([0.0, 0.02, 0.1, 0.3])
        pred = sorted(min(max(v + rng.uniform(-jitter, jitter), 0.0), 1.0) for v in gt[::2]) + []
        ys = sorted(min(max(v + rng.uniform(-jitter, jitter), 0.0), 1.0) for v in gt[1::2])
        pred = [pred[0], ys[0], pred[1], ys[1]]

        # Our int 0-1000 text, scored by us, against lmms-eval's scorers on the same normalized box.
        int_text = "The box is [" + ", ".join(str(round(v * 1000)) for v in pred) + "]."
        pred_norm = [round(v * 1000) / 1000 for v in pred]
        ours = metrics.rec_scores(int_text, gt, box_format="int1000")
        if pred_norm[0] < pred_norm[2] and pred_norm[1] < pred_norm[3]:
            assert ours["iou"] == pytest.approx(refcoco_utils.compute_iou(gt, pred_norm), abs=1e-12)
            assert ours["acc"] == float(refcoco_utils.compute_accuracy(gt, pred_norm, 0.5))
            assert ours["center_acc"] == float(refcoco_utils.compute_center_accuracy(gt, pred_norm))

        # lmms-eval's own [0, 1] answers parse to the same box with box_format="norm1".
        norm_text = "[" + ", ".join(f"{v:.3f}" for v in pred) + "]"
        lmms_box = refcoco_utils.parse_float_sequence_within(norm_text)
        assert parse_box(norm_text, "norm1") == pytest.approx(lmms_box)


def test_box_conversion_and_iou_by_hand():
    assert parse_box("[100, 200, 500, 1000]") == pytest.approx([0.1, 0.2, 0.5, 1.0])
    assert parse_box("[500, 1000, 100, 200]") == pytest.approx([0.1, 0.2, 0.5, 1.0])  # re-ordered
    assert parse_box("no box here") is None
    assert metrics.xywh_to_normalized([10, 20, 30, 40], 100, 200) == pytest.approx([0.1, 0.1, 0.4, 0.3])

    gt = [0.0, 0.0, 0.5, 0.5]
    quarter_overlap = metrics.rec_scores("[250, 250, 750, 750]", gt)
    assert quarter_overlap["iou"] == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))  # = 1/7
    assert quarter_overlap["acc"] == 0.0
    assert quarter_overlap["center_acc"] == 1.0  # centre (0.5, 0.5) lies on the GT border, which counts as inside
    assert metrics.rec_scores("[300, 300, 800, 800]", gt)["center_acc"] == 0.0
    assert metrics.rec_scores("[0, 0, 500, 500]", gt) == {"iou": 1.0, "acc": 1.0, "center_acc": 1.0}
    half = metrics.rec_scores("[0, 0, 500, 250]", gt)  # IoU exactly 0.5 counts as correct
    assert half["iou"] == pytest.approx(0.5) and half["acc"] == 1.0 and half["center_acc"] == 1.0
    assert metrics.rec_scores("I cannot find it.", gt) == {"iou": 0.0, "acc": 0.0, "center_acc": 0.0}
    assert metrics.rec_scores("[0.1, 0.1, 0.4, 0.3]", [0.1, 0.1, 0.4, 0.3], box_format="norm1")["iou"] == pytest.approx(1.0)


def test_refcoco_process_docs_matches_lmms_eval():
    datasets = pytest.importorskip("datasets")
    rows = [
        {"question_id": "1", "answer": ["left dog", "brown dog"], "bbox": [10.0, 20.0, 30.0, 40.0], "image": Image.new("RGB", (100, 200))},
        {"question_id": "2", "answer": ["man"], "bbox": [0.0, 0.0, 64.0, 48.0], "image": Image.new("RGB", (64, 48))},
    ]
    features = datasets.Features(
        {"question_id": datasets.Value("string"), "answer": datasets.Sequence(datasets.Value("string")),
         "bbox": datasets.Sequence(datasets.Value("float64")), "image": datasets.Image()}
    )
    dataset = datasets.Dataset.from_list(rows, features=features)
    ours = _task_utils().refcoco_process_docs(dataset)
    theirs = refcoco_utils.refcoco_bbox_rec_preprocess_dataset(dataset)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert a["answer"] == b["answer"] and a["question_id"] == b["question_id"]
        assert a["bbox"] == pytest.approx(b["bbox"])


# ---------------------------------------------------------------------------------------------------------------------
# The deviations we keep, each against what lmms-eval does on the same input.


def test_anls_without_answers_scores_zero_where_lmms_eval_raises():
    assert metrics.anls("anything", []) == 0.0
    with pytest.raises(ValueError):
        lmms_metrics.anls([], ["anything"])


def _lmms_ocrbench_total(items, tmp_path):
    lmms_items = [{"question_type": qtype, "score": int(ok)} for qtype, ok in items]
    return ocrbench_utils.ocrbench_aggregate_accuracy(lmms_items, types.SimpleNamespace(output_path=str(tmp_path)))


def test_ocrbench_scores_are_stateless_and_scaled_where_lmms_eval_accumulates(tmp_path):
    items = [("Regular Text Recognition", True)] * 4
    saved = dict(ocrbench_utils.OCRBench_score)
    try:
        for qtype in ocrbench_utils.OCRBench_score:
            ocrbench_utils.OCRBench_score[qtype] = 0
        # lmms-eval: 4 of 4 correct reads 0.004, and a second run in the same process adds to the first.
        assert _lmms_ocrbench_total(items, tmp_path) == pytest.approx(0.004)
        assert _lmms_ocrbench_total(items, tmp_path) == pytest.approx(0.008)
    finally:
        ocrbench_utils.OCRBench_score.update(saved)
    assert metrics.ocrbench_scores(items)["total"] == metrics.ocrbench_scores(items)["total"] == 1000.0
    # Same ten categories as lmms-eval's table.
    assert {qtype for qtypes, _ in metrics.OCRBENCH_GROUPS.values() for qtype in qtypes} == set(ocrbench_utils.OCRBench_score)


def test_rec_reads_our_box_convention_where_lmms_eval_reads_floats():
    gt = [0.1, 0.2, 0.5, 1.0]
    answer = "[100, 200, 500, 1000]"
    assert metrics.rec_scores(answer, gt)["iou"] == pytest.approx(1.0)
    lmms_box = refcoco_utils.parse_float_sequence_within(answer)  # taken as written: [100.0, 200.0, 500.0, 1000.0]
    assert refcoco_utils.compute_iou(gt, lmms_box) < 1e-5


def test_rec_answer_without_box_scores_zero_where_lmms_eval_credits_the_centre():
    gt = [0.0, 0.0, 0.5, 0.5]  # touches the top-left corner
    assert metrics.rec_scores("I cannot find it.", gt) == {"iou": 0.0, "acc": 0.0, "center_acc": 0.0}
    lmms_box = refcoco_utils.parse_float_sequence_within("I cannot find it.")
    assert lmms_box == [0, 0, 0, 0] and refcoco_utils.compute_center_accuracy(gt, lmms_box)


def test_rec_two_empty_boxes_have_iou_zero_where_lmms_eval_divides_by_zero():
    gt = [0.5, 0.5, 0.5, 0.5]
    assert metrics.rec_scores("[500, 500, 500, 500]", gt) == {"iou": 0.0, "acc": 0.0, "center_acc": 1.0}
    with pytest.raises(ZeroDivisionError):
        refcoco_utils.compute_iou(gt, [0.5, 0.5, 0.5, 0.5])


def test_refcoco_process_docs_keeps_images_where_lmms_eval_reencodes_them():
    datasets = pytest.importorskip("datasets")
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 50).convert("RGB").save(buffer, "JPEG", quality=90)
    features = datasets.Features(
        {"question_id": datasets.Value("string"), "answer": datasets.Sequence(datasets.Value("string")),
         "bbox": datasets.Sequence(datasets.Value("float64")), "image": datasets.Image()}
    )
    row = {"question_id": "1", "answer": ["a", "b"], "bbox": [1.0, 2.0, 30.0, 40.0], "image": {"bytes": buffer.getvalue(), "path": None}}
    dataset = datasets.Dataset.from_list([row], features=features)

    def stored(docs):
        return [image["bytes"] for image in docs.cast_column("image", datasets.Image(decode=False))["image"]]

    assert stored(_task_utils().refcoco_process_docs(dataset)) == [buffer.getvalue()] * 2
    assert buffer.getvalue() not in stored(refcoco_utils.refcoco_bbox_rec_preprocess_dataset(dataset))


def test_task_prompts_use_training_wording():
    from finevit_vl import prompts

    utils = _task_utils()
    assert utils.docvqa_doc_to_text({"question": "What is the total?"}) == prompts.short_answer("What is the total?")
    assert utils.chartqa_doc_to_text({"question": "Max?"}, {"pre_prompt": "", "post_prompt": ""}) == prompts.short_answer("Max?")
    question = prompts.COUNT_QUESTION.format(name="red circles")
    assert utils.countbench_doc_to_text({"question": question}) == prompts.count_question("red circles")
    assert utils.refcoco_doc_to_text({"answer": "the cat"}) == prompts.CAPTION_TO_BOX.format(text="the cat")
    assert utils.ocrbench_doc_to_text({"question": " What is written? "}) == prompts.short_answer("What is written?")
