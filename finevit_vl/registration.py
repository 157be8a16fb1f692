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
    FineViTContrastiveConfig,
    FineViTContrastiveModel,
    FineViTContrastiveProcessor,
    FineViTForMaskedImageModeling,
    FineViTImageProcessor,
    FineViTMaskedImageModelingConfig,
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
    # The encoder's pretraining stages: Stage I (masked image modeling) and Stage II (the dual encoder).
    for config_class, model_class in ((FineViTMaskedImageModelingConfig, FineViTForMaskedImageModeling),
                                      (FineViTContrastiveConfig, FineViTContrastiveModel)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        config_class.register_for_auto_class("AutoConfig")
        model_class.register_for_auto_class("AutoModel")
    AutoModel.register(FineViTConfig, FineViTModel, exist_ok=True)
    AutoModel.register(FineViTVLConfig, FineViTVLModel, exist_ok=True)
    AutoModelForImageTextToText.register(FineViTVLConfig, FineViTVLForConditionalGeneration, exist_ok=True)
    try:  # transformers >= 5.2x builds this mapping separately from ImageTextToText
        from transformers import AutoModelForMultimodalLM

        AutoModelForMultimodalLM.register(FineViTVLConfig, FineViTVLForConditionalGeneration, exist_ok=True)
    except ImportError:
        pass
    backends = {"pil": FineViTImageProcessor, "torchvision": FineViTImageProcessor}
    for config_class in (FineViTConfig, FineViTVLConfig, FineViTMaskedImageModelingConfig, FineViTContrastiveConfig):
        AutoImageProcessor.register(config_class, image_processor_classes=backends, exist_ok=True)
    AutoProcessor.register(FineViTVLConfig, FineViTVLProcessor, exist_ok=True)
    AutoProcessor.register(FineViTContrastiveConfig, FineViTContrastiveProcessor, exist_ok=True)
    FineViTContrastiveProcessor.register_for_auto_class("AutoProcessor")

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
