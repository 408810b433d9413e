"""Offline rotations of a Llama-family model (QuaRot / SpinQuant R1, R2, R4-weight).

Everything here is an exact rewrite of an fp model: the rotated model computes the
same logits (up to fp rounding; each weight is rotated in fp64 and rounded once).

- :func:`fold_norms` moves each RMSNorm gain into the linears that read the norm's
  output (q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``,
  ``lm_head`` after the final norm) and sets the gains to 1. A gain-free RMSNorm
  commutes with any orthogonal ``Q``: ``rms(x Q) = rms(x)``.
- R1: ``Q1 = diag(s) H_D / sqrt(D)`` with seeded random signs ``s``, on the residual
  stream. Readers get ``W <- W Q1``, writers (o_proj, down_proj) ``W <- Q1^T W``, the
  embedding ``E <- E Q1``. Tied embeddings are untied first (the lm_head reads the
  stream, the embedding writes it).
- R2: ``H_hd / sqrt(hd)`` per attention head, on the V output and the O input.
- R4 (weight side): ``W_down <- W_down R4`` with ``R4 = I_b (x) H_{I/b} / sqrt(I/b)``
  (``b`` blocks: 1, or the TP degree so each row-parallel shard owns its own
  transform); the runtime applies the same ``R4`` to the down_proj input.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

import hadacore.ops  # noqa: F401  (registers torch.ops.hadacore.hadamard)
from hadacore.convert.modules import OnlineHadamardLinear

__all__ = ["untie_embeddings", "fold_norms", "random_signs", "rotate_r1", "rotate_r2", "rotate_r4_weights"]

log = logging.getLogger(__name__)


def _hadamard_last(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``(x * signs) @ H_n / sqrt(n)`` along the last dim, in fp64."""
    n = x.shape[-1]
    return torch.ops.hadacore.hadamard(x.double(), 1.0 / math.sqrt(n), None if signs is None else signs.double(), None)


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def untie_embeddings(model: nn.Module) -> None:
    """Give ``lm_head`` its own weight (a copy of the embedding) and mark the config untied."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        log.info("untied lm_head from the input embedding")
    model.config.tie_word_embeddings = False


@torch.no_grad()
def _fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in readers:
        _set(lin.weight, lin.weight.double() * g)
    norm.weight.fill_(1.0)


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Fold every RMSNorm gain into the linears it feeds; gains become 1. Unties first."""
    untie_embeddings(model)
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        _fold(layer.input_layernorm, [at.q_proj, at.k_proj, at.v_proj])
        _fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    _fold(model.model.norm, [model.lm_head])


def random_signs(n: int, seed: int) -> torch.Tensor:
    """Seeded ``+-1`` vector (fp64): the random diagonal of R1 (same seed, same signs)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).double()


def _linear(module: nn.Module) -> nn.Linear:
    """The float linear (inside the R4 wrapper, once R4 is applied: R1/R2 commute with it)."""
    return module.linear if isinstance(module, OnlineHadamardLinear) else module


@torch.no_grad()
def rotate_r1(model: nn.Module, signs: torch.Tensor | None = None, *, matrix: torch.Tensor | None = None) -> None:
    """Rotate the residual stream by ``Q1``: ``diag(signs) H_D / sqrt(D)`` (a seeded random
    Hadamard, applied as a transform), or a learned orthogonal ``matrix`` ``[D, D]`` (fp64).
    Readers ``W <- W Q1``, writers ``W <- Q1^T W``, the embedding ``E <- E Q1``. Norms must be folded."""
    if (signs is None) == (matrix is None):
        raise ValueError("rotate_r1 takes signs (random Hadamard) or a matrix (learned), not both")
    last = (lambda w: _hadamard_last(w, signs)) if matrix is None else (lambda w: w.double() @ matrix.double())
    emb = model.get_input_embeddings()
    _set(emb.weight, last(emb.weight))
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):  # readers: W Q1
            _set(lin.weight, last(lin.weight))
        for lin in (at.o_proj, _linear(mlp.down_proj)):  # writers: Q1^T W = (W^T Q1)^T
            _set(lin.weight, last(lin.weight.t()).t())
            if lin.bias is not None:
                _set(lin.bias, last(lin.bias))
    _set(model.lm_head.weight, last(model.lm_head.weight))


@torch.no_grad()
def rotate_r2(model: nn.Module, head_dim: int, *, matrices: torch.Tensor | None = None) -> None:
    """Per-head ``R2``: ``H_hd / sqrt(hd)``, or each layer's learned ``matrices[i]`` ``[hd, hd]``,
    on V's output rows of every KV head and O's input columns of every query head (GQA: a
    query head reads its KV head's rotated values)."""
    for i, layer in enumerate(model.model.layers):
        last = _hadamard_last if matrices is None else (lambda w, r=matrices[i].double(): w.double() @ r)
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        w = v.weight.double()  # [KV*hd, D]: per head R2^T W_h = (W_h^T R2)^T
        kv = w.shape[0] // head_dim
        w = last(w.view(kv, head_dim, -1).transpose(1, 2)).transpose(1, 2).reshape(v.weight.shape)
        _set(v.weight, w)
        if v.bias is not None:
            _set(v.bias, last(v.bias.view(kv, head_dim)).reshape(-1))
        wo = o.weight.double()  # [D, H*hd]: per head W_h R2
        _set(o.weight, last(wo.view(wo.shape[0], -1, head_dim)).reshape(o.weight.shape))


@torch.no_grad()
def rotate_r4_weights(model: nn.Module, blocks: int = 1) -> None:
    """``W_down <- W_down (I_blocks (x) H_{I/blocks}) / sqrt(I/blocks)``: the offline half of R4.

    Each down_proj becomes an :class:`OnlineHadamardLinear` applying the online half, so
    the model still computes the same function.
    """
    for layer in model.model.layers:
        d = layer.mlp.down_proj
        if isinstance(d, OnlineHadamardLinear):
            raise ValueError("R4 is already applied to this model")
        n, k = d.weight.shape
        _set(d.weight, _hadamard_last(d.weight.view(n, blocks, k // blocks)).reshape(n, k))
        layer.mlp.down_proj = OnlineHadamardLinear(d, k // blocks)
