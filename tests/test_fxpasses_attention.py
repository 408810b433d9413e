"""find_attention, block_graph and the online rotations (R3, R4) on traced Llama blocks."""

import pytest
import torch

import hadacore
from compiler_models import apply_passes, capture, count, HADAMARD, rel_err, TinyLlamaBlock



@pytest.fixture(autouse=True)
def _fresh_stats():
    hadacore.reset_stats()
    torch.manual_seed(0)


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "matmul_softmax"])
def test_attention_block_and_block_graph(sdpa):
    block = TinyLlamaBlock(sdpa=sdpa)
    gm, inputs = capture(block, torch.randn(2, 6, 64))
    ctx = apply_passes(gm, inputs)
    assert len(ctx.attention) == 1
    a = ctx.attention[0]
    assert (a.form, a.head_dim) == ("sdpa" if sdpa else "matmul_softmax", 16)
    assert (a.q_proj, a.k_proj, a.v_proj, a.o_proj) == ("q_proj", "k_proj", "v_proj", "o_proj")
    g = ctx.block_graph
    for src in ("q_proj", "k_proj", "v_proj"):
        assert g.has_edge(src, a.name + ".attn")
    assert g.has_edge(a.name + ".attn", "o_proj")
    assert g.has_edge("gate_proj", "down_proj") and g.has_edge("up_proj", "down_proj")
    assert "silu" in g.edges["gate_proj", "down_proj"]["ops"]
    assert [(m.gate, m.up, m.down) for m in ctx.mlps] == [("gate_proj", "up_proj", "down_proj")]
    assert len(g.graph["residual_adds"]) == 2
    # o_proj's output reaches the MLP projections through the residual add and the norm
    assert g.has_edge("o_proj", "gate_proj")
    assert hadacore.stats()["attention_found"] == 1


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "matmul_softmax"])
def test_rotations_are_exact_fp32(sdpa):
    block = TinyLlamaBlock(sdpa=sdpa).eval()
    x = torch.randn(2, 6, 64)
    expect = block(x)
    gm, inputs = capture(block, x)
    before = count(gm, HADAMARD)
    apply_passes(gm, inputs, rotate="online")
    assert count(gm, HADAMARD) - before == 3  # R4 before down_proj, R3 on Q and on K
    s = hadacore.stats()
    assert s["hadamard_inserted"] == 3 and s["attention_rewritten"] == 1
    # R3 on K runs on the 2 KV heads, before the GQA repeat to 4 heads; Q has 4 heads
    heads = sorted(n.args[0].meta["example_value"].shape[1] for n in gm.graph.nodes
                   if n.op == "call_function" and n.target == HADAMARD.default and n.args[0].meta["example_value"].dim() == 4)
    assert heads == [block.kv_heads, block.heads]
    got = gm(*inputs)[0]
    assert rel_err(got, expect) < 1e-4
    # the rotated down_proj weight really differs from the original (a no-op would pass too)
    assert any(n.startswith("_hadacore_down_proj") for n, _ in gm.named_buffers())


def test_unsupported_head_dim_names_layer_and_nearest_sizes():
    block = TinyLlamaBlock(head_dim=18)
    gm, inputs = capture(block, torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match=r"R3 on attention .*head_dim.*nearest supported: 16 or 20"):
        apply_passes(gm, inputs, rotate="online")


def test_unsupported_intermediate_size_names_down_proj():
    block = TinyLlamaBlock(inter=184)  # 23 * 8: no construction gives 92 or 184
    gm, inputs = capture(block, torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match=r"R4 on down_proj .*nearest supported: 180 or 192"):
        apply_passes(gm, inputs, rotate="online")


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "matmul_softmax"])
def test_fp8_attention_emulation_bound(sdpa):
    block = TinyLlamaBlock(sdpa=sdpa).eval()
    x = torch.randn(2, 6, 64)
    expect = block(x)
    gm, inputs = capture(block, x)
    apply_passes(gm, inputs, fp8_attention=True)
    assert count(gm, HADAMARD) == 0  # R3 folded into the FP8 op
    s = hadacore.stats()
    if sdpa:  # one fused op replaces the SDPA
        assert count(gm, torch.ops.hadacore.fp8_attention) == 1
        assert count(gm, torch.nn.functional.scaled_dot_product_attention) == 0
        assert (s["fp8_attention_fused"], s["fp8_qdq_inserted"]) == (1, 0)
    else:  # R3 + FP8 round trip on Q and K around the explicit attention
        assert count(gm, torch.ops.hadacore.fp8_qdq) == 2
        assert (s["fp8_attention_fused"], s["fp8_qdq_inserted"]) == (0, 2)
    err = rel_err(gm(*inputs)[0], expect)
    # e4m3 keeps 3 mantissa bits (relative rounding <= 2**-4 per element); attention output
    # error lands well inside that, and must not be zero (the emulation really ran).
    assert 1e-5 < err < 2**-4


def test_fp8_qdq_op_error_bound_and_fused_r3():
    x = torch.randn(2, 3, 5, 16) * torch.logspace(-2, 1, 16)
    y = torch.ops.hadacore.fp8_qdq(x, 0.0)
    scale = x.abs().amax(dim=(-2, -1), keepdim=True) / 448
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10)  # normals: half an ulp; subnormals: 2**-10
    assert ((y - x).abs() <= bound * (1 + 1e-6)).all()
    assert not torch.equal(y, x)
    h = torch.ops.hadacore.hadamard(x, 0.25)
    assert torch.equal(torch.ops.hadacore.fp8_qdq(x, 0.25), torch.ops.hadacore.fp8_qdq(h, 0.0))


def test_fp8_qdq_opcheck():
    x = torch.randn(2, 3, 5, 16)
    torch.library.opcheck(torch.ops.hadacore.fp8_qdq.default, (x, 0.25))
    torch.library.opcheck(torch.ops.hadacore.fp8_qdq.default, (x.bfloat16(), 0.0))


def test_fp8_attention_with_mask_tensor():
    class MaskedAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))

        def forward(self, x, mask):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, 4, 16).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    model = MaskedAttention().eval()
    x = torch.randn(2, 6, 64)
    mask = torch.randn(2, 1, 6, 6)  # additive, broadcast over heads
    expect = model(x, mask)
    gm, inputs = capture(model, x, mask)
    apply_passes(gm, inputs, fp8_attention=True)
    assert count(gm, torch.ops.hadacore.fp8_attention) == 1 and hadacore.stats()["fp8_attention_fused"] == 1
    err = rel_err(gm(*inputs)[0], expect)
    assert 1e-5 < err < 2**-4
