"""The Hadamard transform's math and its CPU path, against fp64 references.

References: ``x.double() @ hadamard_matrix(n)`` where that matrix is small enough to
build, otherwise an fp64 butterfly (Sylvester) plus the base mix written here from
QuaRot's ``matmul_hadU`` description. Errors are relative Frobenius norms with the
DESIGN.md bounds (fp32 < 1e-5, bf16/fp16 < 1e-2).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hadacore
import hadacore.kernels.cpu.hadamard as native
from hadacore import HADAMARD_BASES, hadamard_matrix, hadamard_transform
from hadacore.hadamard import (
    QUAROT_BASES, hadamard_base, hadamard_factors, is_supported_size, nearest_supported_sizes, sylvester,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}
DENSE_REF_MAX_N = 1 << 12  # fp64 H_n of 128 MiB; larger n use the butterfly reference


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def fwht64(x: torch.Tensor) -> torch.Tensor:
    """Sylvester Walsh-Hadamard transform of the last axis in fp64 (radix-2 butterflies)."""
    y = x.double()
    p = y.shape[-1]
    h = 1
    while h < p:
        y = y.reshape(*y.shape[:-1], p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*x.shape)
        h *= 2
    return y


# QuaRot's get_hadK tries the bases in this order (SpinQuant adds 44); first match wins.
QUAROT_ORDER = (172, 156, 140, 108, 60, 52, 44, 36, 28, 40, 20, 12)


def quarot_matmul_hadU(x: torch.Tensor) -> torch.Tensor:
    """QuaRot's ``matmul_hadU`` (unnormalised), independently: choose K as get_hadK does,
    view ``(-1, K, n/K)``, Sylvester-transform the last axis, then ``hadK @``."""
    n = x.shape[-1]
    k = 1
    for m in QUAROT_ORDER:
        q = n // m
        if n % m == 0 and q & (q - 1) == 0:
            k = m
            break
    y = fwht64(x.reshape(-1, k, n // k))
    if k > 1:
        y = hadamard_base(k).double() @ y
    return y.reshape(x.shape)


def factored_reference(x: torch.Tensor) -> torch.Tensor:
    """``x @ (H_m kron H_p)^T`` without building it: the butterfly, then ``H_m`` mixes the
    m pieces. For the constructed bases, which QuaRot's get_hadK does not know."""
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    y = fwht64(x.reshape(-1, m, p))
    if m > 1:
        y = hadamard_base(m).double() @ y
    return y.reshape(x.shape)


def reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    n = x.shape[-1]
    if n <= DENSE_REF_MAX_N:
        return scale * (x.double() @ hadamard_matrix(n))
    if hadamard_factors(n)[0] in (1, *QUAROT_BASES):
        return scale * quarot_matmul_hadU(x.double())
    return scale * factored_reference(x.double())


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values around each fp64 value ``v`` (subnormals included)."""
    fi = torch.finfo(dtype)
    digits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    _, e = torch.frexp(v)  # v = mant * 2**e, 0.5 <= |mant| < 1
    e = e.clamp(min=math.frexp(fi.tiny)[1])
    return torch.ldexp(torch.ones_like(v), e - digits)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- hadamard_matrix


@pytest.mark.parametrize("m", QUAROT_BASES)  # every base: tests/test_hadamard_constructions.py
def test_base_is_hadamard(m: int) -> None:
    h = hadamard_base(m).double()
    assert h.shape == (m, m)
    assert bool(((h == 1) | (h == -1)).all())
    torch.testing.assert_close(h @ h.T, m * torch.eye(m, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("m", (1, *QUAROT_BASES))
@pytest.mark.parametrize("p", (1, 2, 16))
def test_matrix_is_hadamard(m: int, p: int) -> None:
    n = m * p
    # Integer sums below 2**24: fp32 is exact and twice as fast as fp64.
    h = hadamard_matrix(n, torch.float32)
    assert hadamard_factors(n) == ((m, p) if not (m == 20 and p >= 2) else (40, p // 2))
    torch.testing.assert_close(h @ h.T, n * torch.eye(n), rtol=0, atol=0)


@pytest.mark.parametrize("p", (1, 2, 8))
def test_base_40_takes_precedence_over_20(p: int) -> None:
    n = 40 * p  # == 20 * (2 * p)
    assert hadamard_factors(n) == (40, p)
    expected = torch.kron(hadamard_base(40).double(), sylvester(p)).T
    torch.testing.assert_close(hadamard_matrix(n), expected, rtol=0, atol=0)
    x = randn(3, n)
    assert rel_err(hadamard_transform(x), x.double() @ expected) < TOL[torch.float32]


@pytest.mark.parametrize("n", (12, 20, 40, 80, 160, 172, 28 * 16, 36 * 16, 44 * 8, 108 * 4, 12 * 128, 64, 1024))
def test_matches_quarot_matmul_hadU(n: int) -> None:
    """Weights rotated by QuaRot / SpinQuant's hadamard_utils run unchanged."""
    x = randn(4, n, dtype=torch.float64, seed=n)
    ref = quarot_matmul_hadU(x)
    assert rel_err(hadamard_transform(x), ref) < TOL[torch.float64]
    torch.testing.assert_close(x @ hadamard_matrix(n), ref, rtol=1e-12, atol=1e-10)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("k", range(0, 16))
def test_pow2_matches_fp64_reference(k: int, dtype: torch.dtype) -> None:
    n = 1 << k
    rows = 5 if n <= 4096 else 2
    x = randn(rows, n, dtype=dtype, seed=k)
    y = hadamard_transform(x, 0.25)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert rel_err(y, reference(x, 0.25)) < TOL[dtype]


@pytest.mark.parametrize("m", HADAMARD_BASES)
def test_bases_match_fp64_reference(m: int) -> None:
    """Every base, against the dense fp64 ``x @ hadamard_matrix(n)`` (up to 4096). Bases
    above 256 take p = 1, 2 only: the dense reference dominates the run time, and larger
    p for them is in test_constructed_bases_every_dtype."""
    for p in (1, 4, 16) if m <= 256 else (1, 2):
        n = m * p
        x = randn(3, n, seed=n)
        y = hadamard_transform(x, 1 / math.sqrt(n))
        assert rel_err(y, reference(x, 1 / math.sqrt(n))) < TOL[torch.float32], n


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("m", (68, 76, 100, 148, 244, 368, 724, 924, 1020))
def test_constructed_bases_every_dtype(m: int, dtype: torch.dtype) -> None:
    """Paley bases on the CPU path against ``x.double() @ hadamard_matrix(n)``: p = 1 (the
    base alone, H_m applied transposed), a small p (bf16's dense path where n <= 768) and
    a p with a blocked factor plan. NaN-poisoned output is impossible here (the op
    allocates), so the check is all-finite plus the error bound."""
    for p in (1, 8, 256 if m < 300 else 2):
        n = m * p
        x = randn(3, n, dtype=dtype, seed=n)
        y = hadamard_transform(x, 1 / math.sqrt(n))
        assert y.dtype == dtype and bool(y.isfinite().all())
        assert rel_err(y, reference(x, 1 / math.sqrt(n))) < TOL[dtype], n


def test_factored_reference_matches_dense() -> None:
    """The fp64 reference used above 4096 for constructed bases is the dense matrix."""
    for n in (76 * 8, 924 * 2, 244 * 16):
        x = randn(2, n, dtype=torch.float64, seed=n)
        torch.testing.assert_close(factored_reference(x), x @ hadamard_matrix(n), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float64))
@pytest.mark.parametrize("n", (12 * 128, 28 * 512, 36 * 16, 172 * 64, 76 * 64, 148 * 128, 924 * 32, 924 * 4))
def test_real_model_sizes(n: int, dtype: torch.dtype) -> None:
    x = randn(2, n, dtype=dtype, seed=n)
    assert rel_err(hadamard_transform(x), reference(x)) < TOL[dtype]


@pytest.mark.parametrize("shape", ((0, 64), (1, 64), (64,), (2, 3, 48), (0, 3, 128), (2, 0, 12)))
def test_batch_shapes(shape: tuple[int, ...]) -> None:
    x = randn(*shape)
    y = hadamard_transform(x, 0.5)
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel():
        assert rel_err(y, reference(x, 0.5)) < TOL[torch.float32]


@pytest.mark.parametrize("n", (64, 96, 4096, 28 * 16, 76 * 8))
def test_many_row_blocks_with_tail(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Blocks of 3 rows per thread and a 1-row tail: every row goes through one block."""
    monkeypatch.setattr(native, "_BLOCK_ELEMS", 3 * n)
    x = randn(6 * torch.get_num_threads() + 1, n, seed=n)
    s = randn(n, seed=1).sign()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    assert rel_err(hadamard_transform(x), reference(x)) < TOL[torch.float32]
    y = torch.ops.hadacore.hadamard(x.half(), 0.5, s, perm)
    assert rel_err(y, reference(x.half() * s, 0.5)[:, perm]) < TOL[torch.float16]


@pytest.mark.parametrize("n", (1, 2, 32, 1024, 4096, 28, 36 * 8))
def test_involution(n: int) -> None:
    """T(T(x)) = n x wherever H_n is symmetric: Sylvester sizes and the bases 28 and 36."""
    x = randn(3, n, dtype=torch.float64, seed=n)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), n * x, rtol=1e-12, atol=1e-9)
    x32 = x.float()
    assert rel_err(hadamard_transform(hadamard_transform(x32), 1.0 / n), x32.double()) < TOL[torch.float32]


@pytest.mark.parametrize("n", (12, 20 * 4, 44 * 16, 172 * 2))
def test_inverse_for_non_symmetric_bases(n: int) -> None:
    """Most QuaRot bases are not symmetric, so T is not an involution there; the inverse
    is the transposed matrix: T(x) @ H_n^T = n x."""
    h = hadamard_matrix(n)
    assert not torch.equal(h, h.T)
    x = randn(3, n, dtype=torch.float64, seed=n)
    torch.testing.assert_close(hadamard_transform(x) @ h.T, n * x, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("n", (64, 12 * 16, 768, 1024))
@pytest.mark.parametrize("scale", (1.0, 0.125, 1 / 24))
def test_low_precision_output_is_rounded_once(n: int, scale: float) -> None:
    """bf16/fp16 results are the exact result, up to fp32 accumulation error, rounded
    once: within half an ulp of the output dtype plus an fp32 accumulation bound,
    whichever CPU path runs (dense bf16 BLAS for small n with a bf16-exact scale,
    blocked fp32 factors otherwise). Rounding twice (or accumulating in bf16) breaks it."""
    for dtype in (torch.bfloat16, torch.float16):
        x = randn(64, n, dtype=dtype, seed=n)
        y = hadamard_transform(x, scale).double()
        exact = reference(x, scale)
        once = exact.to(dtype)
        half_ulp = ulp(exact, dtype) / 2
        terms = scale * x.double().abs().sum(-1, keepdim=True)  # bound on every partial sum
        acc_bound = 2.0**-24 * ((math.log2(n) + 2) * terms + exact.abs())
        excess = (y - exact).abs() - half_ulp - acc_bound
        assert excess.max().item() <= 0, dtype
        assert (y != once.double()).double().mean().item() < 0.02, dtype


def test_fp64_input_is_computed_in_fp64() -> None:
    x = randn(3, 1024, dtype=torch.float64)
    assert rel_err(hadamard_transform(x), reference(x)) < 1e-14


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_nan_and_inf_propagate_like_a_matmul(dtype: torch.dtype) -> None:
    x = randn(3, 256, dtype=dtype)
    x[0, 17] = float("nan")
    x[1, 5] = float("inf")
    y = hadamard_transform(x)
    assert bool(y[0].isnan().all())
    assert bool(y[1].isinf().all()) and bool((y[1].sign() == hadamard_matrix(256)[5].float()).all())
    assert bool(y[2].isfinite().all())
    assert rel_err(y[2], reference(x[2])) < TOL[dtype]


# --------------------------------------------------------------------------- strides, aliasing


def _strided_views(n: int) -> dict[str, torch.Tensor]:
    wide = randn(6, n + 37, seed=3)
    return {
        "transposed": randn(n, 5, seed=4).t(),
        "slice_of_wider": wide[:, 11 : 11 + n],
        "every_other_row": randn(10, n, seed=5)[::2],
        "column_stride_2": randn(4, 2 * n, seed=6)[:, ::2],
        "permuted_3d": randn(n, 3, 2, seed=7).permute(2, 1, 0),
        "expanded_row": randn(1, n, seed=8).expand(4, n),
    }


@pytest.mark.parametrize("n", (64, 12 * 16, 2048))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_any_strides(n: int, dtype: torch.dtype) -> None:
    for name, x in _strided_views(n).items():
        x = x.to(dtype) if dtype != torch.float32 else x
        y = hadamard_transform(x, 0.5)
        assert y.is_contiguous(), name
        expected = hadamard_transform(x.contiguous(), 0.5)
        assert torch.equal(y, expected), name  # strides never change a single bit
        assert rel_err(y, reference(x, 0.5)) < TOL[dtype], name


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("n", (1, 64, 4096, 36))
def test_input_untouched_and_not_aliased(n: int, dtype: torch.dtype) -> None:
    x = randn(4, n, dtype=dtype)
    before = x.clone()
    y = hadamard_transform(x)  # scale 1 and fp32: the path that reads x directly
    assert torch.equal(x, before)
    assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    y.fill_(float("nan"))
    assert torch.equal(x, before)


# --------------------------------------------------------------------------- bad input


# 92, 188: orders with no construction here; 472 = 59 * 8: odd part 59 has no base <= 1024
@pytest.mark.parametrize("n", (3, 92, 188, 472, 1 << 16))
def test_unsupported_size_names_nearest(n: int) -> None:
    lo, hi = nearest_supported_sizes(n)
    assert lo is not None and lo < n and is_supported_size(lo)
    assert hi is None or (hi > n and is_supported_size(hi))
    assert not any(is_supported_size(s) for s in range(lo + 1, min(hi or n + 1, n + 200)))
    near = f"{lo} or {hi}" if hi is not None else f"{lo}"
    with pytest.raises(ValueError, match=rf"size {n}\b.*nearest supported: {near}$"):
        hadamard_transform(torch.zeros(2, n))


def test_empty_last_dim_is_unsupported() -> None:
    with pytest.raises(ValueError, match="nearest supported"):
        hadamard_transform(torch.zeros(2, 0))


@pytest.mark.parametrize("dtype", (torch.int32, torch.int64, torch.int8, torch.bool))
def test_integer_and_bool_dtypes_raise_type_error(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="floating-point"):
        hadamard_transform(torch.ones(2, 16, dtype=dtype))


def test_zero_dim_raises() -> None:
    with pytest.raises(ValueError, match="at least one dimension"):
        hadamard_transform(torch.tensor(1.0))


# --------------------------------------------------------------------------- properties

_sizes = st.sampled_from((1, 2, 8, 12, 40, 64, 20 * 4, 28 * 8, 256, 1024))


@settings(max_examples=40, deadline=None)
@given(n=_sizes, rows=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_orthonormal_scale_preserves_norm(n: int, rows: int, seed: int) -> None:
    x = randn(rows, n, dtype=torch.float64, seed=seed)
    y = hadamard_transform(x, 1 / math.sqrt(n))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    y32 = hadamard_transform(x.float(), 1 / math.sqrt(n))
    torch.testing.assert_close(y32.double().norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=_sizes,
    a=st.floats(-4, 4, allow_nan=False),
    b=st.floats(-4, 4, allow_nan=False),
    seed=st.integers(0, 2**31 - 1),
)
def test_linearity(n: int, a: float, b: float, seed: int) -> None:
    x = randn(3, n, dtype=torch.float64, seed=seed)
    z = randn(3, n, dtype=torch.float64, seed=seed + 1)
    lhs = hadamard_transform(a * x + b * z)
    rhs = a * hadamard_transform(x) + b * hadamard_transform(z)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10 * n)


def test_public_api_names() -> None:
    assert hadacore.HADAMARD_BASES == (
        12, 20, 28, 36, 40, 44, 52, 60, 68, 76, 84, 100, 108, 124, 132, 140, 148, 156, 164, 172, 180, 196,
        204, 212, 220, 228, 244, 252, 276, 284, 300, 308, 316, 332, 340, 348, 364, 368, 380, 388, 396, 420,
        444, 460, 464, 468, 484, 492, 500, 516, 524, 540, 548, 556, 564, 572, 580, 588, 620, 628, 636, 644,
        648, 660, 676, 684, 692, 700, 708, 724, 740, 744, 748, 752, 780, 788, 796, 804, 812, 820, 824, 828,
        844, 860, 868, 884, 900, 908, 916, 924, 948, 972, 1020,
    )
    assert QUAROT_BASES == (12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172)
    assert hadacore.hadamard_matrix(4).dtype == torch.float64
