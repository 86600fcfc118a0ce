"""What the bundled models' training scripts share: the per-question loss of a packed batch, AdamW with the
usual decay groups, and the loop (learning-rate schedule, clipping, loss log, periodic saves, a time limit).

Used by ``samples.train_gemma4_shapes``; ``samples.train_shapes`` (Fuyu) has the same pieces inline.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


def question_losses(logits: torch.Tensor, labels: torch.Tensor, question_ids: torch.Tensor,
                    question_tasks: list[str], task_weights: dict[str, float] | None = None,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """``logits`` [N, V] of the N labelled tokens, their ``labels`` and question ids [N] -> the mean over
    questions of each question's mean token loss (weighted by ``task_weights``, 1 for a task not named), and
    the mean loss per task."""
    token_loss = F.cross_entropy(logits, labels, reduction="none")
    num_q = len(question_tasks)
    per_question = torch.zeros(num_q).index_add_(0, question_ids, token_loss) / torch.bincount(question_ids,
                                                                                             minlength=num_q)
    per_task: dict[str, list[float]] = {}
    for task, value in zip(question_tasks, per_question.tolist()):
        per_task.setdefault(task, []).append(value)
    means = {t: sum(v) / len(v) for t, v in per_task.items()}
    if not task_weights:
        return per_question.mean(), means
    weights = torch.tensor([task_weights.get(t, 1.0) for t in question_tasks])
    return (per_question * weights).sum() / weights.sum(), means


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices except the token embedding."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def fit(model: torch.nn.Module, batches: Iterable, loss_fn: Callable, *, steps: int, lr: float, weight_decay: float,
        lr_at: Callable[[int], float], kind_at: Callable[[int], str], save: Callable[[], None], save_every: int,
        max_minutes: float | None = None) -> None:
    """One optimizer step per batch (``loss_fn(model, batch) -> (loss, per-task losses)``); the loss per
    ``kind:task`` printed every 50 steps, ``save()`` every ``save_every`` steps and at the end."""
    opt = adamw(model, lr, weight_decay)
    start, recent = time.time(), {}
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, per_task = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        kind = kind_at(step)
        for task, value in per_task.items():
            recent.setdefault(f"{kind}:{task}", []).append(value)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            losses = "  ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(recent.items()))
            print(f"step {step + 1}/{steps}  loss {losses}  lr {lr_at(step):.2e}  {time.time() - start:.0f} s",
                  flush=True)
            recent = {}
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save()
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
            print(f"stopped early after {step + 1} of {steps} steps ({max_minutes} min)", flush=True)
            break
    model.eval()
    save()
    print(f"trained in {time.time() - start:.0f} s", flush=True)
