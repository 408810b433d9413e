"""Perplexity on the held-out text and greedy generations: the converter's accuracy check."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["perplexity", "greedy_generate", "DEFAULT_PROMPTS"]

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """``exp(mean next-token NLL)`` over ``windows [n, seqlen]`` (each window scored on its own)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, seqlen >= 2], got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts=DEFAULT_PROMPTS, *, max_new_tokens: int = 24) -> list[str]:
    """Greedy continuations (new text only) of ``prompts``."""
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out
