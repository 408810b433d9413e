"""GPTQ v1/v2 packing, dequantization and RTN: exact round trips, the bit layout by hand."""

import pytest
import torch
import torch.nn.functional as F

from hadacore.formats.gptq import check_gptq_tensors, default_g_idx, dequantize_gptq, pack_gptq, unpack_gptq
from hadacore.quant.linear import QuantLinear
from hadacore.quant.rtn import quant_grid, quantize_rtn, rtn_gptq_tensors


def _u32(x: int) -> int:
    """The int32 whose bit pattern is the unsigned 32-bit word ``x``."""
    return x - (1 << 32) if x >= 1 << 31 else x


def _random_gptq(gen, n, k, groups, bits, fmt, act_order):
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (n, k), generator=gen, dtype=torch.int32)
    lo = 1 if fmt == "gptq" else 0
    zeros = torch.randint(lo, lo + maxq + 1, (groups, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(groups, n, generator=gen).half() + 0.01
    g_idx = torch.arange(k, dtype=torch.int32) // (k // groups)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return q, scales, zeros, g_idx


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_pack_unpack_round_trip(bits, fmt, act_order):
    gen = torch.Generator().manual_seed(bits * 10 + act_order)
    n, k, groups = 48, 192, 3
    q, scales, zeros, g_idx = _random_gptq(gen, n, k, groups, bits, fmt, act_order)
    t = pack_gptq(q, scales, zeros, g_idx, bits, checkpoint_format=fmt)
    per = 32 // bits
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (k // per, n)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (groups, n // per)
    assert t["scales"].shape == (groups, n) and t["g_idx"].dtype == torch.int32
    q2, s2, z2, g2 = unpack_gptq(t, bits, checkpoint_format=fmt)
    assert torch.equal(q2, q) and torch.equal(z2, zeros) and torch.equal(s2, scales) and torch.equal(g2, g_idx)
    # a non-contiguous qweight takes the shift-based unpacker: same integers
    strided = {**t, "qweight": t["qweight"].t().contiguous().t()}
    assert not strided["qweight"].is_contiguous()
    assert torch.equal(unpack_gptq(strided, bits, checkpoint_format=fmt)[0], q)
    # dequantize is the formula, element by element (fp64 from exact fp32 products)
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], k // groups, bits,
                        checkpoint_format=fmt, dtype=torch.float64)
    gi = g_idx.long()
    want = (q.double() - zeros.t()[:, gi].double()) * scales.t()[:, gi].double()
    assert torch.equal(w, want)


def test_bit_layout_by_hand():
    """Value i of a word at bits 4i..4i+3; qweight packs along K, qzeros along N, v1 stores zero-1."""
    n, k = 16, 16
    q = torch.zeros(n, k, dtype=torch.int32)
    q[0, :8] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])  # column n=0, k=0..7 -> qweight[0, 0]
    q[3, 8:] = torch.tensor([15, 0, 0, 0, 0, 0, 0, 10])  # n=3, k=8..15 -> qweight[1, 3]
    zeros = torch.full((1, n), 8, dtype=torch.int32)
    zeros[0, 8:] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 16])  # n=8..15 -> qzeros[0, 1]
    t = pack_gptq(q, torch.ones(1, n), zeros, None, 4)
    assert t["qweight"][0, 0].item() == _u32(0x87654321)
    assert t["qweight"][1, 3].item() == _u32(0xA000000F)
    assert t["qweight"][0, 1].item() == 0 and t["qweight"][1, 0].item() == 0
    assert t["qzeros"][0, 0].item() == 0x77777777  # symmetric: zero 8 stored as 7
    assert t["qzeros"][0, 1].item() == _u32(0xF6543210)  # zero 16 is stored as 15
    # gptq_v2 stores the zero itself
    t2 = pack_gptq(q, torch.ones(1, n), torch.full((1, n), 8, dtype=torch.int32), None, 4, checkpoint_format="gptq_v2")
    assert t2["qzeros"][0, 0].item() == _u32(0x88888888)
    assert torch.equal(t2["qweight"], t["qweight"])
    # and the 8-bit layout: value i at bits 8i
    q8 = torch.zeros(4, 4, dtype=torch.int32)
    q8[1] = torch.tensor([0x01, 0x02, 0x03, 0xFF])
    t8 = pack_gptq(q8, torch.ones(1, 4), torch.full((1, 4), 128, dtype=torch.int32), None, 8)
    assert t8["qweight"][0, 1].item() == _u32(0xFF030201) and t8["qzeros"][0, 0].item() == _u32(0x7F7F7F7F)


def test_v1_zero_range():
    q = torch.zeros(8, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="zero 0 is not representable"):
        pack_gptq(q, torch.ones(1, 8), torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_gptq(q, torch.ones(1, 8), torch.full((1, 8), 16, dtype=torch.int32), checkpoint_format="gptq_v2")
    # a stored 15 reads as 16 (what exllama/vLLM compute), never as 0
    t = {"qweight": torch.zeros(1, 8, dtype=torch.int32), "qzeros": torch.full((1, 1), -1, dtype=torch.int32),
         "scales": torch.ones(1, 8)}
    assert torch.equal(unpack_gptq(t)[2], torch.full((1, 8), 16, dtype=torch.int32))
    assert torch.equal(dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], None, -1), torch.full((8, 8), -16.0))


def test_pack_rejects_bad_input():
    q = torch.zeros(8, 12, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiples of 8"):
        pack_gptq(q, torch.ones(1, 8), torch.full((1, 8), 8))
    q = torch.full((8, 16), 16, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"intweight values lie in \[16, 16\]; they must lie in \[0, 15\]"):
        pack_gptq(q, torch.ones(1, 8), torch.full((1, 8), 8))
    with pytest.raises(ValueError, match="g_idx"):
        pack_gptq(q.clamp(max=15), torch.ones(2, 8), torch.full((2, 8), 8), torch.full((16,), 2))
    with pytest.raises(ValueError, match="bits"):
        pack_gptq(q, torch.ones(1, 8), torch.full((1, 8), 8), bits=3)


def test_check_gptq_tensors_errors():
    t = rtn_gptq_tensors(torch.randn(16, 64), 4, 32)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    assert check_gptq_tensors(*args, 32) == (16, 64, 2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        check_gptq_tensors(*args, 48)
    with pytest.raises(ValueError, match="per-channel"):
        check_gptq_tensors(*args, -1)
    with pytest.raises(TypeError, match="int32"):
        check_gptq_tensors(t["qweight"].long(), *args[1:], 32)
    with pytest.raises(ValueError, match="inconsistent GPTQ shapes"):
        check_gptq_tensors(t["qweight"], t["qzeros"], t["scales"][:, :8], t["g_idx"], 32)
    with pytest.raises(ValueError, match="g_idx"):
        check_gptq_tensors(*args[:3], t["g_idx"][:32], 32)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 2, 8])
def test_rtn_within_half_a_step(group_size, sym, bits):
    gen = torch.Generator().manual_seed(group_size + 7 * sym + bits)
    n, k = 32, 256
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    w[0, : k if group_size == -1 else group_size] = torch.rand(k if group_size == -1 else group_size, generator=gen)
    w[1, :] = 0  # an all-zero row
    # fp32 scales: the bound holds exactly (up to one fp32 rounding)
    t = rtn_gptq_tensors(w, bits, group_size, sym, scale_dtype=torch.float32)
    q, scales, zeros, g_idx = unpack_gptq(t, bits)
    assert int(zeros.min()) >= 1, "v1 cannot store zero 0"
    if sym:
        assert torch.equal(zeros, torch.full_like(zeros, 1 << (bits - 1)))
    deq = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size, bits, dtype=torch.float64)
    step = scales.t()[:, g_idx.long()].double()
    err = (deq - w.double()).abs()
    assert (err <= 0.5 * step * (1 + 1e-4) + 1e-12).all(), (err / step).max()  # fp32 rounding of w/s and (q-z)*s
    assert torch.equal(deq[1], torch.zeros(k, dtype=torch.float64))
    # fp16 scales: the integers are rounded on the stored grid, so the bound holds up to
    # the clamp at the grid's edge (sym's top value sits exactly half a step out)
    t16 = rtn_gptq_tensors(w.half(), bits, group_size, sym)
    assert t16["scales"].dtype == torch.float16
    q16, s16, _, _ = unpack_gptq(t16, bits)
    deq16 = dequantize_gptq(t16["qweight"], t16["qzeros"], t16["scales"], t16["g_idx"], group_size, bits, dtype=torch.float64)
    step16 = s16.t()[:, g_idx.long()].double()
    assert ((deq16 - w.half().double()).abs() <= 0.5 * step16 * (1 + (1 << bits) * 2**-10)).all()


def _clip_search_reference(row: torch.Tensor, bits: int, sym: bool) -> tuple[float, float]:
    """GPTQ's Quantizer(mse=True) for one row, scalar by scalar: the (scale, zero) of least sum |err|^2.4."""
    maxq = 2**bits - 1
    xmin, xmax = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
    if sym:
        xmax = max(-xmin, xmax)
        xmin = -xmax
    best = (float("inf"), None, None)
    for i in range(20):
        p = 1 - i / 100
        lo, hi = p * xmin, p * xmax
        scale = torch.tensor((hi - lo) / maxq, dtype=torch.float32)
        zero = (maxq + 1) // 2 if sym else round(-lo / float(scale))
        if not sym and zero == 0:  # v1 cannot store zero 0: the grid quant_grid uses instead
            scale, zero = torch.tensor(hi / (maxq - 1), dtype=torch.float32), 1
        q = torch.clamp(torch.round(row / scale) + zero, 0, maxq)
        err = float(((scale * (q - zero) - row).abs() ** 2.4).sum())
        if err < best[0]:
            best = (err, float(scale), float(zero))
    return best[1], best[2]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 2])
def test_quant_grid_clip_search_is_the_reference_search(sym, bits):
    gen = torch.Generator().manual_seed(11 + bits + sym)
    w = torch.distributions.StudentT(3.0).sample((24, 64)) * torch.rand(24, 1, generator=gen)  # heavy tails: clipping pays
    w[0] = torch.rand(64, generator=gen) + 0.1  # all positive (asym: zero would round to 0)
    scale, zero = quant_grid(w, bits, sym, clip=True)
    for r in range(w.shape[0]):
        ref_scale, ref_zero = _clip_search_reference(w[r], bits, sym)
        assert float(scale[r]) == pytest.approx(ref_scale, rel=1e-6) and float(zero[r]) == ref_zero, r
    plain_scale, _ = quant_grid(w, bits, sym)
    assert (scale < plain_scale).any()  # some rows did clip
    assert (scale >= 0.8 * plain_scale * (1 - 1e-6)).all()  # and none by more than the search allows


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_rtn_clip_error_never_above_plain(group_size, sym, scale_dtype):
    # Clipped values may lie beyond half a step by design; what the search guarantees is
    # that each group's (stored-grid) error norm is no larger than min/max RTN's, since
    # the unclipped range is one of its candidates.
    gen = torch.Generator().manual_seed(group_size + sym)
    n, k = 16, 128
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    w[::3, ::7] *= 6  # outliers
    w[1] = 0
    gs = k if group_size == -1 else group_size

    def group_err(t):
        deq = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size, 4, dtype=torch.float64)
        return ((deq - w.double()).abs() ** 2.4).reshape(n, k // gs, gs).sum(-1)

    plain = rtn_gptq_tensors(w, 4, group_size, sym, scale_dtype=scale_dtype)
    clipped = rtn_gptq_tensors(w, 4, group_size, sym, scale_dtype=scale_dtype, clip=True)
    check_gptq_tensors(clipped["qweight"], clipped["qzeros"], clipped["scales"], clipped["g_idx"], group_size)
    e_plain, e_clip = group_err(plain), group_err(clipped)
    assert (e_clip <= e_plain * (1 + 1e-6)).all(), (e_clip / e_plain).max()
    assert (e_clip < 0.95 * e_plain).any()  # and it does find better grids
    assert torch.equal(e_clip[1], torch.zeros(k // gs, dtype=torch.float64))  # an all-zero row stays exact


def test_rtn_asym_zero_never_zero_and_quant_grid():
    w = torch.rand(4, 32) + 0.1  # all positive: the plain grid's zero would be 0
    scale, zero = quant_grid(w, 4, sym=False)
    assert torch.equal(zero, torch.ones(4)) and torch.allclose(scale, w.amax(1) / 14)
    q, s, z = quantize_rtn(w, 4, -1, sym=False)
    assert int(q.min()) >= 1 and int(q.max()) == 15
    with pytest.raises(ValueError, match="does not divide"):
        quantize_rtn(w, 4, 24)


def test_default_g_idx():
    assert torch.equal(default_g_idx(8, 4), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.int32))
    assert torch.equal(default_g_idx(8, -1), torch.zeros(8, dtype=torch.int32))


@pytest.mark.parametrize("group_size,bias", [(32, True), (-1, False)])
def test_quant_linear_is_the_plain_reference(group_size, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40, bias=bias)
    ql = QuantLinear.from_linear(lin, group_size=group_size, sym=False)
    x = torch.randn(3, 5, 64)
    w = dequantize_gptq(ql.qweight, ql.qzeros, ql.scales, ql.g_idx, group_size)
    torch.testing.assert_close(ql.reference(x), F.linear(x, w, lin.bias), rtol=0, atol=0)
    # RTN error is bounded by half a step of the layer's own scales
    assert ((w - lin.weight).abs() <= 0.5 * ql.scales.t()[:, ql.g_idx.long()] + 1e-7).all()
    # state dicts carry the GPTQ names and load into a fresh layer
    fresh = QuantLinear(64, 40, group_size=group_size, bias=bias, dtype=torch.float32)
    fresh(x)  # prepared for the zero weights it was made with...
    fresh.load_state_dict(ql.state_dict())  # ...and prepared again after the in-place load
    torch.testing.assert_close(fresh(x), ql(x), rtol=0, atol=0)
    # the fast (default) forward computes the same layer to bf16 accuracy
    y, ref = ql(x), x.double() @ w.double().T + (0 if lin.bias is None else lin.bias.double())
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("block", [16, 64])
def test_block_hadamard_transform_and_quant_linear_hadamard_block(block):
    """``block_hadamard_transform`` is ``x @ (I (x) H_b) * scale`` then ``[..., perm]``; a
    QuantLinear with ``hadamard_block`` applies it and computes the rotated float layer."""
    import math

    import hadacore
    from hadacore.ops import block_hadamard_transform

    torch.manual_seed(0)
    x, perm = torch.randn(3, 5, 64, dtype=torch.float64), torch.randperm(64)
    rot = torch.block_diag(*[hadacore.hadamard_matrix(block)] * (64 // block))
    ref = x @ rot / math.sqrt(block)
    torch.testing.assert_close(block_hadamard_transform(x, block), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block_hadamard_transform(x, block, perm=perm), ref[..., perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block_hadamard_transform(x, block, 0.5), x @ rot * 0.5, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="positive divisor"):
        block_hadamard_transform(x, 24)

    lin = torch.nn.Linear(64, 40)
    ql = QuantLinear.from_linear(lin, group_size=32, online_hadamard=True, hadamard_block=block)
    assert f"hadamard_block={block}" in repr(ql)
    xf = x.float()
    w = dequantize_gptq(ql.qweight, ql.qzeros, ql.scales, ql.g_idx, 32)
    exact = F.linear(block_hadamard_transform(xf, block), w, lin.bias)
    torch.testing.assert_close(ql.reference(xf), exact, rtol=0, atol=0)
    assert (ql(xf) - exact).norm() / exact.norm() < 1e-2  # the fast path: bf16 activations
    # the stored weight is W (I (x) H_b) / sqrt(b): the layer is a 4-bit approximation of lin
    assert (ql(xf) - lin(xf)).norm() / lin(xf).norm() < 0.15
    with pytest.raises(ValueError, match="online_hadamard"):
        QuantLinear.from_linear(lin, group_size=32, hadamard_block=block)
    with pytest.raises(ValueError, match="divisor of in_features"):
        QuantLinear(64, 40, online_hadamard=True, hadamard_block=24)
