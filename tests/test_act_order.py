"""Act-order, concatenating and reading shards of GPTQ tensors: exact rearrangements of W."""

import pytest
import torch

from hadacore.checkpoint.read import DictSource, read_gptq
from hadacore.quant.act_order import (
    act_order_perm,
    fold_into_gate_up,
    is_sorted_by_group,
    permute_input_columns,
    permute_output_rows,
    sort_by_group,
)
from hadacore.formats.gptq import concat_output_rows, dequantize_gptq, pack_gptq

N, K, GS = 64, 256, 32


def _act_order_tensors(gen, n=N, k=K, gs=GS):
    """Random GPTQ tensors whose groups were assigned in a random (act-order) column order."""
    order = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = torch.rand(k // gs, n, generator=gen) + 0.1
    zeros = torch.randint(1, 17, (k // gs, n), generator=gen)  # GPTQ v1 zeros are 1..16
    return pack_gptq(q, scales, zeros, g_idx)


def _w(t, gs=GS):
    return dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], gs, dtype=torch.float64)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def test_input_permutation_sorts_groups_and_keeps_the_product(gen):
    t = _act_order_tensors(gen)
    assert not is_sorted_by_group(t["g_idx"])
    tp, perm = sort_by_group(t)
    assert torch.equal(perm, act_order_perm(t["g_idx"])) and sort_by_group(tp)[1] is None
    assert is_sorted_by_group(tp["g_idx"])
    torch.testing.assert_close(_w(tp), _w(t)[:, perm], rtol=0, atol=0)
    x = torch.randn(3, K, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(x[:, perm] @ _w(tp).T, x @ _w(t).T)


def test_output_permutation_permutes_rows(gen):
    t = _act_order_tensors(gen)
    perm = torch.randperm(N, generator=gen)
    torch.testing.assert_close(_w(permute_output_rows(t, perm)), _w(t)[perm], rtol=0, atol=0)


def test_mlp_fold_removes_the_gather(gen):
    """silu(x Wg[P]^T) * (x Wu[P]^T) @ Wd[:, P]^T == the original MLP: the gather is gone."""
    hidden, inter = 64, 128
    gate, up = (_act_order_tensors(gen, n=inter, k=hidden) for _ in range(2))
    down = _act_order_tensors(gen, n=hidden, k=inter)
    gate_p, up_p, down_p = fold_into_gate_up(gate, up, down)
    x = torch.randn(5, hidden, dtype=torch.float64, generator=gen)
    ref = (torch.nn.functional.silu(x @ _w(gate).T) * (x @ _w(up).T)) @ _w(down).T
    out = (torch.nn.functional.silu(x @ _w(gate_p).T) * (x @ _w(up_p).T)) @ _w(down_p).T
    torch.testing.assert_close(out, ref)
    assert is_sorted_by_group(down_p["g_idx"])


def test_concat_output_rows(gen):
    base = _act_order_tensors(gen)
    parts = [base] + [
        pack_gptq(torch.randint(0, 16, (n, K), generator=gen), torch.rand(K // GS, n, generator=gen),
                  torch.randint(1, 17, (K // GS, n), generator=gen), base["g_idx"])
        for n in (16, 8)
    ]
    fused = concat_output_rows(parts)
    torch.testing.assert_close(_w(fused), torch.cat([_w(p) for p in parts]), rtol=0, atol=0)
    other = _act_order_tensors(gen)
    with pytest.raises(ValueError, match="g_idx"):
        concat_output_rows([base, other])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_shards_reassemble(gen, world, act_order):
    t = _act_order_tensors(gen)
    if not act_order:
        t = permute_input_columns(t, act_order_perm(t["g_idx"]))
    w = _w(t)
    src = DictSource({f"w.{k}": v for k, v in t.items()})
    cols = [_w(read_gptq(src, "w", out_index=torch.arange(r * N // world, (r + 1) * N // world))) for r in range(world)]
    torch.testing.assert_close(torch.cat(cols, 0), w, rtol=0, atol=0)
    rows = [read_gptq(src, "w", in_index=torch.arange(r * K // world, (r + 1) * K // world)) for r in range(world)]
    torch.testing.assert_close(torch.cat([_w(s) for s in rows], 1), w, rtol=0, atol=0)
    if not act_order:  # group-aligned sorted shards own exactly their groups
        assert all(s["scales"].shape[0] == K // GS // world for s in rows)


def test_bad_inputs(gen):
    t = _act_order_tensors(gen)
    with pytest.raises(ValueError, match="permutation"):
        permute_input_columns(t, torch.zeros(K, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiples of 8"):
        read_gptq(DictSource({f"w.{k}": v for k, v in t.items()}), "w", out_index=torch.arange(12))
