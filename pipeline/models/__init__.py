"""Model families, one module each, found by ``config.json``'s ``model_type`` (or ``architectures``) and
imported lazily. A family module offers ``load_model(folder, ctx, device, dtype) -> CausalLM`` and
``make_front_end(folder, limits, video_sampling, max_prompt_tokens)``: the object whose
``build(text, images, videos)`` turns a request into a ``Prompt``."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from pipeline.models.base import CausalLM, StepMedia
from pipeline.models.loading import read_config

FAMILIES = {  # model_type -> module
    "fuyu": "pipeline.models.fuyu",
    "persimmon": "pipeline.models.fuyu",
    "gemma4_unified": "pipeline.models.gemma4_unified",
}
ARCHITECTURES = {  # architectures[0] -> model_type, for configs without a known model_type
    "FuyuForCausalLM": "fuyu",
    "PersimmonForCausalLM": "persimmon",
    "Gemma4UnifiedForConditionalGeneration": "gemma4_unified",
}

__all__ = ["CausalLM", "StepMedia", "FAMILIES", "get_family", "read_config"]


def get_family(folder: str | Path) -> ModuleType:
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        model_type = next((ARCHITECTURES[a] for a in config.get("architectures") or () if a in ARCHITECTURES),
                          model_type)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {config.get('model_type')!r} in {folder}/config.json; "
                         f"fusionserve runs {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])
