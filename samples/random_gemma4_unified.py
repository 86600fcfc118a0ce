"""Make a Hugging Face-format Gemma 4 Unified checkpoint folder with random weights, using transformers itself.

The sibling of ``samples/random_checkpoint.py`` (Fuyu) for tests and benchmarks: ``config.json`` +
``model.safetensors`` from ``Gemma4UnifiedForConditionalGeneration.save_pretrained``, a ``tokenizer.json``
built with the ``tokenizers`` library, and the processor (``Gemma4UnifiedProcessor`` with its image and
video processors and audio feature extractor) from ``save_pretrained``, so ``AutoProcessor`` /
``AutoModelForImageTextToText.from_pretrained(folder)`` load it.

The tokenizer is laid out like Gemma's: ``<pad> <eos> <bos> <unk> <mask>`` (ids 0-4), the family's special
tokens (``<|image>`` boi, ``<image|>`` eoi, ``<|image|>``, ``<|audio>`` boa, ``<audio|>`` eoa, ``<|audio|>``,
``<|video|>``, the turn and channel markers of the chat template), the 256 byte pieces, ``▁``, printable
ASCII and a few merged words; spaces become ``▁`` (normalizer) and the post-processor prepends ``<bos>``,
as in Gemma's own ``tokenizer.json``. The chat template is a small faithful version of the real one.
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from samples.random_checkpoint import _merges_for

BASE_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's ids 0..4
# tokenizer_config.json attribute -> token (v5 reads every top-level "*_token" as a named special token)
NAMED_TOKENS = {
    "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>",
}
VIDEO_TOKEN = "<|video|>"  # an extra special token (the processor adds it by name)
WORDS = ("▁the", "▁is", "What", "▁this", "image", "video", "user", "model", "thought", "00")

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] in ['system', 'developer'] -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}{{- messages[0]['content'] | trim -}}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'developer'] -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- elif item['type'] in ['image', 'image_url'] -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] in ['audio', 'input_audio'] -%}{{- '<|audio|>' -}}"
    "{%- elif item['type'] in ['video', 'video_url'] -%}{{- '<|video|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
    "{%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}"
    "{%- endif -%}"
)


def build_tokenizer(extra_words: tuple[str, ...] = ()) -> Tokenizer:
    specials = list(BASE_TOKENS) + list(NAMED_TOKENS.values()) + [VIDEO_TOKEN]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for piece in [f"<0x{b:02X}>" for b in range(256)] + ["▁"]:
        vocab[piece] = len(vocab)
    for ch in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS + tuple(extra_words):
        merges += [m for m in _merges_for(word, vocab) if m not in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # as GemmaTokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    return tok


def token_ids(tok: Tokenizer) -> dict[str, int]:
    """``Gemma4UnifiedConfig``'s token-id fields for ``tok``."""
    ids = {name: tok.token_to_id(t) for name, t in NAMED_TOKENS.items()}
    return dict(image_token_id=ids["image_token"], boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"],
                video_token_id=tok.token_to_id(VIDEO_TOKEN), audio_token_id=ids["audio_token"],
                boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"])


def tiny_text_kwargs(**overrides) -> dict:
    """A Gemma4UnifiedTextConfig small enough for a test: 4 layers (sliding, full, sliding, full), hidden 64,
    sliding window 16, head dim 16 on sliding layers and 32 on full ones, 4 heads over 2 KV heads."""
    kwargs = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=None,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=16, max_position_embeddings=4096, final_logit_softcapping=30.0,
        attention_k_eq_v=False, num_kv_shared_layers=0, use_double_wide_mlp=False,
        use_bidirectional_attention="vision", rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    kwargs.update(overrides)
    return kwargs


# the benchmark model: hidden 512, 8 layers (5 sliding : 1 full, ending full), 8 heads over 4 KV heads
BENCH_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, global_head_dim=128, vocab_size=1024, sliding_window=512,
                  layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention",
                                                                                "full_attention"])


def make_processor(tok: Tokenizer, *, max_soft_tokens: int = 280, video_max_soft_tokens: int = 70,
                   video_num_frames: int = 32, patch_size: int = 16, pooling_kernel_size: int = 3,
                   audio_samples_per_token: int = 640, audio_seq_length: int = 750):
    """transformers' Gemma4UnifiedProcessor over ``tok`` (from ``build_tokenizer``)."""
    from transformers import (Gemma4UnifiedAudioFeatureExtractor, Gemma4UnifiedImageProcessor,
                              Gemma4UnifiedProcessor, Gemma4UnifiedVideoProcessor)
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    fast = GemmaTokenizer(tokenizer_object=tok, extra_special_tokens=[VIDEO_TOKEN], padding_side="right",
                          chat_template=CHAT_TEMPLATE, **NAMED_TOKENS)
    vision = dict(patch_size=patch_size, pooling_kernel_size=pooling_kernel_size)
    return Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(feature_size=audio_samples_per_token,
                                                             audio_samples_per_token=audio_samples_per_token),
        image_processor=Gemma4UnifiedImageProcessor(max_soft_tokens=max_soft_tokens, **vision),
        tokenizer=fast,
        video_processor=Gemma4UnifiedVideoProcessor(max_soft_tokens=video_max_soft_tokens,
                                                    num_frames=video_num_frames, **vision),
        chat_template=CHAT_TEMPLATE, image_seq_length=max_soft_tokens, audio_seq_length=audio_seq_length)


def _perturb_norms(model, generator) -> None:
    """Norm scales, biases and layer scalars away from their 1/0 init, so a parity test sees a missing one."""
    import torch

    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or "_ln" in name or leaf == "layer_scalar":
                if leaf in ("weight", "layer_scalar"):
                    tensor.copy_(1 + 0.2 * torch.randn(tensor.shape, generator=generator).to(tensor))
                elif leaf == "bias":
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator).to(tensor))


def make_checkpoint(out_dir: str | Path, *, seed: int = 0, max_soft_tokens: int = 280,
                    video_max_soft_tokens: int = 70, video_num_frames: int = 32, patch_size: int = 16,
                    pooling_kernel_size: int = 3, mm_posemb_size: int = 1120, audio_samples_per_token: int = 640,
                    with_audio: bool = True, perturb_norms: bool = True, dtype: str = "float32",
                    device: str = "cpu", **text_overrides) -> Path:
    """Write a random Gemma4UnifiedForConditionalGeneration with tokenizer and processor to ``out_dir``.

    ``text_overrides`` go to ``Gemma4UnifiedTextConfig`` (see ``tiny_text_kwargs``: layer types, sliding window,
    ``global_head_dim``, KV heads, ``num_kv_shared_layers``, ``attention_k_eq_v``, softcapping, vocab size...)."""
    import torch
    from transformers import (Gemma4UnifiedAudioConfig, Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration,
                              Gemma4UnifiedTextConfig, Gemma4UnifiedVisionConfig)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_kwargs = tiny_text_kwargs(**text_overrides)
    tok = build_tokenizer()
    if tok.get_vocab_size() > text_kwargs["vocab_size"]:
        raise ValueError(f"vocab_size {text_kwargs['vocab_size']} is smaller than the tokenizer "
                         f"({tok.get_vocab_size()} tokens)")
    hidden = text_kwargs["hidden_size"]
    vision = Gemma4UnifiedVisionConfig(patch_size=patch_size, pooling_kernel_size=pooling_kernel_size,
                                       mm_embed_dim=hidden, output_proj_dims=hidden, mm_posemb_size=mm_posemb_size)
    audio = Gemma4UnifiedAudioConfig(audio_embed_dim=audio_samples_per_token) if with_audio else None
    config = Gemma4UnifiedConfig(text_config=Gemma4UnifiedTextConfig(**text_kwargs), vision_config=vision,
                                 audio_config=audio, **token_ids(tok))
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma4UnifiedForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    if perturb_norms:
        _perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    # as the published checkpoints: a chat answer ends at <eos> or at the end of its turn
    model.generation_config.eos_token_id = [tok.token_to_id("<eos>"), tok.token_to_id("<turn|>")]
    model.save_pretrained(out_dir)
    make_processor(tok, max_soft_tokens=max_soft_tokens, video_max_soft_tokens=video_max_soft_tokens,
                   video_num_frames=video_num_frames, patch_size=patch_size, pooling_kernel_size=pooling_kernel_size,
                   audio_samples_per_token=audio_samples_per_token).save_pretrained(out_dir)
    return out_dir


def make_bench_checkpoint(out_dir: str | Path, **overrides) -> Path:
    """The benchmark-size model (``BENCH_TEXT``), seed 0."""
    return make_checkpoint(out_dir, seed=0, **{**BENCH_TEXT, **overrides})


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--bench", action="store_true", help="the benchmark-size model (hidden 512, 8 layers)")
    args = parser.parse_args()
    print((make_bench_checkpoint if args.bench else make_checkpoint)(args.out_dir))
