"""`finevit-vl bench --quick`: every benchmark runs on tiny settings and writes its JSON and markdown, with every
number finite and every timing positive (the speeds themselves are not judged)."""

import importlib.util
import json
import math
import re

import pytest

from finevit_vl.bench import main
from finevit_vl.benchmarking import BENCHMARKS
from finevit_vl.benchmarking.common import RESULT_KEYS, summarize


# Per benchmark, paths (a/b/c) that must exist in `results`.
EXPECTED = {
    "encoder": ["models/finevit", "models/qwen2_vl", "models/siglip2", "float32/forward/finevit/images_per_s",
                "float32/forward_backward/siglip2/tokens_per_s", "float32/forward/speedup/finevit/vs_fastest_peer",
                "float32/gemm_gflops", "float32/peak_448/fraction_of_gemm_peak", "bfloat16/peak_448_wide/tokens",
                "profiles/float32/finevit"],
    "preprocess": ["images_per_s/finevit_pil", "images_per_s/qwen2_vl_pil", "speedup_vs_qwen2_vl_pil/finevit_pil",
                   "agreement/qwen2_vl_pil/max_abs_diff_vs_finevit_pil"],
    "train_step": ["variants/padded/tokens_per_s", "variants/packed/real_token_fraction",
                   "variants/packed_checkpointing/peak_memory_growth_mb", "speedup_packed_vs_padded"],
    "generation": ["samples_per_s/1", "speedup_vs_batch_size_1/3", "answers_equal_to_batch_size_1/3"],
    "scaling": ["points/112/float32/seconds", "points/224/float32/peak_memory_growth_mb", "points/224/tokens"],
    "loader": ["samples_per_s/workers_0", "startup_seconds/workers_2", "speedup_vs_in_process/workers_2"],
}
# A timing summary (`common.summarize`: median, quartiles, ...) and the names of single timing numbers; a summary is
# only ever made of timings, rates and their ratios, so all of it must be positive.
SUMMARY_KEYS = frozenset(summarize([1.0, 2.0]))
TIMING_NAME = re.compile(r"seconds|_s$|per_s|speedup|gflops|flop_share|fraction_of_gemm_peak")


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _leaves(tree, path: str = ""):
    """`(path, value)` of every number in a JSON tree (booleans are not numbers here)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _leaves(value, f"{path}/{index}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def _summaries(tree, path: str = ""):
    if isinstance(tree, dict):
        if SUMMARY_KEYS <= set(tree):
            yield path, tree
            return
        for key, value in tree.items():
            yield from _summaries(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _summaries(value, f"{path}/{index}")


def number_problems(result: dict) -> list[str]:
    """What is wrong with the numbers of one benchmark's JSON: NaN or infinite anywhere, a timing (a summary, or a
    number named like one) zero or negative, a summary out of order."""
    problems = [f"{path} = {value}" for path, value in _leaves(result) if not math.isfinite(value)]
    timing_paths = set()
    for path, summary in _summaries(result["results"], "/results"):
        timing_paths |= {f"{path}/{key}" for key in SUMMARY_KEYS}
        if not summary["min"] <= summary["q1"] <= summary["median"] <= summary["q3"] <= summary["max"]:
            problems.append(f"{path}: not min <= q1 <= median <= q3 <= max: {summary}")
    for path, value in _leaves(result):
        named_as_timing = TIMING_NAME.search(path.rsplit("/", 1)[-1]) and path.startswith(("/results/", "/elapsed_s"))
        if (path in timing_paths or named_as_timing) and math.isfinite(value) and value <= 0:
            problems.append(f"{path} = {value} (a timing must be positive)")
    return problems


def test_number_check_catches_nan_infinite_and_non_positive_timings():
    timing = summarize([0.5, 1.0, 2.0])
    good = {"elapsed_s": 3.0, "results": {"a": {"images_per_s": timing, "tokens": 0}}, "goals": []}
    assert number_problems(good) == []
    for bad, expected in [
        ({"elapsed_s": 3.0, "results": {"a": {"images_per_s": {**timing, "median": float("nan")}}}}, "median = nan"),
        ({"elapsed_s": 3.0, "results": {"a": {"speedup": {**timing, "max": float("inf")}}}}, "max = inf"),
        ({"elapsed_s": 3.0, "results": {"a": {"seconds": {**timing, "min": 0.0, "q1": 0.0}}}}, "min = 0.0"),
        ({"elapsed_s": 3.0, "results": {"gemm_gflops": -1.0}}, "gemm_gflops = -1.0"),
        ({"elapsed_s": 0.0, "results": {}}, "/elapsed_s = 0.0"),
        ({"elapsed_s": 3.0, "results": {}, "goals": [{"measured": float("nan")}]}, "/goals/0/measured = nan"),
    ]:
        assert any(expected in problem for problem in number_problems(bad)), (bad, number_problems(bad))


@pytest.mark.timeout(360)
def test_quick_benchmarks_write_results(tmp_path):
    assert set(BENCHMARKS) <= set(EXPECTED), f"no expected keys for {set(BENCHMARKS) - set(EXPECTED)}"
    names = [name for name in BENCHMARKS if name != "generation" or importlib.util.find_spec("lmms_eval")]
    assert main(["--quick", "--threads", "1", "--out-dir", str(tmp_path), "--only", ",".join(names)]) == 0
    for name in names:
        result = json.loads((tmp_path / "results" / "quick" / f"{name}.json").read_text())
        assert set(RESULT_KEYS) <= set(result), f"{name}: missing {set(RESULT_KEYS) - set(result)}"
        assert result["benchmark"] == name and result["quick"] is True
        for path in EXPECTED[name]:
            _get(result["results"], path)  # KeyError names the missing key
        for entry in result["goals"]:
            assert {"goal", "target", "measured", "met"} <= set(entry)
        assert not (problems := number_problems(result)), f"{name}: {problems}"
    markdown = (tmp_path / "results" / "quick" / "BENCHMARKS.md").read_text()
    assert all(f"`{name}`" in markdown for name in names)


def test_unknown_benchmark_is_rejected(tmp_path):
    assert main(["--quick", "--only", "nope", "--out-dir", str(tmp_path)]) == 2


def test_the_gpu_check_script_runs_its_cpu_path(tmp_path):
    """`benchmarks/gpu_check.sh --device cpu --tiny`: every check and measurement runs and writes its files."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    result = subprocess.run(["bash", str(script), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["packed_vs_unpacked"]["max_abs_diff"] < 1e-5
    assert report["flash_vs_sdpa"]["ran"] is False and "flash-attn" in report["flash_vs_sdpa"]["why"]
    for encoder in ("finevit", "qwen2-vl"):
        assert report["encoder"][encoder]["tflops_per_s"] > 0
    assert report["train_step"]["tokens_per_s"] > 0 and report["generation"]["new_tokens_per_s"] > 0
    assert "# GPU check on cpu" in (tmp_path / "gpu_check.md").read_text()
    no_gpu = subprocess.run(["bash", str(script), "--out", str(tmp_path / "x")], capture_output=True, text=True,
                            timeout=120, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert no_gpu.returncode == 2 and "no CUDA device" in no_gpu.stdout
