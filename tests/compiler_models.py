"""Tiny models and helpers shared by the compiler tests (test_backend.py, test_fxpasses_*.py)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import hadacore.ops  # noqa: F401
from hadacore.options import CompileOptions
from hadacore.fxpasses import PassContext, default_passes, run_passes
from hadacore.quant.linear import QuantLinear
from hadacore.quant.act_order import permute_input_columns
from hadacore.quant.rtn import rtn_gptq_tensors


# The ops the passes emit or match, as the tests count them.
W4A16 = torch.ops.hadacore.w4a16_gemm
DEQUANT = torch.ops.hadacore.gptq_dequantize
HADAMARD = torch.ops.hadacore.hadamard


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class TinyLlamaBlock(nn.Module):
    """One Llama decoder layer written by hand: RMSNorm, q/k/v with RoPE, GQA via
    repeat_kv, SDPA (or matmul-softmax-matmul), o_proj, residuals, SiLU-gated MLP."""

    def __init__(self, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128, sdpa=True):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.sdpa = heads, kv_heads, head_dim, sdpa
        self.input_norm, self.post_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        pos = torch.arange(s, device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.full((s, s), float("-inf"), device=x.device).triu(1)
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim) + mask
            a = torch.matmul(torch.softmax(scores, dim=-1), v)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, -1))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def act_order_quant_linear(linear: nn.Linear, group_size: int, *, seed: int = 0, online_hadamard: bool = False) -> QuantLinear:
    """A QuantLinear with an act-order (unsorted) ``g_idx``: RTN of W's columns taken in a
    random order, stored in the original column order, as GPTQ with desc_act does."""
    w = linear.weight.detach()
    if online_hadamard:
        w = torch.ops.hadacore.hadamard(w.float(), 1.0 / math.sqrt(w.shape[1])).to(w.dtype)
    order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
    tensors = rtn_gptq_tensors(w[:, order], 4, group_size, True, scale_dtype=w.dtype)
    tensors = permute_input_columns(tensors, torch.argsort(order))
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return QuantLinear.from_tensors(tensors, group_size=group_size, bias=bias, online_hadamard=online_hadamard)


def quantize_modules(model: nn.Module, group_size: int, *, act_order=(), online=()) -> nn.Module:
    """A copy of ``model`` with every nn.Linear replaced by an RTN QuantLinear in its reference
    numerics (dequantize + linear in the input's precision); names in ``act_order`` get
    unsorted g_idx, names in ``online`` an online Hadamard (weight rotated to match)."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                if any(full.endswith(a) for a in act_order):
                    q = act_order_quant_linear(child, group_size, online_hadamard=any(full.endswith(o) for o in online))
                else:
                    q = QuantLinear.from_linear(child, group_size=group_size, online_hadamard=any(full.endswith(o) for o in online))
                q.numerics = "reference"
                setattr(mod, child_name, q)
    return model


def capture(fn, *args, dynamic=False):
    """The Dynamo FX graph and real example inputs of ``fn(*args)`` (one graph expected)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():  # inference graphs (a grad-mode graph keeps dequantize -> linear)
        torch.compile(fn, backend=backend, dynamic=dynamic)(*args)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]


def apply_passes(gm, example_inputs, *, lowering: bool = False, **options) -> PassContext:
    """Run the backend's passes (and, with ``lowering``, the per-device lowering) on a
    captured graph in place; return the context. Without lowering the graph computes with
    the exact generic ops, so pass tests can hold fp32 tolerances."""
    with torch.no_grad():
        ctx = PassContext(gm, example_inputs, CompileOptions.from_mapping(options))
        run_passes(ctx, default_passes(lower=lowering))
    return ctx


def count(gm, target) -> int:
    """Calls of ``target`` (an op packet also matches its overloads)."""
    return sum(
        1 for n in gm.graph.nodes
        if n.op == "call_function" and (n.target == target or getattr(n.target, "overloadpacket", None) == target)
    )
