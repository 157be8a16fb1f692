"""Build the parts of the encoder's pretraining stages: Stage I's masked-modeling model and frozen teacher, Stage
II's dual encoder and its processor. The next-token stages' parts are `finevit_vl.train.model`.

`model.init: tiny` (or `preset`) builds the stage's model from `model.vision_preset` (random weights) once into
`run_dir/init`, saved as an ordinary folder and loaded back with `from_pretrained`, like Stage III's tiny models;
`model.path` loads a folder of the same stage (to continue it); `model.init_from` then carries what a previous stage
trained (`finevit_vl.train.handoff`).
"""

import logging
from pathlib import Path

import torch
from torch import nn

from ..data.image_samples import TeacherView
from .config import Config
from .model import build_once, tokenizer_corpus_of


logger = logging.getLogger(__name__)


def _finevit_config(config: Config):
    from ..encoders import preset_config

    vision_config = preset_config(config.model.vision_preset, config.data.max_pixels or 256 * 256)
    if vision_config.model_type != "finevit":
        raise ValueError(f"objective {config.objective} pretrains FineViT; model.vision_preset "
                         f"{config.model.vision_preset!r} is a {vision_config.model_type} tower (use finevit-<size>)")
    return vision_config


def _image_processor(config: Config, vision_config):
    from ..models import FineViTImageProcessor

    max_pixels = config.data.max_pixels or vision_config.native_image_size**2
    return FineViTImageProcessor(patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size,
                                 max_pixels=max_pixels, min_pixels=min(config.data.min_pixels or 56 * 56, max_pixels))


# ---------------------------------------------------------------------------------------------------- Stage I


def teacher_path(config: Config, accelerator) -> str:
    """The frozen teacher's folder: `mim.teacher`, or a random tiny one of `mim.teacher_preset` in run_dir/teacher."""
    if config.mim.teacher:
        return config.mim.teacher

    def build(tmp: Path) -> None:
        from ..encoders import preset_config, tower_image_processor
        from ..models.vision_adapters import build_vision_tower

        teacher_config = preset_config(config.mim.teacher_preset, config.data.max_pixels or 256 * 256)
        torch.manual_seed(config.seed + 1)
        build_vision_tower(teacher_config).save_pretrained(tmp)
        tower_image_processor(teacher_config, config.data.max_pixels or 256 * 256, 56 * 56, 2).save_pretrained(tmp)
        logger.info("built a random %s teacher into %s (set mim.teacher to a real one)", config.mim.teacher_preset,
                    tmp.with_name("teacher"))

    return build_once(Path(config.run_dir) / "teacher", accelerator, build)


def load_teacher(path: str, device) -> tuple[nn.Module, TeacherView]:
    """The frozen teacher (eval mode, no gradient) and how it takes an image (patch size, normalisation)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    from ..models.vision_adapters import vision_tower_class

    config = AutoConfig.from_pretrained(path)
    config = getattr(config, "vision_config", None) or config  # a full CLIP / SigLIP: its vision tower
    try:
        teacher = vision_tower_class(config).from_pretrained(path, config=config)
    except ValueError:
        teacher = AutoModel.from_pretrained(path)
    teacher.requires_grad_(False).eval().to(device)
    view = TeacherView(patch_size=config.patch_size)
    try:
        processor = AutoImageProcessor.from_pretrained(path)
        view = TeacherView(config.patch_size, tuple(processor.image_mean), tuple(processor.image_std))
    except (OSError, ValueError, AttributeError, TypeError):
        logger.warning("teacher %s has no image processor with image_mean / image_std; using ImageNet's", path)
    return teacher, view


def build_mim_model(config: Config, accelerator):
    """Stage I: `(FineViTForMaskedImageModeling, image processor, path)`."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    import finevit_vl  # noqa: F401  (registers the Auto classes)

    from ..models import FineViTForMaskedImageModeling, FineViTMaskedImageModelingConfig

    target_width = None
    if config.mim.target == "features":
        teacher_config = AutoConfig.from_pretrained(teacher_path(config, accelerator))
        target_width = (getattr(teacher_config, "vision_config", None) or teacher_config).hidden_size

    def build(tmp: Path) -> None:
        vision_config = _finevit_config(config)
        mim = config.mim
        model_config = FineViTMaskedImageModelingConfig(
            vision_config=vision_config, target=mim.target, target_hidden_size=target_width,
            mask_ratio=mim.mask_ratio, feature_loss=mim.feature_loss, normalize_target=mim.normalize_target,
            decoder_hidden_size=mim.decoder_hidden_size, decoder_num_layers=mim.decoder_num_layers,
            decoder_num_attention_heads=mim.decoder_num_attention_heads,
        )
        torch.manual_seed(config.seed)
        FineViTForMaskedImageModeling(model_config).save_pretrained(tmp)
        _image_processor(config, vision_config).save_pretrained(tmp)

    path = config.model.path or build_once(Path(config.run_dir) / "init", accelerator, build)
    model = AutoModel.from_pretrained(path, attn_implementation=config.model.attn_implementation or "sdpa")
    if model.config.model_type != "finevit_mim":
        raise ValueError(f"model.path {path} is a {model.config.model_type} folder, not a Stage I one; to start Stage I "
                         "from it set model.init: tiny (or preset) and model.init_from to it")
    if config.mim.target == "features" and model.config.target_hidden_size != target_width:
        raise ValueError(f"{path} predicts {model.config.target_hidden_size}-wide features but the teacher's are "
                         f"{target_width}")
    processor = AutoImageProcessor.from_pretrained(path)
    return model, processor, path


# ---------------------------------------------------------------------------------------------------- Stage II


def _text_lengths(config: Config) -> int:
    return max([config.contrastive.text_max_length] + [p.text_max_length for p in config.train.phases if p.text_max_length])


def _tiny_text_tower(config: Config):
    """A tiny random text tower and a tokenizer trained on the training captions."""
    from transformers import AutoConfig

    from ..tiny import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_corpus_of(config), config.model.vocab_size)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    # The context covers the longest text length of the run's phases; `text_overrides` may set more (so that runs
    # with different schedules share one architecture).
    text_config = AutoConfig.for_model(
        config.contrastive.text_model_type,
        **{**shape, "max_position_embeddings": _text_lengths(config), **config.contrastive.text_overrides},
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return text_config, None, tokenizer


def _pretrained_text_tower(path: str):
    """`(text config, text tower with weights, tokenizer)` from a text encoder folder or a full CLIP / SigLIP model."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from ..models.modeling_finevit_contrastive import TEXT_TOWER_CLASSES

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "text_config", None) is not None and config.model_type not in TEXT_TOWER_CLASSES:
        tower = AutoModel.from_pretrained(path).text_model  # a dual encoder: its text half
    elif config.model_type in TEXT_TOWER_CLASSES:
        tower = TEXT_TOWER_CLASSES[config.model_type].from_pretrained(path)
    else:
        tower = AutoModel.from_pretrained(path)
    return tower.config, tower, AutoTokenizer.from_pretrained(path)


def build_contrastive_model(config: Config, accelerator):
    """Stage II: `(FineViTContrastiveModel, FineViTContrastiveProcessor, path)`."""
    from transformers import AutoModel, AutoProcessor

    import finevit_vl  # noqa: F401  (registers the Auto classes)

    from ..models import FineViTContrastiveConfig, FineViTContrastiveModel, FineViTContrastiveProcessor

    def build(tmp: Path) -> None:
        vision_config = _finevit_config(config)
        contrastive = config.contrastive
        text_config, tower, tokenizer = (_pretrained_text_tower(contrastive.text_model) if contrastive.text_model
                                         else _tiny_text_tower(config))
        model_config = FineViTContrastiveConfig(
            vision_config=vision_config, text_config=text_config, projection_dim=contrastive.projection_dim,
            loss_type=contrastive.loss, text_pooling=contrastive.text_pooling,
        )
        torch.manual_seed(config.seed)
        model = FineViTContrastiveModel(model_config)
        if tower is not None:
            model.text_model.load_state_dict(tower.state_dict())
        model.save_pretrained(tmp)
        FineViTContrastiveProcessor(_image_processor(config, vision_config), tokenizer,
                                    text_max_length=contrastive.text_max_length).save_pretrained(tmp)

    path = config.model.path or build_once(Path(config.run_dir) / "init", accelerator, build)
    model = AutoModel.from_pretrained(path, attn_implementation=config.model.attn_implementation or "sdpa")
    if model.config.model_type != "finevit_contrastive":
        raise ValueError(f"model.path {path} is a {model.config.model_type} folder, not a Stage II one; to start Stage "
                         "II from it set model.init: tiny (or preset) and model.init_from to it")
    if model.config.loss_type != config.contrastive.loss:
        logger.warning("%s was built for the %s loss; training with contrastive.loss=%s", path, model.config.loss_type,
                       config.contrastive.loss)
        model.config.loss_type = config.contrastive.loss  # the loss in force decides what trains (freeze.py)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, path


def build_encoder_stage_model(config: Config, accelerator):
    """The parts of `config.objective`'s stage (masked_image or contrastive): `(model, processor, path)`."""
    build = build_mim_model if config.objective == "masked_image" else build_contrastive_model
    return build(config, accelerator)


__all__ = ["build_contrastive_model", "build_encoder_stage_model", "build_mim_model", "load_teacher", "teacher_path"]
