"""GPTQ: equals a column-by-column reference, beats RTN on the Hessian-weighted error."""

import pytest
import torch

from hadacore.formats.gptq import dequantize_gptq, unpack_gptq
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


def reference_gptq(W, H, *, bits, group_size, act_order, percdamp=0.01, clip=False, sym=True,
                   static_groups=False, dXXT=None, alpha=0.25):
    """The algorithm as written in the papers: one column at a time, no blocks, fp64
    (``clip``: each group's grid by the reference Quantizer's mse=True search;
    ``static_groups``: grids from the weight before any update; ``dXXT``: GPTAQ's
    asymmetric term, ``P = alpha * triu(dXXT U^T, 1) U`` with ``H^-1 = U^T U``).

    Returns ``(dequantized weight in the original column order, order)``."""
    W = W.double().clone()
    H = H.double().clone()
    n, k = W.shape
    maxq = 2**bits - 1
    gs = k if group_size == -1 else group_size
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grid = lambda cols: [t.double() for t in quant_grid(cols, bits, sym, clip=clip, scale_dtype=torch.float64)]
    static = [grid(W[:, g : g + gs]) for g in range(0, k, gs)]  # from the weight as given
    order = torch.argsort(-torch.diagonal(H), stable=True) if act_order else torch.arange(k)
    W, H = W[:, order], H[order][:, order]
    H += percdamp * torch.diagonal(H).mean() * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # H^-1 = U^T U
    P = torch.zeros_like(H)
    if dXXT is not None:
        D = dXXT.double().clone()
        D[:, dead] = 0
        P = alpha * torch.triu(D[order][:, order] @ U.T, diagonal=1) @ U
    Q = torch.zeros_like(W)
    for j in range(k):
        if group_size == -1 or static_groups:
            scale, zero = static[int(order[j]) // gs]
        elif j % gs == 0:
            scale, zero = grid(W[:, j : j + gs])
        w = W[:, j].clone()
        q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
        Q[:, j] = scale * (q - zero)
        err = (w - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :] - w[:, None] * P[j, j:][None, :]
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


def _gptq_vs_reference(n, k, group_size, act_order, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = _calibration(4 * k, k, seed=seed)
    x[:, 3] = 0  # a dead input
    H = _hessian(x)
    t = gptq_quantize(W, H, bits=4, group_size=group_size, act_order=act_order,
                      scale_dtype=torch.float64, compute_dtype=torch.float64, **kw)
    got = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size, 4)
    want, order = reference_gptq(W, H, bits=4, group_size=group_size, act_order=act_order, **kw)
    return t, got.double(), want, order


@pytest.mark.parametrize("group_size,act_order,k", [(32, True, 256), (64, False, 192), (-1, True, 160)])
def test_asymmetric_gptq_matches_reference(group_size, act_order, k):
    t, got, want, _ = _gptq_vs_reference(16, k, group_size, act_order, seed=k, sym=False, clip=True)
    assert (got - want).norm() / want.norm() < 1e-6
    zeros = unpack_gptq(t)[2]
    assert len(zeros.unique()) > 2  # really asymmetric: zeros vary (symmetric: all 8)


@pytest.mark.parametrize("group_size,act_order,k", [(32, True, 256), (64, True, 192), (16, False, 80)])
def test_static_groups_match_reference_and_keep_g_idx_sorted(group_size, act_order, k):
    t, got, want, _ = _gptq_vs_reference(16, k, group_size, act_order, seed=k + 1, static_groups=True, clip=True)
    assert (got - want).norm() / want.norm() < 1e-6
    assert torch.equal(t["g_idx"].long(), torch.arange(k) // group_size)  # natural groups, even with act-order
    lazy = gptq_quantize(torch.randn(16, k, dtype=torch.float64), torch.eye(k, dtype=torch.float64) + 0.1,
                         group_size=group_size, act_order=act_order)
    assert lazy["scales"].shape == t["scales"].shape


@pytest.mark.parametrize("group_size,act_order,k", [(32, True, 256), (64, True, 192), (48, False, 144), (-1, True, 160)])
def test_gptaq_matches_column_by_column_reference(group_size, act_order, k):
    # group 48 with 128-column blocks: groups would straddle blocks; GPTAQ widens the block.
    x = _calibration(4 * k, k, seed=5)
    dXXT = 2.0 / x.shape[0] * (0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)).t() @ x
    for alpha in (0.25, 1.0):
        _, got, want, _ = _gptq_vs_reference(16, k, group_size, act_order, seed=k + 2, dXXT=dXXT, alpha=alpha)
        assert (got - want).norm() / want.norm() < 1e-6, alpha


def test_gptaq_without_asymmetry_is_gptq():
    k = 192
    H = _hessian(_calibration(4 * k, k, seed=8)).float()
    W = torch.randn(24, k, generator=torch.Generator().manual_seed(9))
    plain = gptq_quantize(W, H, group_size=64)
    for key, t in gptq_quantize(W, H, group_size=64, dXXT=torch.zeros_like(H), alpha=1.0).items():
        assert torch.equal(t, plain[key]), key


def test_gptaq_lowers_the_error_against_the_fp_output():
    """Inputs x_q (as the quantized model computes them) differ from the fp model's x: GPTAQ's
    target is ``W x``, not ``W x_q``, so its ``|x W^T - x_q Q^T|`` is lower than GPTQ's."""
    n, k, s = 48, 256, 2048
    g = torch.Generator().manual_seed(10)
    x = _calibration(s, k, seed=11).float()
    x_q = x + 0.3 * torch.randn(s, k, generator=g) * x.std(0) + 0.1 * x @ (torch.randn(k, k, generator=g) / k**0.5)
    W = torch.randn(n, k, generator=g)
    acc = HessianAccumulator(k, asymmetric=True)
    for a, b in zip(x_q.split(500), x.split(500)):
        acc.add(a, b)
    torch.testing.assert_close(acc.H.double(), _hessian(x_q.double()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acc.dXXT.double(), 2.0 / s * (x - x_q).double().t() @ x_q.double(), rtol=1e-4, atol=1e-4)

    def err(t):
        Q = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 64, 4)
        return float((x @ W.t() - x_q @ Q.t()).norm() / (x @ W.t()).norm())

    e_gptq = err(gptq_quantize(W, acc.H, group_size=64, scale_dtype=torch.float32))
    for alpha in (0.25, 1.0):
        e_gptaq = err(gptq_quantize(W, acc.H, group_size=64, scale_dtype=torch.float32, dXXT=acc.dXXT, alpha=alpha))
        assert e_gptaq < 0.99 * e_gptq, (alpha, e_gptaq, e_gptq)
    with pytest.raises(ValueError, match="x_fp"):
        acc.add(x_q)


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
