"""The checkpoint's tokenizer (``tokenizer.json`` via ``tokenizers``); Fuyu's special ids when asked for."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer

IMAGE_TOKEN = "|SPEAKER|"  # Fuyu's image-patch placeholder
NEWLINE_TOKEN = "|NEWLINE|"  # after each row of patches
BOA_TOKEN = "<0x04>"  # beginning of answer


def _token_content(value, default: str) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in some tokenizer_config.json files
        return value.get("content", default)
    return value or default


class TextTokenizer:
    """``encode`` never adds special tokens: the interleaver places ``<s>`` and ``<0x04>`` itself."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str = "<s>", eos_token: str = "</s>"):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = self._require(bos_token, "")
        self.eos_token_id = self._require(eos_token, "")

    def _require(self, token: str, family: str = "Fuyu ") -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token; is this a {family}checkpoint?")
        return token_id

    # Fuyu's layout ids
    @functools.cached_property
    def image_token_id(self) -> int:
        return self._require(IMAGE_TOKEN)

    @functools.cached_property
    def newline_token_id(self) -> int:
        return self._require(NEWLINE_TOKEN)

    @functools.cached_property
    def boa_token_id(self) -> int:
        return self._require(BOA_TOKEN)

    @classmethod
    def from_pretrained(cls, folder) -> TextTokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(Tokenizer.from_file(str(path)), bos_token=_token_content(config.get("bos_token"), "<s>"),
                   eos_token=_token_content(config.get("eos_token"), "</s>"))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
