"""Streaming detokenization: text deltas that never split a character and add up to the full decode.

Each ``add`` decodes a short window (the previous chunk's ids as context + the new ids) and emits the
part past the context, unless it ends in U+FFFD (an incomplete UTF-8 sequence from byte-fallback
tokens): then it waits for the next ids. The context keeps decoders that depend on neighbours
(Metaspace spaces, Strip of the first space) consistent with decoding everything at once.
"""
from __future__ import annotations

from tokenization.text import TextTokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix = 0  # window start: context ids already emitted
        self._read = 0  # ids up to here are emitted
        self._parts: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Take new ids; return the new complete text (possibly "")."""
        self.token_ids.extend(token_ids)
        context = self._decode(self.token_ids[self._prefix:self._read])
        window = self._decode(self.token_ids[self._prefix:])
        if len(window) <= len(context) or window.endswith(_INCOMPLETE):
            return ""
        delta = window[len(context):]
        self._prefix, self._read = self._read, len(self.token_ids)
        self._parts.append(delta)
        return delta

    def flush(self) -> str:
        """End of stream: whatever is held back (an incomplete sequence decodes to U+FFFD)."""
        full = self._decode(self.token_ids)
        emitted = self.text
        delta = full[len(emitted):] if full.startswith(emitted) else ""
        self._prefix = self._read = len(self.token_ids)
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self._parts)
