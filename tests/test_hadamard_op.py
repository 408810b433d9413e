"""The ``hadacore::hadamard`` custom op: signs/perm semantics, fake impl, opcheck, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import hadacore
from hadacore import hadamard_matrix

hadamard_op = torch.ops.hadacore.hadamard

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def make(n: int, rows: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g).to(dtype)
    signs = torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1
    perm = torch.randperm(n, generator=g)
    return x, signs, perm


def reference(x, scale=1.0, signs=None, perm=None) -> torch.Tensor:
    """``out[..., j] = (scale * (x * signs) @ H_n)[..., perm[j]]`` in fp64."""
    xd = x.double() * (signs.double() if signs is not None else 1.0)
    y = scale * (xd @ hadamard_matrix(x.shape[-1]))
    return y[..., perm] if perm is not None else y


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("n", (16, 12 * 8, 1024, 28 * 32))
@pytest.mark.parametrize("use_signs, use_perm", ((True, False), (False, True), (True, True)))
def test_signs_and_perm_semantics(n: int, dtype: torch.dtype, use_signs: bool, use_perm: bool) -> None:
    x, signs, perm = make(n, dtype=dtype, seed=n)
    s = signs if use_signs else None
    p = perm if use_perm else None
    y = hadamard_op(x, 0.125, s, p)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, reference(x, 0.125, s, p)) < TOL[dtype]


def test_perm_accepts_int32_and_signs_any_float_dtype() -> None:
    x, signs, perm = make(64)
    ref = reference(x, 1.0, signs, perm)
    assert rel_err(hadamard_op(x, 1.0, signs.double(), perm.int()), ref) < TOL[torch.float32]


def test_signs_and_perm_on_strided_input() -> None:
    x, signs, perm = make(256, rows=8)
    xt = x.t().contiguous().t()  # same values, column-major
    assert torch.equal(hadamard_op(xt, 0.5, signs, perm), hadamard_op(x, 0.5, signs, perm))
    before = x.clone()
    hadamard_op(x, 0.5, signs, perm)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "signs, perm, match",
    (
        (torch.ones(63), None, "signs must be a \\[64\\]"),
        (None, torch.arange(32), "perm must be an integer \\[64\\]"),
        (None, torch.arange(64).float(), "perm must be an integer"),
        (None, torch.ones(64, dtype=torch.bool), "perm must be an integer \\[64\\] tensor on cpu, got torch.bool"),
        (None, torch.arange(64) - 1, r"perm has values in \[-1, 62\]; they must lie in \[0, 64\)"),
        (None, torch.arange(64) + 1, r"perm has values in \[1, 64\]; they must lie in \[0, 64\)"),
    ),
)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))  # two CPU paths (blocked fp32, dense bf16)
def test_bad_signs_or_perm(signs, perm, match: str, dtype) -> None:
    """One validation, the same on every path (issue 13.10): a bool perm once gathered
    column 1 everywhere, and a negative one wrapped around in bf16 but raised in fp32."""
    with pytest.raises(ValueError, match=match):
        hadamard_op(torch.randn(2, 64, dtype=dtype), 1.0, signs, perm)


def test_fake_impl_matches_real_metadata() -> None:
    x, signs, perm = make(12 * 16, rows=6, dtype=torch.bfloat16)
    x = x.t().contiguous().t()[1:5]  # strided rows, column-major
    real = hadamard_op(x, 0.5, signs, perm)
    with FakeTensorMode() as mode:
        fx, fs, fp = (mode.from_tensor(t) for t in (x, signs, perm))
        fake = hadamard_op(fx, 0.5, fs, fp)
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("use_signs, use_perm", ((False, False), (True, True), (True, False), (False, True)))
def test_opcheck(dtype: torch.dtype, use_signs: bool, use_perm: bool) -> None:
    x, signs, perm = make(12 * 4, rows=5, dtype=dtype)
    args = (x, 0.5, signs if use_signs else None, perm if use_perm else None)
    torch.library.opcheck(hadamard_op.default, args)
    torch.library.opcheck(hadamard_op.default, (x.reshape(5, 1, 48)[:, :, :].transpose(0, 1), *args[1:]))


def test_torch_compile_fullgraph_dynamic_batch() -> None:
    """Inductor CPU: no graph break, one compile for any batch, same numbers as eager."""
    n = 28 * 4

    def f(x, signs, perm):
        y = hadacore.hadamard_transform(torch.relu(x) + 1.0, 0.5)
        return hadamard_op(y, 1.0 / n, signs, perm) * 2.0

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    _, signs, perm = make(n)
    for rows in (3, 5, 8):
        x, _, _ = make(n, rows=rows, seed=rows)
        with torch.compiler.set_stance("fail_on_recompile") if rows > 3 else _null():
            y = compiled(x, signs, perm)
        assert torch.allclose(y, f(x, signs, perm), rtol=1e-5, atol=1e-5)
        ref = 2.0 * reference(reference(torch.relu(x) + 1.0, 0.5), 1.0 / n, signs, perm)
        assert rel_err(y, ref) < TOL[torch.float32]
    assert counter.frame_count == 1
    assert counter.op_count >= 1


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- CPU lowering


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("n", (2, 64, 576, 1536, 172 * 64))
@pytest.mark.parametrize("use_signs, use_perm", ((False, False), (True, True)))
def test_matmul_form_equals_native_op_on_one_block(n: int, dtype: torch.dtype, use_signs: bool, use_perm: bool) -> None:
    """The traced form the compiler emits for decode-sized inputs computes exactly what the
    op's native path does (same matrices, same order, one rounding): bit for bit."""
    from hadacore.kernels.cpu.hadamard import _BLOCK_ELEMS, hadamard_by_matmuls, matmul_plan

    rows = 3
    assert rows * n <= _BLOCK_ELEMS  # one row block of the native path
    x, signs, perm = make(n, rows=rows, dtype=dtype, seed=n)
    x = x.reshape(1, rows, n)
    signs = signs if use_signs else None
    perm = perm if use_perm else None
    scale = 1.0 / n ** 0.5
    mats, afters = matmul_plan(n, scale, dtype, x.device, signed=signs is not None)
    got = hadamard_by_matmuls(x, signs, perm, mats, afters)
    want = hadamard_op(x, scale, signs, perm)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)
    assert rel_err(got, reference(x, scale, signs, perm)) < TOL.get(dtype, 1e-12)


@pytest.mark.parametrize("rows, lowered", ((4, True), (200, True), (1024, False)))
def test_cpu_lowering_uses_matmul_form_only_for_small_inputs(rows: int, lowered: bool) -> None:
    """A decode-sized Hadamard becomes plain matmuls in the compiled graph (200 rows: several
    of the op's row blocks); a large one keeps the op (whose blocked native path keeps its
    buffers in L2). All match the reference."""
    from compiler_models import apply_passes, capture, count
    from hadacore.kernels.cpu.hadamard import hadamard_by_matmuls

    n = 1536

    def f(x):
        return hadamard_op(torch.relu(x), 1.0 / n ** 0.5) * 2.0

    x = torch.randn(rows, n)
    gm, inputs = capture(f, x)
    apply_passes(gm, inputs, lowering=True)
    assert count(gm, hadamard_by_matmuls) == int(lowered) and count(gm, hadamard_op) == int(not lowered)
    choice = [nd.meta["hadacore_lowering"] for nd in gm.graph.nodes if "hadacore_lowering" in nd.meta]
    assert choice == (["cpu:matmuls 12x8x16 (torch.float32)"] if lowered else ["cpu:op (x not known to be small)"])
    y = gm(*inputs)[0]
    assert torch.allclose(y, f(x), rtol=1e-6, atol=1e-6)
    compiled = torch.compile(f, backend="hadacore")
    assert rel_err(compiled(x), 2.0 * reference(torch.relu(x), 1.0 / n ** 0.5)) < TOL[torch.float32]


def test_backward_is_the_adjoint() -> None:
    """Differentiable (learned rotations train through the online R4): gradcheck in fp64 with
    signs and a permutation, on a power of two and on bases 12 and 76 (not symmetric)."""
    for n in (64, 12 * 8, 76 * 4):
        x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
        signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(n)).double() * 2 - 1
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(n + 1))
        assert torch.autograd.gradcheck(lambda t: hadamard_op(t, 0.3, signs, perm), (x,))
