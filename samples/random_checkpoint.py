"""Make a Hugging Face-format Fuyu checkpoint folder with random weights, using transformers itself.

Tests, benchmarks and the bundled model's training start from this: ``config.json`` +
``model.safetensors`` (from ``FuyuForCausalLM.save_pretrained``), a ``tokenizer.json`` built with the
``tokenizers`` library, and the processor configuration (``FuyuProcessor.save_pretrained``).

The tokenizer is a byte-fallback BPE over characters, laid out like Fuyu's SentencePiece vocabulary:
``<unk> <s> </s>``, the 256 byte pieces ``<0x00>..<0xFF>`` (so ``<0x04>``, Fuyu's beginning-of-answer,
is id 7), ``▁``, printable ASCII, then ``|SPEAKER|`` (the image placeholder) and ``|NEWLINE|`` as
ordinary words built by merges, and any extra words given. A ``Metaspace(prepend_scheme="first")``
pre-tokenizer plus a ``Split`` that isolates the two image words makes ``FuyuProcessor``'s habit of
dropping the first id of the placeholder encoding (a ``▁``) come out right.
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

IMAGE_TOKEN = "|SPEAKER|"
NEWLINE_TOKEN = "|NEWLINE|"


def _merges_for(word: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for end in range(2, len(word) + 1):
        merges.append((word[: end - 1], word[end - 1]))
        vocab.setdefault(word[:end], len(vocab))
    return merges


def build_tokenizer(extra_words: tuple[str, ...] = ()) -> Tokenizer:
    vocab: dict[str, int] = {}
    for piece in ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]:
        vocab[piece] = len(vocab)
    for ch in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in (IMAGE_TOKEN, NEWLINE_TOKEN) + tuple(extra_words):
        merges += [m for m in _merges_for(word, vocab) if m not in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Split(Regex(r"\|SPEAKER\||\|NEWLINE\|"), behavior="isolated"),
    ])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>", "<0x04>")])
    return tok


def tiny_config_kwargs(**overrides) -> dict:
    """A FuyuConfig small enough for a test: 2 layers, hidden 64, patch 8."""
    kwargs = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=2048, patch_size=8, num_channels=3,
        image_size=64, rope_theta=10000.0, partial_rotary_factor=0.5, qk_layernorm=True,
        layer_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return kwargs


def make_processor(tok: Tokenizer, patch_size: int, target_height: int, target_width: int):
    """transformers' FuyuProcessor over ``tok`` (from ``build_tokenizer``) and a FuyuImageProcessor that fits images
    into ``target_height`` x ``target_width`` and cuts ``patch_size`` patches."""
    from transformers import FuyuImageProcessor, FuyuProcessor, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")
    image_processor = FuyuImageProcessor(size={"height": target_height, "width": target_width},
                                         patch_size={"height": patch_size, "width": patch_size})
    return FuyuProcessor(image_processor=image_processor, tokenizer=fast)


def make_checkpoint(out_dir: str | Path, *, seed: int = 0, target_height: int = 64, target_width: int = 64,
                    dtype: str = "float32", device: str = "cpu", **config_overrides) -> Path:
    """Write a random FuyuForCausalLM checkpoint with tokenizer and processor to ``out_dir``.

    ``dtype`` / ``device``: where the random weights are made and how they are saved (a 1B-parameter model
    initialises in seconds on a GPU, minutes on a CPU)."""
    import torch
    from transformers import FuyuConfig, FuyuForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = tiny_config_kwargs(**config_overrides)
    tok = build_tokenizer()
    assert tok.get_vocab_size() <= kwargs["vocab_size"], "vocab_size too small for the tokenizer"
    image_token_id = tok.token_to_id(IMAGE_TOKEN)
    config = FuyuConfig(image_token_id=image_token_id, **kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        model = FuyuForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(out_dir)
    make_processor(tok, kwargs["patch_size"], target_height, target_width).save_pretrained(out_dir)
    return out_dir
