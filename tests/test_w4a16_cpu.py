"""W4A16 GEMM on CPU against the fp64 reference ``x @ dequant(W).T + bias``.

Two paths: the generic op ``hadacore::w4a16_gemm`` (dequantize + BLAS, x's precision)
and the prepared op ``hadacore::w4a16_gemm_cpu`` (torch's int4 kernel below
``int4_max_m``, bf16 BLAS above it; bf16 compute for every input dtype).
"""

import pytest
import torch

import hadacore
from hadacore.formats.gptq import dequantize_gptq, pack_gptq, unpack_gptq
from hadacore.kernels.cpu.w4a16 import PreparedW4A16, prepare_w4a16_cpu
from hadacore.quant.act_order import sort_by_group
from hadacore.quant.rtn import rtn_gptq_tensors

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # relative Frobenius
BF16_TOL = 1e-2


def _gptq(n, k, group_size, sym, act_order, seed):
    """RTN-quantized random weight; act_order assigns the groups in a random column order."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) + 0.5)
    t = rtn_gptq_tensors(w.half(), 4, group_size, sym)
    if act_order:
        q, s, z, g = unpack_gptq(t)
        t = pack_gptq(q, s, z, g[torch.randperm(k, generator=gen)])
    return t


def _prepare(t, group_size, bias=None, **kw):
    """The CPU fast path of a GPTQ weight, act-order sorted first as every caller does."""
    w, perm = sort_by_group(t)
    return prepare_w4a16_cpu(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], group_size, bias, perm=perm, **kw)


def _ref(x, t, group_size, bias):
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size, dtype=torch.float64)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def _rel(y, ref):
    assert not y.isnan().any()
    return ((y.double() - ref).norm() / ref.norm()).item()


# (N, K, group_size): N not a multiple of 16 (the int4 kernel pads), K = 2 and 3 groups
SHAPES = [(40, 64, 32), (72, 96, 32), (40, 256, 128), (72, 384, 128), (40, 96, -1), (72, 192, -1)]


# act-order needs at least two groups: per-channel (one group) has nothing to reorder
SMALL_CASES = [(*shape, act) for shape in SHAPES for act in (False, True) if not (act and shape[2] == -1)]


@pytest.mark.parametrize("n,k,group_size,act_order", SMALL_CASES)
@pytest.mark.parametrize("sym", [True, False])
def test_small_shapes_all_paths(n, k, group_size, act_order, sym):
    seed = n + k + group_size + 2 * sym + act_order
    t = _gptq(n, k, group_size, sym, act_order, seed)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    int4_only = _prepare(t, group_size, bias, dense=False)
    blas_only = _prepare(t, group_size, bias, int4_max_m=0)
    assert int4_only.weight is None and int4_only.packed is not None
    assert (int4_only.perm is not None) == act_order
    gen = torch.Generator().manual_seed(seed + 1)
    for m in (1, 3, 16, 17):
        for dtype in DTYPES:
            x = torch.randn(m, k, generator=gen).to(dtype)
            for b in (None, bias):
                ref = _ref(x, t, group_size, b)
                y = hadacore.w4a16_matmul(x, *args, group_size=group_size, bias=b)
                assert y.dtype == dtype and y.shape == (m, n)
                assert _rel(y, ref) < TOL[dtype], ("generic", m, dtype)
            ref = _ref(x, t, group_size, bias)
            for name, p in (("int4", int4_only), ("blas", blas_only)):
                y = p(x)
                assert y.dtype == dtype and y.shape == (m, n)
                assert _rel(y, ref) < BF16_TOL, (name, m, dtype)


def test_leading_dims_and_empty_batch():
    t = _gptq(48, 128, 32, False, True, 3)
    p = _prepare(t, 32)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = p(x)
    assert y.shape == (2, 3, 48) and y.is_contiguous()
    assert _rel(y, _ref(x, t, 32, None)) < BF16_TOL
    assert p(torch.randn(0, 128)).shape == (0, 48)
    assert hadacore.w4a16_matmul(torch.randn(2, 0, 128), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size=32).shape == (2, 0, 48)


def test_dispatch_threshold_and_fallbacks():
    t = _gptq(32, 512, 512, True, False, 4)  # group 512: split into int4 groups of 256
    p = _prepare(t, 512, int4_max_m=2)
    assert p.int4_group_size == 256 and p.packed is not None and p.weight is not None
    # the two paths differ by bf16 rounding only, and each is exact to bf16 on its own side
    x = torch.randn(3, 512)
    assert _rel(p(x[:2]), _ref(x[:2], t, 512, None)) < BF16_TOL  # int4 (M=2 <= 2)
    assert _rel(p(x), _ref(x, t, 512, None)) < BF16_TOL  # BLAS (M=3 > 2)
    # group 16: the int4 kernel cannot take it, only the dense weight is kept
    t16 = _gptq(32, 64, 16, False, False, 5)
    p16 = _prepare(t16, 16, dense=False)
    assert p16.packed is None and p16.weight is not None
    assert _rel(p16(x[:, :64]), _ref(x[:, :64], t16, 16, None)) < BF16_TOL


def test_int4_asymmetric_error_is_bf16_sized():
    """scales and float zeros (8 - z) * s are rounded to bf16 in the int4 kernel: measure it."""
    t = _gptq(256, 1024, 128, False, True, 6)
    p = _prepare(t, 128, dense=False)
    x = torch.randn(4, 1024).bfloat16()
    err = _rel(p(x), _ref(x, t, 128, None))
    assert err < 5e-3, err  # measured ~2.5e-3: x, scale, zero and output roundings to bf16


def test_dense_only_preparation():
    """int4=False (the compiler's choice when every M is known to be large): no repack, only
    the bf16 weight, and the same results; with dense=False too nothing would be left."""
    t = _gptq(48, 128, 32, False, True, 9)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    p = _prepare(t, 32, dense=None, int4=False)
    assert p.packed is None and p.scales_and_zeros is None and p.weight is not None
    x = torch.randn(20, 128).bfloat16()
    assert _rel(p(x), _ref(x, t, 32, None)) < BF16_TOL
    with pytest.raises(ValueError, match="leaves no weight"):
        _prepare(t, 32, dense=False, int4=False)


REAL = [(4096, 4096), pytest.param(11008, 4096, marks=pytest.mark.slow), pytest.param(4096, 11008, marks=pytest.mark.slow)]


@pytest.mark.parametrize("n,k", REAL)
def test_real_shapes(n, k):
    t = _gptq(n, k, 128, n != k, n == 4096, n + k)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    p = _prepare(t, 128)
    w = dequantize_gptq(*args, 128, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for m in (1, 16, 128):
        x = torch.randn(m, k, generator=gen).bfloat16()
        ref = x.double() @ w.T
        assert _rel(p(x), ref) < BF16_TOL, m
        if m == 16:  # the int4 kernel at M above its dispatch threshold, and the generic op
            int4 = PreparedW4A16(**{**p.__dict__, "weight": None})
            assert _rel(int4(x), ref) < BF16_TOL
            assert _rel(hadacore.w4a16_matmul(x, *args, group_size=128), ref) < BF16_TOL


def test_opcheck():
    t = _gptq(48, 128, 32, False, True, 7)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    bias = torch.randn(48)
    for dense in (None, False):
        p = _prepare(t, 32, bias, dense=dense, int4_max_m=2)
        for m in (1, 5):
            torch.library.opcheck(torch.ops.hadacore.w4a16_gemm_cpu.default, (torch.randn(m, 128).bfloat16(), *p.op_args()))
    torch.library.opcheck(torch.ops.hadacore.w4a16_gemm.default, (torch.randn(3, 128), *args, bias, 32, 0, False))
    torch.library.opcheck(torch.ops.hadacore.gptq_dequantize.default, (*args, 32, 4))


def test_torch_compile_no_graph_break_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    t = _gptq(48, 128, 32, False, True, 8)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    p = _prepare(t, 32, torch.randn(48), int4_max_m=4)

    def f(x):  # the op picks its path per call: a symbolic M needs no guard
        return torch.relu(torch.ops.hadacore.w4a16_gemm_cpu(x, *p.op_args()) * 2.0) + hadacore.w4a16_matmul(
            x, *args, group_size=32)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    cf = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    for m in (3, 16, 5):  # both dispatch sides, one graph: M is symbolic, the choice is at run time
        x = torch.randn(m, 128).bfloat16()
        torch.testing.assert_close(cf(x), f(x), rtol=2e-2, atol=2e-2)
    assert counter.frame_count == 1
    x = torch.randn(1, 128).bfloat16()  # Dynamo specializes size 1: a second graph, still no break
    torch.testing.assert_close(cf(x), f(x), rtol=2e-2, atol=2e-2)
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_bad_inputs():
    t = _gptq(48, 128, 32, True, False, 9)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="x has 100 input features"):
        hadacore.w4a16_matmul(torch.randn(2, 100), *args, group_size=32)
    with pytest.raises(ValueError, match="multiple of group_size"):
        hadacore.w4a16_matmul(x, *args, group_size=48)
    with pytest.raises(ValueError, match="multiples of 8"):
        pack_gptq(torch.zeros(48, 100, dtype=torch.int32), torch.ones(1, 48), torch.full((1, 48), 8))
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        hadacore.w4a16_matmul(x.long(), *args, group_size=32)
    with pytest.raises(TypeError, match="int32"):
        hadacore.w4a16_matmul(x, t["qweight"].long(), *args[1:], group_size=32)
    with pytest.raises(ValueError, match="inconsistent GPTQ shapes"):
        hadacore.w4a16_matmul(x, t["qweight"], t["qzeros"][:, :2], t["scales"], t["g_idx"], group_size=32)
    with pytest.raises(ValueError, match="bias must be"):
        hadacore.w4a16_matmul(x, *args, group_size=32, bias=torch.randn(47))
    with pytest.raises(ValueError, match="x is on meta but qweight is on cpu"):
        hadacore.w4a16_matmul(x.to("meta"), *args, group_size=32)
    with pytest.raises(ValueError, match="split_k"):
        hadacore.w4a16_matmul(x, *args, group_size=32, split_k=0)
    for bad, shown in ((-1, r"\[-1, 3\]"), (4, r"\[0, 4\]")):  # issue 13.8: one validation, naming the range
        g = t["g_idx"].clone()
        g[7] = bad
        with pytest.raises(ValueError, match=r"w4a16_matmul: g_idx has values in " + shown + r"; they must lie in \[0, 4\)"):
            hadacore.w4a16_matmul(x, *args[:3], g, group_size=32)
        with pytest.raises(ValueError, match=r"g_idx has values in " + shown):
            prepare_w4a16_cpu(*args[:3], g, 32)
    ao = _gptq(48, 128, 32, True, True, 9)
    with pytest.raises(ValueError, match="sort an act-order weight"):
        prepare_w4a16_cpu(ao["qweight"], ao["qzeros"], ao["scales"], ao["g_idx"], 32)
    p = _prepare(t, 32)
    with pytest.raises(ValueError, match="x is on meta but packed is on cpu"):
        p(x.to("meta"))
    with pytest.raises(ValueError, match="packed must be uint8"):
        p(torch.randn(2, 64))
    with pytest.raises(TypeError, match="x must be"):
        p(x.double())
    with pytest.raises(ValueError, match="needs the packed int4 weight, the dense weight, or both"):
        PreparedW4A16(**{**p.__dict__, "weight": None, "packed": None, "scales_and_zeros": None})(x)
    with pytest.raises(ValueError, match="bias must be"):
        _prepare(t, 32, torch.randn(4))
