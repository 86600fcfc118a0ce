"""vLLM 0.24's ``fuyu.py`` hard-codes Fuyu-8b's ``|SPEAKER|`` / ``|NEWLINE|`` ids (71011, 71019) as module
globals; this sets them from the checkpoint's tokenizer before vLLM lays out an image or builds the model.
vLLM calls ``register`` in every one of its processes (entry point ``vllm.general_plugins``)."""
from __future__ import annotations

import functools

IMAGE_TOKEN = "|SPEAKER|"
NEWLINE_TOKEN = "|NEWLINE|"


def register() -> None:
    from vllm.model_executor.models import fuyu

    if getattr(fuyu, "_fusionserve_patched", False):
        return
    fuyu._fusionserve_patched = True
    prompt_updates = fuyu.FuyuMultiModalProcessor._get_prompt_updates
    model_init = fuyu.FuyuForCausalLM.__init__

    @functools.wraps(prompt_updates)
    def _get_prompt_updates(self, *args, **kwargs):
        vocab = self.info.get_tokenizer().get_vocab()
        fuyu._IMAGE_TOKEN_ID, fuyu._NEWLINE_TOKEN_ID = vocab[IMAGE_TOKEN], vocab[NEWLINE_TOKEN]
        return prompt_updates(self, *args, **kwargs)

    @functools.wraps(model_init)
    def __init__(self, *, vllm_config, prefix: str = ""):
        fuyu._IMAGE_TOKEN_ID = vllm_config.model_config.hf_config.image_token_id
        model_init(self, vllm_config=vllm_config, prefix=prefix)

    fuyu.FuyuMultiModalProcessor._get_prompt_updates = _get_prompt_updates
    fuyu.FuyuForCausalLM.__init__ = __init__
