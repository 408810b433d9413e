"""find_linears and rewrite_w4a16 on hand-built FX graphs and on traced models."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import hadacore
from compiler_models import apply_passes, capture, count, DEQUANT, HADAMARD, quantize_modules, rel_err, W4A16
from hadacore.options import CompileOptions
from hadacore.fxpasses import PassContext
from hadacore.fxpasses.find_linears import find_linears
from hadacore.kernels.cpu.w4a16 import bf16_linear, int4_linear
from hadacore.quant.linear import QuantLinear



@pytest.fixture(autouse=True)
def _fresh_stats():
    hadacore.reset_stats()
    torch.manual_seed(0)


def _hand_built_graph():
    """y = linear(x, W) + linear(x, A): W is a module attribute, A an activation input."""
    root = nn.Module()
    root.w = nn.Parameter(torch.randn(16, 32))
    g = fx.Graph()
    x, a = g.placeholder("x"), g.placeholder("a")
    w = g.get_attr("w")
    l1 = g.call_function(F.linear, (x, w))
    l2 = g.call_function(torch._C._nn.linear, (x, a, None))
    g.output(g.call_function(operator.add, (l1, l2)))
    return fx.GraphModule(root, g), [torch.randn(3, 32), torch.randn(16, 32)]


def test_find_linears_hand_built_graph_skips_activation_weights():
    gm, inputs = _hand_built_graph()
    ctx = PassContext(gm, inputs, CompileOptions.from_mapping({}))
    find_linears(ctx)
    assert [s.kind for s in ctx.sites] == ["float"]
    assert ctx.sites[0].name == "w" and torch.equal(ctx.sites[0].weight, gm.w)
    s = hadacore.stats()
    assert s["linear_found"] == 1 and s["skipped"] == {"weight is not a parameter or buffer": 1}


def test_quantize_hand_built_graph_get_attr_weight():
    gm, inputs = _hand_built_graph()
    ref = gm(*inputs)
    apply_passes(gm, inputs, quantize="w4a16", group_size=16)
    assert count(gm, W4A16) == 1 and count(gm, torch._C._nn.linear) == 1  # F.linear is torch._C._nn.linear
    # reference: the same RTN quantization done eagerly by QuantLinear
    x, a = inputs
    lin = nn.Linear(32, 16, bias=False)
    lin.weight.data = gm.w.detach().clone()
    expect = QuantLinear.from_linear(lin, group_size=16).reference(x) + F.linear(x, a)
    assert rel_err(gm(*inputs), expect) < 1e-5
    assert rel_err(gm(*inputs), ref) > 1e-3  # it really is the quantized weight


class _MLP(nn.Module):
    def __init__(self, h=64, i=128):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=True)

    def forward(self, x):
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("online", [False, True])
def test_quantlinear_pattern_rewritten_to_w4a16(online):
    model = quantize_modules(_MLP(), 32, online=("down_proj",) if online else ())
    x = torch.randn(2, 5, 64)
    expect = model(x)
    gm, inputs = capture(model, x)
    assert count(gm, DEQUANT) == 3 and count(gm, HADAMARD) == int(online)
    ctx = apply_passes(gm, inputs)
    assert {s.kind for s in ctx.sites} == {"gptq"}
    assert (ctx.site(ctx.mlps[0].down).hadamard is not None) == online
    # gate and up share x and one config: fused into one GEMM; down is its own.
    assert count(gm, W4A16) == 2 and count(gm, DEQUANT) == 0 and count(gm, torch.narrow) == 2
    assert count(gm, HADAMARD) == int(online)  # the rotation stays a separate node
    s = hadacore.stats()
    assert (s["linear_found"], s["linear_rewritten"], s["linear_fused"]) == (3, 3, 2)
    assert rel_err(gm(*inputs)[0], expect) < 1e-5


# (x's leading shape, dynamic) -> the lowering's choice and the graph constants it keeps
_CPU_PATHS = {
    # act-order perms fold into the neighbours here, so "perm" is allowed but not required
    "int4": (((1, 3), False), "cpu:int4 (M <= 12 known at compile time)", ("packed", "zeros", "perm")),
    "bf16": (((3, 5), False), "cpu:bf16 BLAS (M > 12 known at compile time)", ("weight",)),
    "dispatch": (((3, 5), True), "cpu:prepared int4+bf16, dispatch on M per call", ("packed", "zeros", "weight", "perm")),
}


@pytest.mark.parametrize("path", list(_CPU_PATHS))
def test_cpu_lowering_prepares_weights_once(path):
    (lead, dynamic), choice, kept = _CPU_PATHS[path]
    model = quantize_modules(_MLP(), 32, act_order=("down_proj",))
    x = torch.randn(*lead, 64)
    expect = model(x)
    gm, inputs = capture(model, x, dynamic=dynamic)
    apply_passes(gm, inputs, lowering=True)
    ops = {"int4": int4_linear, "bf16": bf16_linear, "dispatch": torch.ops.hadacore.w4a16_gemm_cpu}
    assert count(gm, W4A16) == 0 and count(gm, ops[path]) == 2
    assert sum(count(gm, op) for op in ops.values()) == 2
    choices = [n.meta["hadacore_lowering"] for n in gm.graph.nodes if "hadacore_lowering" in n.meta]
    assert choices == [choice] * 2
    # only the chosen path's prepared tensors stay alive: the GPTQ constants were dropped
    buffers = [n for n, _ in gm.named_buffers() if n.startswith("_hadacore_") and "bias" not in n]
    kinds = {n.split("_")[-2] for n in buffers}  # names end in <tensor>_<counter>
    assert kinds - {"perm"} == set(kept) - {"perm"} and kinds <= set(kept), buffers
    assert rel_err(gm(*inputs)[0], expect) < 1e-2  # bf16 activations: the W4A16 CPU contract
    if dynamic:  # the same graph serves sizes on both sides of the threshold
        for other in ((1, 1), (4, 7)):
            xo = torch.randn(*other, 64)
            size = dict(zip(lead, other))  # Dynamo passes x's symbolic sizes as int inputs
            args = [xo if t is x else size[t] if isinstance(t, int) else t for t in inputs]
            assert rel_err(gm(*args)[0], model(xo)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compile_time_quantization_half_precision_model(dtype):
    model = _MLP().to(dtype)
    x = torch.randn(2, 5, 64, dtype=dtype)
    expect = quantize_modules(model, 32)(x)  # QuantLinear with scales in the model dtype
    gm, inputs = capture(model, x)
    apply_passes(gm, inputs, lowering=True, quantize="w4a16", group_size=32)
    assert count(gm, int4_linear) == 2  # M = 10 <= 12 (K = 64): the int4 path, known at compile time
    got = gm(*inputs)[0]
    assert got.dtype == dtype and rel_err(got, expect) < 1e-2
