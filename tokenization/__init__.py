"""One token stream: the checkpoint's tokenizer, text + media interleaving, streaming detokenization."""
from tokenization.detokenize import IncrementalDetokenizer
from tokenization.interleave import Interleaver, MediaSpan, Prompt
from tokenization.text import TextTokenizer

__all__ = ["TextTokenizer", "Interleaver", "MediaSpan", "Prompt", "IncrementalDetokenizer"]
