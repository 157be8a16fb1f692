"""Registration of FineViT / FineViT-VL with the transformers Auto classes, and the `AutoModelForVision2Seq` shim."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .models import (
    FineViTConfig,
    FineViTImageProcessor,
    FineViTModel,
    FineViTVLConfig,
    FineViTVLForConditionalGeneration,
    FineViTVLModel,
    FineViTVLProcessor,
)


def register_auto_classes() -> None:
    """Register configs, models and processors with the Auto classes (idempotent)."""
    AutoConfig.register(FineViTConfig.model_type, FineViTConfig, exist_ok=True)
    AutoConfig.register(FineViTVLConfig.model_type, FineViTVLConfig, exist_ok=True)
    AutoModel.register(FineViTConfig, FineViTModel, exist_ok=True)
    AutoModel.register(FineViTVLConfig, FineViTVLModel, exist_ok=True)
    AutoModelForImageTextToText.register(FineViTVLConfig, FineViTVLForConditionalGeneration, exist_ok=True)
    try:  # transformers >= 5.2x builds this mapping separately from ImageTextToText
        from transformers import AutoModelForMultimodalLM

        AutoModelForMultimodalLM.register(FineViTVLConfig, FineViTVLForConditionalGeneration, exist_ok=True)
    except ImportError:
        pass
    backends = {"pil": FineViTImageProcessor, "torchvision": FineViTImageProcessor}
    for config_class in (FineViTConfig, FineViTVLConfig):
        AutoImageProcessor.register(config_class, image_processor_classes=backends, exist_ok=True)
    AutoProcessor.register(FineViTVLConfig, FineViTVLProcessor, exist_ok=True)

    # Saved checkpoints get an `auto_map` and a copy of the model files, so that a Python process WITHOUT this
    # package loads them with `trust_remote_code=True`.
    FineViTConfig.register_for_auto_class("AutoConfig")
    FineViTVLConfig.register_for_auto_class("AutoConfig")
    FineViTModel.register_for_auto_class("AutoModel")
    FineViTVLModel.register_for_auto_class("AutoModel")
    FineViTVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    FineViTImageProcessor.register_for_auto_class("AutoImageProcessor")
    FineViTVLProcessor.register_for_auto_class("AutoProcessor")


class AutoModelForVision2Seq(AutoModelForImageTextToText):
    """Compatibility name: transformers 5 removed `AutoModelForVision2Seq`; it maps to `AutoModelForImageTextToText`.

    `finevit_vl.AutoModelForVision2Seq.from_pretrained(dir)` behaves exactly like
    `transformers.AutoModelForImageTextToText.from_pretrained(dir)`.
    """


__all__ = ["AutoModelForVision2Seq", "register_auto_classes"]
