"""FineViT-VL benchmarks, run by `finevit-vl bench` (or `python benchmarks/run.py`).

One module per benchmark; each exposes `run(quick: bool) -> dict` (a JSON-able result with the keys of
`common.RESULT_KEYS`) and `markdown(result: dict) -> str` (its section of `benchmarks/BENCHMARKS.md`).
"""

# name -> module, in the order they run and appear in BENCHMARKS.md.
BENCHMARKS: dict[str, str] = {
    "encoder": "finevit_vl.benchmarking.encoder",
    "preprocess": "finevit_vl.benchmarking.preprocess",
    "train_step": "finevit_vl.benchmarking.train_step",
    "generation": "finevit_vl.benchmarking.generation",
    "scaling": "finevit_vl.benchmarking.scaling",
    "loader": "finevit_vl.benchmarking.loader",
}

__all__ = ["BENCHMARKS"]
