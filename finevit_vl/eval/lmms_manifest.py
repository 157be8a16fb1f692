"""lmms-eval entry point (``[project.entry-points."lmms_eval.models"]``): registers ``--model finevit_vl``.

Kept import-light on purpose: lmms-eval loads every entry point when ``lmms_eval.models`` is imported, and imports
the class named here only when the model is requested. ``MANIFEST`` is built on first access (PEP 562) because
importing ``lmms_eval.models`` itself loads the entry points, which would be circular if this module came first.
"""

MODEL_ID = "finevit_vl"
CHAT_CLASS_PATH = "finevit_vl.eval.lmms_model.FineViTVL"


def __getattr__(name: str):
    if name == "MANIFEST":
        from lmms_eval.models.registry_v2 import ModelManifest

        return ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS_PATH)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
