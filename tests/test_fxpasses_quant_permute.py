"""Compile-time quantization, TP-aware act-order permutation and horizontal fusion."""

import logging
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import hadacore
from compiler_models import apply_passes, capture, count, HADAMARD, quantize_modules, rel_err, TinyLlamaBlock, W4A16
from hadacore.quant.act_order import is_sorted_by_group
from hadacore.quant.rtn import rtn_gptq_tensors



@pytest.fixture(autouse=True)
def _fresh_stats():
    hadacore.reset_stats()
    torch.manual_seed(0)


def test_compile_time_quantization_matches_eager_rtn_and_fuses():
    block = TinyLlamaBlock().eval()
    x = torch.randn(2, 6, 64)
    expect = quantize_modules(block, 32)(x)  # eager reference: QuantLinear.from_linear everywhere
    gm, inputs = capture(block, x)
    apply_passes(gm, inputs, quantize="w4a16", group_size=32)
    # q/k/v -> one GEMM, gate/up -> one GEMM, o_proj, down_proj
    assert count(gm, W4A16) == 4 and count(gm, torch._C._nn.linear) == 0
    s = hadacore.stats()
    assert (s["linear_found"], s["linear_quantized"], s["linear_rewritten"], s["linear_fused"]) == (7, 7, 7, 5)
    assert rel_err(gm(*inputs)[0], expect) < 1e-5


def test_rotation_plus_quantization_matches_eager_reference():
    block = TinyLlamaBlock().eval()
    x = torch.randn(2, 6, 64)
    expect = quantize_modules(block, 32, online=("down_proj",))(x)
    gm, inputs = capture(block, x)
    apply_passes(gm, inputs, quantize="w4a16", group_size=32, rotate="online")
    assert count(gm, HADAMARD) == 3
    assert rel_err(gm(*inputs)[0], expect) < 1e-5  # R3 is exact; R4 + RTN = QuantLinear(online_hadamard)


def test_group_size_not_dividing_k_is_an_error_naming_layers_and_sizes_that_fit():
    """A requested quantization that cannot apply is never dropped silently (issue 13.6)."""
    block = TinyLlamaBlock().eval()
    x = torch.randn(1, 4, 64)
    gm, inputs = capture(block, x)
    with pytest.raises(ValueError, match=r"cannot quantize 7 linear layer\(s\): .*q_proj: its input size K=64 is not "
                                         r"a multiple of group_size 48.*Group sizes that fit every layer of this "
                                         r"graph: \[32, 64, -1\]"):
        apply_passes(gm, inputs, quantize="w4a16", group_size=48)  # K=64 (most), K=128 (down): no


def test_skip_layers_keeps_named_layers_in_float_with_a_stats_entry():
    block = TinyLlamaBlock().eval()
    x = torch.randn(1, 4, 64)
    gm, inputs = capture(block, x)
    apply_passes(gm, inputs, quantize="w4a16", group_size=32, skip_layers=("*down_proj", "*o_proj"))
    s = hadacore.stats()
    assert s["linear_quantized"] == 5 and s["skipped"]["matched skip_layers: kept in float"] == 2
    assert count(gm, W4A16) == 2  # q/k/v and gate/up, each fused into one GEMM


def test_non_finite_weight_is_an_error_naming_the_layer():
    block = TinyLlamaBlock().eval()
    with torch.no_grad():
        block.up_proj.weight[3, 5] = float("nan")
    x = torch.randn(1, 4, 64)
    gm, inputs = capture(block, x)
    with pytest.raises(ValueError, match=r"up_proj: its weight has 1 non-finite value"):
        apply_passes(gm, inputs, quantize="w4a16", group_size=32)


@pytest.mark.parametrize("online", [False, True], ids=["folded_into_gate_up", "fused_into_hadamard"])
def test_act_order_down_proj_needs_no_gather(online):
    block = TinyLlamaBlock().eval()
    ref = quantize_modules(block, 32, act_order=("down_proj",), online=("down_proj",) if online else ())
    assert not is_sorted_by_group(ref.down_proj.g_idx)
    x = torch.randn(2, 6, 64)
    expect = ref(x)
    gm, inputs = capture(ref, x)
    ctx = apply_passes(gm, inputs)
    down = ctx.site("down_proj")
    assert is_sorted_by_group(down.gptq["g_idx"]) and down.gather is None
    assert count(gm, torch.index_select) == 0
    had = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (HADAMARD, HADAMARD.default)]
    if online:
        assert len(had) == 1 and had[0].args[3] is not None  # the permutation rides on the store
    s = hadacore.stats()
    assert s["gather_removed"] == 1 and s["gather_kept"] == 0
    assert rel_err(gm(*inputs)[0], expect) < 1e-5


def test_act_order_o_proj_keeps_a_gather(caplog):
    block = TinyLlamaBlock().eval()
    ref = quantize_modules(block, 32, act_order=("o_proj",))
    x = torch.randn(2, 6, 64)
    expect = ref(x)
    gm, inputs = capture(ref, x)
    with caplog.at_level(logging.INFO, logger="hadacore.compiler"):
        apply_passes(gm, inputs)
    # one line per reason, not per layer, and it does not say the layer was left alone
    assert "1 layer(s) rewritten with their act-order gather kept at run time" in caplog.text
    assert "left o_proj alone" not in caplog.text
    assert count(gm, torch.index_select) == 1
    s = hadacore.stats()
    assert s["gather_kept"] == 1 and s["gather_removed"] == 0
    assert any(r.startswith("act-order gather kept (input is not silu(gate) * up)") for r in s["skipped"])
    assert rel_err(gm(*inputs)[0], expect) < 1e-5


def test_horizontal_fusion_hand_built_graph_with_bias():
    """Two GPTQ linears on one input, weights as get_attr buffers -> one GEMM + two narrows."""
    torch.manual_seed(1)
    root = nn.Module()
    names = {}
    for name, n in (("a", 24), ("b", 40)):
        t = rtn_gptq_tensors(torch.randn(n, 64), 4, 32)
        for k, v in t.items():
            root.register_buffer(f"{name}_{k}", v)
        root.register_buffer(f"{name}_bias", torch.randn(n))
        names[name] = n
    g = fx.Graph()
    x = g.placeholder("x")
    outs = []
    for name in names:
        args = [g.get_attr(f"{name}_{k}") for k in ("qweight", "qzeros", "scales", "g_idx")]
        w = g.call_function(torch.ops.hadacore.gptq_dequantize, (*args, 32, 4))
        outs.append(g.call_function(F.linear, (x, w, g.get_attr(f"{name}_bias"))))
    g.output(g.call_function(torch.cat, ((outs[1], g.call_function(operator.mul, (outs[0], 2))), -1)))
    gm = fx.GraphModule(root, g)
    inputs = [torch.randn(3, 5, 64)]
    expect = gm(*inputs)
    apply_passes(gm, inputs)
    assert count(gm, W4A16) == 1 and count(gm, torch.narrow) == 2
    assert count(gm, torch.ops.hadacore.gptq_dequantize) == 0
    assert hadacore.stats()["linear_fused"] == 2
    assert rel_err(gm(*inputs), expect) < 1e-5


def test_different_group_sizes_are_not_fused():
    block = TinyLlamaBlock().eval()
    ref = quantize_modules(block, 32)
    from hadacore.quant.linear import QuantLinear

    ref.k_proj = QuantLinear.from_linear(block.k_proj, group_size=64)
    gm, inputs = capture(ref, torch.randn(1, 3, 64))
    apply_passes(gm, inputs)
    assert count(gm, W4A16) == 5  # q+v fused, k alone, gate+up fused, o, down


@pytest.mark.parametrize("act_order", [False, True], ids=["sorted", "act_order"])
def test_block_diagonal_online_hadamard_is_left_unfused_and_exact(act_order):
    """A tp>1 down_proj (``hadamard_block = K/2``: reshape -> hadamard -> reshape) is not the
    fused R4 pattern: its Hadamard must stay block-diagonal, never be taken for a whole-K
    one, and an act-order permutation cannot ride on its store; same numbers as eager."""
    from hadacore.ops import block_hadamard_transform
    from hadacore.quant.linear import QuantLinear
    from hadacore.quant.act_order import permute_input_columns

    block = TinyLlamaBlock().eval()
    ref = quantize_modules(block, 32)
    w = block_hadamard_transform(block.down_proj.weight.detach(), 64)  # K = 128, two blocks
    order = torch.randperm(128) if act_order else torch.arange(128)
    tensors = permute_input_columns(rtn_gptq_tensors(w[:, order], 4, 32, True), torch.argsort(order))
    ref.down_proj = QuantLinear.from_tensors(tensors, group_size=32, online_hadamard=True, hadamard_block=64)
    ref.down_proj.numerics = "reference"
    assert is_sorted_by_group(ref.down_proj.g_idx) != act_order
    x = torch.randn(2, 6, 64)
    expect = ref(x)
    gm, inputs = capture(ref, x)
    ctx = apply_passes(gm, inputs)
    assert ctx.site("down_proj").hadamard is None  # not recognised as an online R4 ...
    had = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (HADAMARD, HADAMARD.default)]
    assert len(had) == 1  # ... and left block-diagonal, unpermuted
    meta = had[0].meta.get("val", had[0].meta.get("example_value"))
    assert tuple(meta.shape[-2:]) == (2, 64) and had[0].args[1] == 0.125
    assert len(had[0].args) < 4 or had[0].args[3] is None
    assert count(gm, W4A16) == 4  # q/k/v, gate/up, o_proj, down_proj all still fused GEMMs
    s = hadacore.stats()
    assert s["gather_removed"] == 0 and s["gather_kept"] == int(act_order)
    assert rel_err(gm(*inputs)[0], expect) < 1e-5
