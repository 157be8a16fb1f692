"""Evaluation with lmms-eval: the ``finevit_vl`` model plugin, the FineViT task suite, and its metrics.

* `finevit_vl.eval.metrics`: benchmark metrics, lmms-eval's own functions (imported on first use) and our few deviations.
* `finevit_vl.eval.lmms_model`: the lmms-eval chat model ``finevit_vl`` (registered by `finevit_vl.eval.lmms_manifest`).
* `finevit_vl.eval.generation`: batched chat generation (the plugin's, also used by the demo's reports).
* `finevit_vl.eval.tasks_path`: where the task yamls live, and task directories for local copies of the datasets.
* `finevit_vl.eval.suite`: `run_eval_suite` and the ``finevit-vl eval`` command.

Submodules are not imported here, so using one does not pull in lmms-eval.
"""
