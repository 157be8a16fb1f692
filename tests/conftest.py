"""Shared fixtures: tiny models, processors and images built locally (no downloads); the `reliability` marker.

A fault-injection case is marked ``@pytest.mark.reliability(area, case, expected)``, e.g.
``@pytest.mark.reliability("images", "truncated PNG", "skipped with file:line")``. With
``FINEVIT_RELIABILITY_REPORT=path`` set (``make reliability`` writes ``RELIABILITY.md``), the session writes a markdown
table of every marked case that ran and its outcome; without it nothing is written, so test runs never dirty the tree.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from finevit_vl.data.collator import IMAGE_INPUT_NAMES  # importing the package registers the Auto classes
from finevit_vl.tiny import build_tiny_model, build_tokenizer


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_greedy_continuation(model, inputs, out: torch.Tensor, new_tokens: int) -> None:
    """`out` (one row) is the prompt plus exactly `new_tokens` tokens, each the argmax of a full forward over the
    sequence with the image: greedy generation ran through the image features and the cache, not around them."""
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + new_tokens)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    with torch.no_grad():
        images = {name: inputs[name] for name in IMAGE_INPUT_NAMES if name in inputs}
        logits = model(input_ids=out, attention_mask=torch.ones_like(out), **images).logits
    assert torch.equal(logits[0, prompt_len - 1 : -1].argmax(-1), out[0, prompt_len:])


# The start of a script run in a fresh interpreter WITHOUT this package (editable finder and any path to the repo
# hidden; `REPO` must be defined before it), to prove a checkpoint carries its own code.
WITHOUT_PACKAGE = """
import sys
sys.meta_path = [f for f in sys.meta_path if "finevit" not in repr(f).lower()]
sys.path = [p for p in sys.path if "finevit" not in p.lower() and p not in ("", ".", REPO)]
try:
    import finevit_vl
    raise SystemExit("finevit_vl is still importable")
except ImportError:
    pass
"""


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_qwen3(tokenizer):
    return build_tiny_model("qwen3", tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return build_tiny_model("llama", tokenizer=tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_qwen3):
    model, processor = tiny_qwen3
    path = tmp_path_factory.mktemp("tiny_ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture
def images():
    return [random_image(100, 150, 0), random_image(84, 84, 1), random_image(200, 120, 2)]


# ---------------------------------------------------------------------------------------------- RELIABILITY.md

RELIABILITY_ENV = "FINEVIT_RELIABILITY_REPORT"
_reliability_rows: dict[str, dict[str, str]] = {}  # test id -> row of each marked test that ran


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"reliability(area, case, expected): a fault-injection case, listed with its outcome in the table written "
        f"to ${RELIABILITY_ENV} (see `make reliability`)",
    )


def _phase_result(report) -> str | None:
    """The row's result from one phase's report, or `None` while it says nothing beyond "passed so far"."""
    if report.skipped:
        if hasattr(report, "wasxfail"):
            return "xfailed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return f"skipped: {reason.removeprefix('Skipped: ')}"
    if report.failed:
        return "FAILED" if report.when == "call" else f"ERROR in {report.when}"
    return "passed" if report.when == "call" else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("reliability")
    if marker is not None and os.environ.get(RELIABILITY_ENV):
        fields = dict(zip(("area", "case", "expected"), marker.args), **marker.kwargs)
        if set(fields) != {"area", "case", "expected"}:
            raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.reliability(area, case, expected)")
        result = _phase_result(report)
        row = _reliability_rows.setdefault(item.nodeid, {**fields, "result": "not run", "test": item.nodeid})
        # The first phase that is not a plain pass decides (a skip in setup, a failure in call or teardown).
        if result is not None and row["result"] in ("not run", "passed"):
            row["result"] = result
    return report


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(RELIABILITY_ENV)
    if not path or not _reliability_rows:
        return
    rows = sorted(_reliability_rows.values(), key=lambda row: (row["area"], row["case"], row["test"]))
    counts = {}
    for row in rows:
        outcome = row["result"].split(":")[0]
        counts[outcome] = counts.get(outcome, 0) + 1
    lines = [
        "# Reliability",
        "",
        "Every fault-injection case of the test suite and its outcome in the last run. Generated by `make reliability`",
        "from the tests marked `@pytest.mark.reliability(area, case, expected)`; do not edit by hand.",
        "",
        f"{len(rows)} cases: " + ", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items())) + ".",
        "",
        "| area | case | expected outcome | result | test |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {_cell(r['area'])} | {_cell(r['case'])} | {_cell(r['expected'])} | {_cell(r['result'])} | "
          f"`{_cell(r['test'])}` |" for r in rows),
    ]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as file:
        file.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
