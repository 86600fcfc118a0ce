"""tokenization/text.py against the transformers tokenizer FuyuProcessor loads from the same folder."""
from __future__ import annotations

import pytest

from tokenization import TextTokenizer

TEXTS = ["Hello world", "", "  two leading spaces", "émoji 😀 and 中文", "tabs\tand\nnewlines", "x" * 300,
         "<s> inside", "ends with <0x04>"]


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return TextTokenizer.from_pretrained(tiny_checkpoint)


def test_special_ids_match_transformers(tok, hf_processor):
    hf = hf_processor.tokenizer
    assert tok.bos_token_id == hf.bos_token_id and tok.eos_token_id == hf.eos_token_id
    assert tok.image_token_id == hf_processor.image_token_id
    assert tok.newline_token_id == hf_processor.image_newline_id
    assert tok.boa_token_id == hf.convert_tokens_to_ids("<0x04>")
    assert tok.vocab_size == len(hf.get_vocab())


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_processor, text):
    hf = hf_processor.tokenizer
    ids = tok.encode(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        TextTokenizer.from_pretrained(tmp_path)
