"""The FineViT and FineViT-VL model files (flat, sibling imports only, so checkpoints carry them as remote code)."""

from .configuration_finevit import FINEVIT_PRESETS, FineViTConfig
from .configuration_finevit_contrastive import FineViTContrastiveConfig
from .configuration_finevit_mim import FineViTMaskedImageModelingConfig
from .configuration_finevit_vl import FineViTVLConfig
from .image_processing_finevit import FineViTImageProcessor
from .modeling_finevit import FineViTModel, FineViTPreTrainedModel
from .modeling_finevit_contrastive import FineViTContrastiveModel
from .modeling_finevit_mim import FineViTForMaskedImageModeling
from .modeling_finevit_vl import (
    FineViTVLForConditionalGeneration,
    FineViTVLModel,
    FineViTVLPreTrainedModel,
    FineViTVLProjector,
)
from .processing_finevit_contrastive import FineViTContrastiveProcessor
from .processing_finevit_vl import FineViTVLProcessor
from .vision_tower_specs import VISION_TOWER_SPECS, VisionTowerSpec, register_vision_tower


__all__ = [
    "FINEVIT_PRESETS",
    "VISION_TOWER_SPECS",
    "FineViTConfig",
    "FineViTContrastiveConfig",
    "FineViTContrastiveModel",
    "FineViTContrastiveProcessor",
    "FineViTForMaskedImageModeling",
    "FineViTImageProcessor",
    "FineViTMaskedImageModelingConfig",
    "FineViTModel",
    "FineViTPreTrainedModel",
    "FineViTVLConfig",
    "FineViTVLForConditionalGeneration",
    "FineViTVLModel",
    "FineViTVLPreTrainedModel",
    "FineViTVLProcessor",
    "FineViTVLProjector",
    "VisionTowerSpec",
    "register_vision_tower",
]
