"""Triton W4A16 GEMM (``hadacore.kernels.triton.w4a16``) against an fp64 reference.

Runs on CPU under ``TRITON_INTERPRET=1`` (set by conftest) at small shapes; the ``gpu``
tests repeat the important cases at real shapes when CUDA is present. Every output
buffer is NaN-poisoned before the call, so an element the kernel forgets to write
fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from hadacore.kernels.triton.w4a16 import (
    COMPUTED,
    CONTIGUOUS,
    GATHERED,
    PER_CHANNEL,
    group_mode,
    w4a16_matmul_triton,
)
from hadacore.kernels.triton.w4a16_configs import M_BUCKETS, select_w4a16_config, split_k_ranges
from hadacore.formats.gptq import default_g_idx, dequantize_gptq, pack_gptq
from hadacore.quant.act_order import sort_by_group
from hadacore.quant.rtn import rtn_gptq_tensors

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Output-side paths: (config override, deterministic).
PATHS = {
    "gemv": ({"kernel": "gemv", "split_k": 1, "block_n": 32, "block_k": 32}, False),
    "gemv_atomic": ({"kernel": "gemv", "split_k": 3, "block_n": 32, "block_k": 32}, False),
    "gemv_det": ({"kernel": "gemv", "split_k": 3, "block_n": 32, "block_k": 32}, True),
    "splitk_atomic": ({"kernel": "splitk", "split_k": 3, "block_n": 32, "block_k": 32}, False),
    "splitk_det": ({"kernel": "splitk", "split_k": 3, "block_n": 32, "block_k": 32}, True),
    "dp": ({"kernel": "dp", "block_m": 16, "block_n": 32, "block_k": 32}, False),
}
TILE_PATHS = ["splitk_atomic", "splitk_det", "dp"]
GEMV_PATHS = ["gemv", "gemv_atomic", "gemv_det"]


def make_weight(n, k, group_size, *, sym=False, dtype=torch.float16, act_order=False, seed=0):
    """Random GPTQ v1 tensors: every int4 value and every v1 zero in [1, 16] occurs."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.full((groups, n), 8) if sym else torch.randint(1, 17, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).to(dtype)
    g_idx = default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return {name: t.to(DEVICE) for name, t in pack_gptq(q, scales, zeros, g_idx).items()}


_FROM_TENSORS = object()


def reference(x, t, group_size, bias=None):
    gi = t["g_idx"]
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], gi, group_size).double()
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def run(x, t, group_size, *, g_idx=_FROM_TENSORS, qweight=None, **kwargs):
    """The launcher with a NaN-poisoned ``out=`` buffer."""
    n = t["scales"].shape[1]
    out = torch.full((*x.shape[:-1], n), float("nan"), dtype=x.dtype, device=x.device)
    gi = t["g_idx"] if g_idx is _FROM_TENSORS else g_idx
    qw = t["qweight"] if qweight is None else qweight
    y = w4a16_matmul_triton(x, qw, t["qzeros"], t["scales"], gi, group_size=group_size, out=out, **kwargs)
    assert y is out
    return y


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def randn(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=DEVICE)


# --------------------------------------------------------------------------- every path, M, dtype


# GEMV runs one program per row (slow in the interpreter): M in {1, 3}, plus one M = 17 case.
PATH_M = [(p, m) for p in TILE_PATHS for m in (1, 3, 16, 17)] + [(p, m) for p in GEMV_PATHS for m in (1, 3)]
PATH_M.append(("gemv_atomic", 17))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path,m", PATH_M)
def test_paths_match_fp64_reference(path, m, dtype):
    config, deterministic = PATHS[path]
    n, k, gs = 72, 96, 32  # N not a block multiple (72 = 2*32 + 8); 3 groups, one per split
    t = make_weight(n, k, gs, dtype=dtype, seed=m)
    x = randn(m, k, dtype=dtype, seed=m + 1)
    bias = randn(n, dtype=dtype, seed=m + 2)
    y = run(x, t, gs, bias=bias, config=config, deterministic=deterministic)
    assert rel_err(y, reference(x, t, gs, bias)) < TOL[dtype]


# --------------------------------------------------------------------------- group layouts


LAYOUTS = {
    # name: (K, group_size, act_order, how) ; how: "plain" | "prepared" | "block_k_64"
    "gs32_2groups": (64, 32, False, "plain"),
    "gs128_3groups": (384, 128, False, "plain"),
    "per_channel_k_tail": (200, -1, False, "plain"),  # K = 200 is no multiple of BLOCK_K
    "gs40_odd": (120, 40, False, "plain"),  # no power-of-two divisor >= 16: per-k lookup
    "gs32_block_k_64": (96, 32, False, "block_k_64"),  # BLOCK_K > group size: per-k lookup
    "act_order_gathered": (96, 32, True, "plain"),
    "act_order_prepared": (96, 32, True, "prepared"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("path", ["splitk_atomic", "splitk_det", "dp", "gemv_atomic"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_group_layouts(layout, path, sym, dtype):
    k, gs, act_order, how = LAYOUTS[layout]
    n, m = 40, 3
    t = make_weight(n, k, gs, sym=sym, dtype=dtype, act_order=act_order, seed=k)
    x = randn(m, k, dtype=dtype, seed=k + 1)
    bias = randn(n, dtype=dtype, seed=3) if path != "dp" else None
    config, deterministic = PATHS[path]
    config = {key: v for key, v in config.items() if key != "block_k"}  # auto BLOCK_K fitting
    if how == "block_k_64":
        config["block_k"] = 64
    ref = reference(x, t, gs, bias)
    if how == "prepared":  # sorted by group once, x gathered by the caller: the contiguous path
        w, perm = sort_by_group(t)
        assert group_mode(w["g_idx"], k, gs) == CONTIGUOUS  # GPTQ act-order: equal groups, contiguous once sorted
        y = run(x[:, perm], w, gs, bias=bias, config=config, deterministic=deterministic)
    else:
        y = run(x, t, gs, bias=bias, config=config, deterministic=deterministic)
    assert rel_err(y, ref) < TOL[dtype]


def test_group_mode_selection():
    k = 96
    assert group_mode(None, k, 32) == CONTIGUOUS
    assert group_mode(None, k, -1) == PER_CHANNEL
    g = default_g_idx(k, 32)
    assert group_mode(g, k, 32) == CONTIGUOUS
    assert group_mode(g.long(), k, 32) == CONTIGUOUS
    g[[0, 40]] = g[[40, 0]]  # in place: the cached answer must not survive the version bump
    assert group_mode(g, k, 32) == GATHERED
    assert group_mode(default_g_idx(k, 32)[torch.randperm(k)], k, 32) == GATHERED
    assert COMPUTED not in (CONTIGUOUS, GATHERED, PER_CHANNEL)


# --------------------------------------------------------------------------- act-order


def test_unequal_groups_run_the_gathered_path_exactly():
    """A g_idx with unequal group sizes stays exact: sorted, the per-k lookup runs."""
    n, k, gs = 40, 64, 32
    gen = torch.Generator().manual_seed(7)
    g_idx = torch.randint(0, 2, (k,), generator=gen).to(torch.int32)
    g_idx[:3] = torch.tensor([0, 1, 1])  # both groups present
    q = torch.randint(0, 16, (n, k), generator=gen)
    t = pack_gptq(q, torch.rand(2, n, generator=gen) * 0.02 + 0.005, torch.randint(1, 17, (2, n), generator=gen), g_idx)
    t = {name: v.to(DEVICE) for name, v in t.items()}
    w, perm = sort_by_group(t)
    assert group_mode(w["g_idx"], k, gs) == GATHERED and bool((w["g_idx"][1:] >= w["g_idx"][:-1]).all())
    x = randn(3, k, dtype=torch.float32, seed=8)
    y = run(x[:, perm], w, gs, config={"kernel": "splitk", "split_k": 2})
    assert rel_err(y, reference(x, t, gs)) < TOL[torch.float32]


# --------------------------------------------------------------------------- dispatch, splits, strides


@pytest.mark.parametrize("m", [1, 5, 33, 70, 130])
def test_auto_dispatch_matches_reference(m):
    n, k, gs = 72, 256, 128
    t = make_weight(n, k, gs, dtype=torch.float16, seed=m)
    x = randn(m, k, dtype=torch.float16, seed=m)
    bias = randn(n, dtype=torch.float16, seed=2)
    assert rel_err(run(x, t, gs, bias=bias), reference(x, t, gs, bias)) < TOL[torch.float16]


@pytest.mark.parametrize("split_k", [1, 2, 3, 5, 8, 64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_split_k_values(split_k, deterministic):
    """Uneven splits (8 groups over 3 or 5 splits) and splits beyond the group count."""
    n, k, gs = 40, 256, 32
    t = make_weight(n, k, gs, dtype=torch.float32, seed=split_k)
    x = randn(17, k, dtype=torch.float32, seed=split_k)
    y = run(x, t, gs, split_k=split_k, deterministic=deterministic)
    assert rel_err(y, reference(x, t, gs)) < TOL[torch.float32]


@pytest.mark.parametrize("path", ["splitk_det", "gemv_det"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_is_bitwise_repeatable(path, dtype):
    config, _ = PATHS[path]
    n, k, gs = 72, 96, 32
    t = make_weight(n, k, gs, dtype=dtype, seed=11)
    x = randn(3, k, dtype=dtype, seed=12)
    bias = randn(n, dtype=dtype, seed=13)
    runs = [run(x, t, gs, bias=bias, config=config, deterministic=True) for _ in range(3)]
    assert rel_err(runs[0], reference(x, t, gs, bias)) < TOL[dtype]
    for y in runs[1:]:
        assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           runs[0].view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_rtn_weights_and_batched_input():
    """A real RTN-quantized weight, x with two leading dims, and out=None allocation."""
    n, k, gs = 48, 128, 32
    w = randn(n, k, dtype=torch.float32, seed=20)
    for sym in (True, False):
        t = rtn_gptq_tensors(w, group_size=gs, sym=sym, scale_dtype=torch.float16)
        x = randn(2, 3, k, dtype=torch.float16, seed=21)
        y = w4a16_matmul_triton(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size=gs)
        assert y.shape == (2, 3, n) and y.dtype == torch.float16
        assert rel_err(y, reference(x, t, gs)) < TOL[torch.float16]


def test_strided_inputs():
    n, k, gs = 40, 64, 32
    t = make_weight(n, k, gs, dtype=torch.float32, seed=30)
    wide = randn(5, 2 * k, dtype=torch.float32, seed=31)
    x = wide[:, ::2]  # column stride 2
    assert rel_err(run(x, t, gs, split_k=2), reference(x, t, gs)) < TOL[torch.float32]
    xt = randn(k, 5, dtype=torch.float32, seed=32).T  # row stride 1, column stride 5
    assert rel_err(run(xt, t, gs, split_k=1), reference(xt, t, gs)) < TOL[torch.float32]


def test_1d_and_empty_inputs():
    n, k, gs = 40, 64, 32
    t = make_weight(n, k, gs, dtype=torch.float32, seed=40)
    x = randn(k, dtype=torch.float32, seed=41)
    y = run(x, t, gs)
    assert y.shape == (n,) and rel_err(y, reference(x, t, gs)) < TOL[torch.float32]
    empty = torch.empty(0, k, device=DEVICE)
    assert w4a16_matmul_triton(empty, t["qweight"], t["qzeros"], t["scales"], None, group_size=gs).shape == (0, n)


# --------------------------------------------------------------------------- configuration table


@pytest.mark.parametrize("m", [1, 2, 16, 17, 32, 33, 64, 65, 128, 129, 4096])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 48, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_config_table_rules(m, group_size, dtype):
    n, k = 4096, 3840  # 3840 = 2**8 * 15: every group size above divides it
    cfg = select_w4a16_config(m, n, k, group_size, dtype, torch.device("cpu"))
    expected = "gemv" if m == 1 else ("splitk" if m <= 64 else "dp")
    assert cfg.kernel == expected
    for v in (cfg.block_n, cfg.block_k, cfg.num_warps):
        assert v & (v - 1) == 0
    assert cfg.block_n >= 16 and cfg.block_k >= 16
    assert cfg.block_m == 1 if cfg.kernel == "gemv" else (cfg.block_m >= 16 and cfg.block_m & (cfg.block_m - 1) == 0)
    if group_size > 0 and (group_size & -group_size) >= 16:
        assert group_size % cfg.block_k == 0  # a K-block never straddles two groups
    if dtype == torch.float32 and cfg.kernel != "gemv":
        assert cfg.num_stages <= 2 and cfg.block_k <= 32 and cfg.block_n <= 64 and cfg.block_m <= 64
    if cfg.kernel == "dp":
        assert cfg.split_k == 1


def test_config_fits_small_problems_and_overrides():
    cfg = select_w4a16_config(3, 40, 64, 32, torch.float16, torch.device("cpu"))
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 32, 32)
    assert select_w4a16_config(3, 40, 64, 32, torch.float16, torch.device("cpu"), split_k=1).kernel == "dp"
    assert select_w4a16_config(100, 40, 64, 32, torch.float16, torch.device("cpu"), split_k=2).kernel == "splitk"
    assert select_w4a16_config(1, 40, 64, 32, torch.float16, torch.device("cpu"), split_k=1).kernel == "gemv"
    cfg = select_w4a16_config(3, 4096, 4096, 128, torch.float16, torch.device("cpu"), config={"num_warps": 8, "split_k": 6})
    assert (cfg.num_warps, cfg.split_k, cfg.kernel) == (8, 6, "splitk")
    with pytest.raises(ValueError, match="unknown W4A16 config keys.*'blockk'"):
        select_w4a16_config(3, 40, 64, 32, torch.float16, torch.device("cpu"), config={"blockk": 32})
    with pytest.raises(ValueError, match="power of two"):
        select_w4a16_config(3, 40, 64, 32, torch.float16, torch.device("cpu"), config={"block_n": 48})
    with pytest.raises(ValueError, match="does not split K"):
        select_w4a16_config(3, 40, 64, 32, torch.float16, torch.device("cpu"), config={"kernel": "dp", "split_k": 4})
    with pytest.raises(ValueError, match="block_m must be >= 16"):
        select_w4a16_config(3, 40, 64, 32, torch.float16, torch.device("cpu"), config={"block_m": 8})
    with pytest.raises(ValueError, match="split_k must be"):
        select_w4a16_config(3, 40, 64, 32, torch.float16, torch.device("cpu"), split_k=0)
    assert [upper for upper, _ in M_BUCKETS][-1] is None


@pytest.mark.parametrize("k,split_k,align", [(256, 3, 32), (256, 5, 32), (200, 4, 64), (96, 8, 32), (4096, 4, 128), (8, 4, 128)])
def test_split_k_ranges_cover_k(k, split_k, align):
    split, per = split_k_ranges(k, split_k, align)
    assert 1 <= split <= split_k and per % align == 0
    starts = [s * per for s in range(split)]
    covered = [i for s in starts for i in range(s, min(s + per, k))]
    assert covered == list(range(k))  # contiguous, disjoint, nothing empty or missing


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    n, k, gs = 40, 64, 32
    t = make_weight(n, k, gs, dtype=torch.float16, seed=50)
    x = randn(3, k, dtype=torch.float16, seed=51)
    args = (t["qweight"], t["qzeros"], t["scales"], None)
    with pytest.raises(ValueError, match="out must be"):
        w4a16_matmul_triton(x, *args, group_size=gs, out=torch.empty(3, n, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        w4a16_matmul_triton(x, *args, group_size=gs, out=torch.empty(3, n + 8, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="input features"):
        w4a16_matmul_triton(x[:, :32], *args, group_size=gs)
    with pytest.raises(ValueError, match="multiple of group_size"):
        w4a16_matmul_triton(x, *args, group_size=48)
    with pytest.raises(ValueError, match="unknown W4A16 config keys"):
        w4a16_matmul_triton(x, *args, group_size=gs, config={"warps": 4})
    with pytest.raises(ValueError, match="integer"):
        w4a16_matmul_triton(x, *args[:3], t["g_idx"].float(), group_size=gs)


# --------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("variant", ["auto", "splitk_atomic", "splitk_det", "dp", "act_order_prepared", "act_order_gathered"])
def test_gpu_real_shapes(variant, m, dtype):
    n = k = 4096
    gs = 128
    act_order = variant.startswith("act_order")
    t = make_weight(n, k, gs, dtype=dtype, act_order=act_order, seed=m)
    x = randn(m, k, dtype=dtype, seed=m + 1)
    bias = randn(n, dtype=dtype, seed=3)
    ref = reference(x, t, gs, bias)
    kwargs = {
        "auto": {},
        "splitk_atomic": {"config": {"kernel": "splitk", "split_k": 4}},
        "splitk_det": {"config": {"kernel": "splitk", "split_k": 4}, "deterministic": True},
        "dp": {"split_k": 1},
        "act_order_gathered": {},
        "act_order_prepared": {},
    }[variant]
    if variant == "act_order_prepared":
        w, perm = sort_by_group(t)
        y = run(x[:, perm], w, gs, bias=bias)
    else:
        y = run(x, t, gs, bias=bias, **kwargs)
    torch.cuda.synchronize()
    assert rel_err(y, ref) < TOL[dtype]
    if variant == "splitk_det":
        again = run(x, t, gs, bias=bias, **kwargs)
        assert torch.equal(again, y)


@pytest.mark.gpu
def test_gpu_fp32_matches_to_fp32_tolerance():
    n = k = 4096
    t = make_weight(n, k, 128, dtype=torch.float32, seed=9)
    for m in (1, 16, 64):
        x = randn(m, k, dtype=torch.float32, seed=m)
        assert rel_err(run(x, t, 128), reference(x, t, 128)) < TOL[torch.float32]
