"""GPTQ: equals a column-by-column reference, beats RTN on the Hessian-weighted error."""

import pytest
import torch

from hadacore.quant.format import dequantize_gptq
from hadacore.quant.gptq import HessianAccumulator, act_order_perm_from_hessian, gptq_quantize, hessian_error
from hadacore.quant.rtn import quant_grid, rtn_gptq_tensors


def _calibration(n: int, k: int, seed: int) -> torch.Tensor:
    """Correlated inputs with uneven column scales, like real activations (act-order matters)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5
    col_scale = torch.exp(torch.randn(k, generator=g, dtype=torch.float64))
    return (torch.randn(n, k, generator=g, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64) + mix)) * col_scale


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.t() @ x


def reference_gptq(W, H, *, bits, group_size, act_order, percdamp=0.01, clip=False):
    """The algorithm as written in the paper: one column at a time, no blocks, fp64
    (``clip``: each group's grid by the reference Quantizer's mse=True search).

    Returns ``(dequantized weight in the original column order, order)``."""
    W = W.double().clone()
    H = H.double().clone()
    n, k = W.shape
    maxq = 2**bits - 1
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if group_size == -1:
        scale, zero = quant_grid(W, bits, True, clip=clip, scale_dtype=torch.float64)
    order = torch.argsort(-torch.diagonal(H), stable=True) if act_order else torch.arange(k)
    W, H = W[:, order], H[order][:, order]
    H += percdamp * torch.diagonal(H).mean() * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # H^-1 = U^T U
    Q = torch.zeros_like(W)
    for j in range(k):
        if group_size != -1 and j % group_size == 0:
            scale, zero = quant_grid(W[:, j : j + group_size], bits, True, clip=clip, scale_dtype=torch.float64)
        scale_, zero_ = scale.double(), zero.double()
        q = torch.clamp(torch.round(W[:, j] / scale_) + zero_, 0, maxq)
        Q[:, j] = scale_ * (q - zero_)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q[:, torch.argsort(order)], order


@pytest.mark.parametrize(
    "group_size,act_order,n,k",
    [(32, True, 16, 256), (64, True, 24, 192), (128, False, 8, 256), (-1, True, 16, 160), (16, True, 8, 80)],
)
@pytest.mark.parametrize("clip", [False, True])
def test_gptq_matches_column_by_column_reference(group_size, act_order, n, k, clip):
    # k=192, 160, 80 are not multiples of the 128-column block, and group 32/64/16 groups
    # start inside blocks: the lazy updates must still give the unblocked result.
    g = torch.Generator().manual_seed(k + n)
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = _calibration(4 * k, k, seed=k)
    x[:, 3] = 0  # a dead input
    H = _hessian(x)
    got_t = gptq_quantize(
        W, H, bits=4, group_size=group_size, act_order=act_order,
        scale_dtype=torch.float64, compute_dtype=torch.float64, clip=clip,
    )
    got = dequantize_gptq(got_t["qweight"], got_t["qzeros"], got_t["scales"], got_t["g_idx"], group_size, 4)
    want, order = reference_gptq(W, H, bits=4, group_size=group_size, act_order=act_order, clip=clip)
    rel = (got.double() - want).norm() / want.norm()
    assert rel < 1e-6, rel  # fp32 dequantization rounding only
    # g_idx: groups are consecutive in quantization order
    gs = k if group_size == -1 else group_size
    assert torch.equal(got_t["g_idx"].long()[order], torch.arange(k) // gs)


def test_gptq_block_local_order_keeps_groups_in_blocks():
    k, blocks, gs = 256, 4, 32
    x = _calibration(512, k, seed=1)
    H = _hessian(x)
    perm = act_order_perm_from_hessian(H, blocks=blocks)
    size = k // blocks
    assert torch.equal(perm.view(blocks, size).sort(dim=1).values, torch.arange(k).view(blocks, size))
    W = torch.randn(8, k, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = gptq_quantize(W, H, group_size=gs, perm=perm)
    g_idx = t["g_idx"].long().view(blocks, size)
    per_block = size // gs
    for b in range(blocks):  # block b's columns use only block b's groups
        assert g_idx[b].min() == b * per_block and g_idx[b].max() == (b + 1) * per_block - 1
    assert not torch.equal(t["g_idx"].long(), torch.arange(k) // gs)  # it did reorder


@pytest.mark.parametrize("group_size,act_order", [(64, True), (64, False), (-1, True)])
def test_gptq_hessian_error_below_rtn(group_size, act_order):
    n, k = 64, 256
    g = torch.Generator().manual_seed(7)
    W = torch.randn(n, k, generator=g)
    x = _calibration(1024, k, seed=3).float()
    acc = HessianAccumulator(k)
    for chunk in x.split(100):  # the running average equals the batch formula
        acc.add(chunk)
    H = acc.H
    torch.testing.assert_close(H.double(), _hessian(x.double()), rtol=1e-4, atol=1e-4)
    gptq = gptq_quantize(W, H, group_size=group_size, act_order=act_order, scale_dtype=torch.float32)
    rtn = rtn_gptq_tensors(W, 4, group_size, True, scale_dtype=torch.float32)
    deq = lambda t: dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size, 4)
    e_gptq, e_rtn = hessian_error(W, deq(gptq), H), hessian_error(W, deq(rtn), H)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert gptq_quantize(W, H, group_size=group_size)["scales"].dtype == torch.float16  # GPTQ's storage dtype


def test_gptq_rejects_bad_input():
    W = torch.randn(8, 96)
    H = torch.eye(96)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(W, H, group_size=64)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(W, torch.eye(64), group_size=32)
    with pytest.raises(ValueError, match="permutation"):
        gptq_quantize(W, H, group_size=32, perm=torch.zeros(96, dtype=torch.long))
