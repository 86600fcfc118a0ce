"""One token stream: the checkpoint's tokenizer, text + media interleaving, streaming detokenization."""
from tokenization.detokenize import IncrementalDetokenizer
from tokenization.interleave import Interleaver, MediaSlot, MediaSpan, Prompt, Segment
from tokenization.text import TextTokenizer

__all__ = ["TextTokenizer", "Interleaver", "MediaSlot", "Segment", "MediaSpan", "Prompt", "IncrementalDetokenizer"]
