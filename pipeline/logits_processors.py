"""Logits processors: in place on [B, V] float32 logits, each reading and writing only the (row, token) places it
changes, no [B, V] buffer (vLLM's order is the sampler's: logit bias, repetition penalty, frequency and presence
penalties, then min_tokens' stop-token mask).

- ``apply_logit_bias``: each row's {token id: bias} added.
- ``apply_repetition_penalty``: transformers' rule over the seen tokens (positive / p, negative * p).
- ``apply_frequency_presence_penalties``: OpenAI's, over the generated tokens.
- ``mask_tokens``: listed tokens to -inf (the min_tokens mask).
"""
from __future__ import annotations

import torch


def flat_token_index(histories: list, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token of each row's ids (a list or a long tensor) as a flat index row * vocab_size + token into [B, V]
    logits (repeats included), and its row: the penalties read and write only these places, no [B, V] buffer."""
    tokens = torch.cat([torch.as_tensor(h, dtype=torch.long, device=device) for h in histories])
    rows = torch.repeat_interleave(torch.arange(len(histories), device=device),
                                   torch.tensor([len(h) for h in histories], device=device))
    return rows * vocab_size + tokens, rows


def apply_repetition_penalty(logits: torch.Tensor, penalties: torch.Tensor, token_history: list[list[int]]) -> None:
    """In place, as transformers' RepetitionPenaltyLogitsProcessor: seen tokens' positive logits / p, negative * p.
    A repeated token is written more than once, always with the value computed from its original logit."""
    if not any(len(h) for h in token_history):
        return
    index, rows = flat_token_index(token_history, logits.shape[-1], logits.device)
    flat, p = logits.view(-1), penalties.index_select(0, rows)
    seen = flat.index_select(0, index)
    flat.index_copy_(0, index, torch.where(seen < 0, seen * p, seen / p))


def apply_frequency_presence_penalties(logits: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor,
                                       outputs: list[list[int]]) -> None:
    """In place, OpenAI's definition over each row's generated tokens:
    logit -= frequency * count(token in output) + presence * (count > 0)."""
    if not any(len(o) for o in outputs):
        return
    index, rows = flat_token_index(outputs, logits.shape[-1], logits.device)
    flat = logits.view(-1)
    flat.index_copy_(0, index, flat.index_select(0, index) - presence.index_select(0, rows))  # once per token
    flat.index_add_(0, index, frequency.index_select(0, rows), alpha=-1)  # once per occurrence


def flat_index(per_row: list, vocab_size: int, device) -> torch.Tensor:
    """Flat indices row * vocab_size + token of each row's listed token ids (a list, a dict's keys)."""
    return torch.tensor([row * vocab_size + token for row, ids in enumerate(per_row) for token in ids],
                        dtype=torch.long, device=device)


def apply_logit_bias(logits: torch.Tensor, biases: list[dict[int, float]]) -> None:
    """In place: each row's {token id: bias} added to those logits."""
    values = torch.tensor([value for bias in biases for value in bias.values()], dtype=logits.dtype,
                          device=logits.device)
    logits.view(-1).index_add_(0, flat_index(biases, logits.shape[-1], logits.device), values)


def mask_tokens(logits: torch.Tensor, token_ids: list[list[int]]) -> None:
    """In place: each row's listed tokens get -inf."""
    logits.view(-1).index_fill_(0, flat_index(token_ids, logits.shape[-1], logits.device), float("-inf"))
