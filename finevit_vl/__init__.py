"""FineViT-VL: a fine-grained, native-resolution vision encoder plugged into any causal LLM.

Importing the package registers FineViT and FineViT-VL with the transformers Auto classes, so
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` work on saved checkpoints.
"""

from .models import (
    FINEVIT_PRESETS,
    FineViTConfig,
    FineViTImageProcessor,
    FineViTModel,
    FineViTPreTrainedModel,
    FineViTVLConfig,
    FineViTVLForConditionalGeneration,
    FineViTVLModel,
    FineViTVLPreTrainedModel,
    FineViTVLProcessor,
    FineViTVLProjector,
)
from .registration import AutoModelForVision2Seq, register_auto_classes


register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "FINEVIT_PRESETS",
    "AutoModelForVision2Seq",
    "FineViTConfig",
    "FineViTImageProcessor",
    "FineViTModel",
    "FineViTPreTrainedModel",
    "FineViTVLConfig",
    "FineViTVLForConditionalGeneration",
    "FineViTVLModel",
    "FineViTVLPreTrainedModel",
    "FineViTVLProcessor",
    "FineViTVLProjector",
    "register_auto_classes",
]
