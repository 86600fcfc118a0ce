"""What every model family's decoder offers the model runner."""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.attention import PagedAttention


@dataclass
class StepMedia:
    """The media rows of one step, for the positions their placeholder ids hold."""

    rows: torch.Tensor  # [P, row_dim] raw vision rows as the front end made them (uint8); the model normalizes
    indices: torch.Tensor  # [P] int64: token index in the step of each row
    position_ids: torch.Tensor | None = None  # [P, 2] (x, y) for a 2-D position embedding, if the family has one
    audio_rows: torch.Tensor | None = None  # [A, samples_per_token] float32 raw audio frames
    audio_indices: torch.Tensor | None = None  # [A] int64: token index in the step of each audio frame


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """RoPE sines [..., R] with the rotated half's sign folded in (-sin on the first half): see ``rotate``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over x's last dim (``sin`` from ``signed_sin``): x * cos + (x2, x1) * sin, equal bit for
    bit to the usual x * cos + (-x2, x1) * sin with one op less."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


class CausalLM(nn.Module, metaclass=ABCMeta):
    """A family's decoder over the paged KV pool: flat tokens in, hidden states and logits out."""

    max_position_embeddings: int
    vocab_size: int
    has_bidirectional_runs: bool = False  # its media runs attend both ways (the backend must support them)

    def attention_layers(self) -> list[PagedAttention]:
        """One per decoder layer, in order; the runner binds each to its part of the KV pool."""
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, media: StepMedia | None = None
                ) -> torch.Tensor:  # [T, hidden]
        ...

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, V] float32
        ...
