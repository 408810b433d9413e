"""Tiny random act-order GPTQ checkpoints for the TP and loader tests.

They are built the way a converter would build them, without calibration data: RTN on
the input columns taken in a random order (GPTQ act-order's storage: an unsorted
``g_idx``), optionally with down_proj's weight rotated by a block-diagonal Hadamard
(online R4 with a shard-local block). The single-process reference model uses plain
``QuantLinear`` layers (down_proj with ``online_hadamard=True, hadamard_block=b``), never
the TP code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from hadacore.checkpoint.config import ONLINE_METADATA_KEY, CheckpointConfig, GPTQSpec, OnlineRotations
from hadacore.checkpoint.write import write_safetensors
from hadacore.ops import block_hadamard_transform
from hadacore.formats.gptq import pack_gptq
from hadacore.quant.linear import QuantLinear
from hadacore.quant.rtn import quantize_rtn

__all__ = ["act_order_gptq", "tiny_llama_config", "write_tiny_checkpoint"]

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def act_order_gptq(w: torch.Tensor, group_size: int, perm: torch.Tensor, bits: int = 4) -> dict[str, torch.Tensor]:
    """GPTQ tensors of ``w [N, K]`` RTN-quantized with its columns grouped in the order ``perm``.

    Group ``g`` holds columns ``perm[g*group_size:(g+1)*group_size]``, so ``g_idx[perm[j]] =
    j // group_size``: the layout GPTQ act-order writes.
    """
    k = w.shape[1]
    q_perm, scales, zeros = quantize_rtn(w[:, perm], bits, group_size)
    intweight = torch.empty_like(q_perm)
    intweight[:, perm] = q_perm
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group_size).to(torch.int32)
    return pack_gptq(intweight, scales.to(w.dtype), zeros, g_idx, bits)


def block_local_perm(k: int, blocks: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(k) that maps each of ``blocks`` equal ranges to itself."""
    size = k // blocks
    return torch.cat([b * size + torch.randperm(size, generator=generator) for b in range(blocks)])


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    group_size: int = 16,
    r4_block: int | None = None,
    down_act_order: str = "global",
    config=None,
) -> nn.Module:
    """Write a random tiny act-order GPTQ Llama to ``out_dir``; return the fp32 reference model.

    ``down_act_order``: ``"global"`` (a random order over all columns) or ``"block"`` (a random
    order inside each ``r4_block``-sized range, what the converter writes for tp > 1 with R4).
    ``r4_block``: rotate down_proj's weight by ``I (x) H_{r4_block}`` and record online R4.
    Every other linear gets a global act-order.
    """
    from transformers import LlamaForCausalLM

    if down_act_order not in ("global", "block"):
        raise ValueError(f"down_act_order must be 'global' or 'block', got {down_act_order!r}")
    config = config or tiny_llama_config()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not any(name.endswith(f"{lin}.weight") for lin in LINEARS):
            tensors[name] = param.detach().clone().contiguous()
    for i, layer in enumerate(model.model.layers):
        for lin in LINEARS:
            mod_name, attr = lin.split(".")
            parent = getattr(layer, mod_name)
            w = getattr(parent, attr).weight.detach().float()
            k = w.shape[1]
            block = None
            if attr == "down_proj" and r4_block is not None:
                w, block = block_hadamard_transform(w, r4_block), r4_block  # the offline side of R4
            if attr == "down_proj" and down_act_order == "block":
                perm = block_local_perm(k, k // (r4_block or k), gen)
            else:
                perm = torch.randperm(k, generator=gen)
            gptq = act_order_gptq(w, group_size, perm)
            for key, t in gptq.items():
                tensors[f"model.layers.{i}.{lin}.{key}"] = t
            q = QuantLinear.from_tensors(gptq, group_size=group_size, online_hadamard=block is not None, hadamard_block=block)
            setattr(parent, attr, q)
    os.makedirs(out_dir, exist_ok=True)
    cfg = CheckpointConfig(
        model=config.to_dict(), gptq=GPTQSpec(bits=4, group_size=group_size, sym=True, desc_act=True),
        online=OnlineRotations(r4_block), dtype=torch.float32,
    )
    write_safetensors(tensors, Path(out_dir), metadata={ONLINE_METADATA_KEY: cfg.online.metadata()})
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    return model
