"""Shared fixtures: a tiny random Fuyu checkpoint written by transformers itself (the reference)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through its interpreter; transformers imports triton, so set it first
    os.environ.setdefault("TRITON_INTERPRET", "1")

from samples.random_checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Folder with config.json, model.safetensors, tokenizer.json and processor_config.json."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-fuyu"), seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    from transformers import FuyuForCausalLM

    return FuyuForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_processor(tiny_checkpoint):
    from transformers import FuyuProcessor

    return FuyuProcessor.from_pretrained(tiny_checkpoint)
