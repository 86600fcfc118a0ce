"""fusionserve's engine: model, paged KV cache, scheduler and the Python ``Pipeline``.

    from pipeline import Pipeline, SamplingParams
"""
from __future__ import annotations

_EXPORTS = {
    "Pipeline": "pipeline.pipeline",
    "SamplingParams": "pipeline.sampling",
    "Engine": "pipeline.engine",
    "EngineConfig": "pipeline.config",
    "RequestOutput": "pipeline.outputs",
    "StreamChunk": "pipeline.outputs",
    "Usage": "pipeline.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # lazy: `import pipeline.scheduler` stays free of torch models and media decoders
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
