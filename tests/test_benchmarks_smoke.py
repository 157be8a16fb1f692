"""`finevit-vl bench --quick`: every benchmark runs on tiny settings and writes its JSON and markdown (not timed)."""

import importlib.util
import json

import pytest

from finevit_vl.bench import main
from finevit_vl.benchmarking import BENCHMARKS
from finevit_vl.benchmarking.common import RESULT_KEYS


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
}


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


@pytest.mark.timeout(360)
def test_quick_benchmarks_write_results(tmp_path):
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
    markdown = (tmp_path / "results" / "quick" / "BENCHMARKS.md").read_text()
    assert all(f"`{name}`" in markdown for name in names)


def test_unknown_benchmark_is_rejected(tmp_path):
    assert main(["--quick", "--only", "nope", "--out-dir", str(tmp_path)]) == 2
