"""tokenization/detokenize.py: streamed deltas vs the tokenizer's one-shot decode (emoji, CJK, specials)."""
from __future__ import annotations

import random

import pytest

from tokenization import IncrementalDetokenizer, TextTokenizer

TEXTS = ["Hello 😀 world", "中文字符和日本語のテキスト", "naïve café 🎉🎉👩‍👩‍👧 end", "plain ascii text only",
         "  leading spaces and trailing  ", "mixed 你好 ok 🚀!"]


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return TextTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode_and_never_split_characters(tok, text):
    ids = tok.encode(text)
    assert any(tok.tokenizer.id_to_token(i).startswith("<0x") for i in ids) or text.isascii()  # byte pieces
    full = tok.decode(ids)
    rng = random.Random(0)
    for _ in range(30):
        detok, deltas, i = IncrementalDetokenizer(tok), [], 0
        while i < len(ids):
            step = rng.randint(1, 3)
            deltas.append(detok.add(ids[i:i + step]))
            i += step
        deltas.append(detok.flush())
        assert "".join(deltas) == full == detok.text
        assert all("\ufffd" not in d for d in deltas)


def test_one_token_at_a_time_and_special_tokens(tok):
    ids = [tok.bos_token_id] + tok.encode("🙂 ok") + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == "🙂 ok"
    assert deltas[1:4] == ["", "", ""]  # first three bytes of the emoji held back
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(keep.add([i]) for i in ids) + keep.flush() == tok.decode(ids, skip_special_tokens=False)


def test_incomplete_tail_is_flushed(tok):
    ids = tok.encode("a😀")[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids) == ""  # held: the window ends inside a character
    assert detok.flush() == tok.decode(ids) and tok.decode(ids).startswith("a\ufffd")
