"""Shared fixtures: tiny models, processors and images built locally (no downloads)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from finevit_vl.tiny import build_tiny_model, build_tokenizer  # importing the package registers the Auto classes


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_qwen3(tokenizer):
    return build_tiny_model("qwen3", tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return build_tiny_model("llama", tokenizer=tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_qwen3):
    model, processor = tiny_qwen3
    path = tmp_path_factory.mktemp("tiny_ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture
def images():
    return [random_image(100, 150, 0), random_image(84, 84, 1), random_image(200, 120, 2)]
