"""A tiny random Llama with planted outlier channels, and text sampled from it: the model the
rotation-learning and scale-tuning tests train on (built from a config, no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["HIDDEN", "INTER", "HEADS", "KV", "LAYERS", "VOCAB", "HEAD_DIM", "BITS", "GROUP", "outlier_llama",
           "sampled_text", "model", "text"]

HIDDEN, INTER, HEADS, KV, LAYERS, VOCAB = 64, 128, 4, 2, 2, 96
HEAD_DIM = HIDDEN // HEADS
# 2-bit: a random tiny model at 4 bits loses so little (KL ~0.02 nats/token) that a rotation
# or a tuned scale has nothing measurable to win; at 2 bits it has (KL ~0.19).
BITS, GROUP = 2, 16


def outlier_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random GQA Llama whose input norms boost a few hidden channels 12x: the outlier
    channels rotations exist for (after folding, those weight columns dominate their groups)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV,
                      num_hidden_layers=LAYERS, vocab_size=VOCAB, tie_word_embeddings=False,
                      max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    outliers = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(seed))[:4]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
                if "layernorm" in name:
                    p[outliers] *= 12
            elif p.dim() == 2:
                p.mul_(4)  # larger weights: a sharper next-token distribution, a text with structure
    return model


@torch.no_grad()
def sampled_text(model: LlamaForCausalLM, rows: int = 48, length: int = 64, seed: int = 5) -> torch.Tensor:
    """``[rows, length]`` token ids sampled from ``model``: text it predicts well, so the
    quantization error shows in its perplexity."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (rows, 1), generator=g)
    for _ in range(length - 1):
        probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[:, -1].double(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


# The module-scoped fixtures the tests share (a test module imports them by name).
@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return outlier_llama()


@pytest.fixture(scope="module")
def text(model) -> torch.Tensor:
    return sampled_text(model)
