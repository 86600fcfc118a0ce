"""fusionserve's engine: model, paged KV cache, scheduler and the Python ``Pipeline``."""
