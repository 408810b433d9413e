"""End to end: torch.compile(backend="hadacore") on a hand-written Llama block and on a
tiny transformers LlamaForCausalLM (random weights, no download), with Inductor.

Inductor compiles are slow on the shared 2-core CPU: models are tiny, and each compiled
model is built once (module-scoped fixtures) and reused across asserts.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hadacore
from compiler_models import TinyLlamaBlock, quantize_modules, rel_err
from hadacore.backend import hadacore_backend
from hadacore.options import CompileOptions


@pytest.fixture(autouse=True)
def _fresh_dynamo_per_module():
    yield


# --------------------------------------------------------------------------- options


def test_backend_is_registered_by_entry_point():
    assert "hadacore" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("hadacore") is hadacore_backend


def test_unknown_option_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown hadacore option\(s\) \['quantise'\]; valid options: \[.*'quantize'"):
        CompileOptions.from_mapping({"quantise": "w4a16"})
    f = torch.compile(lambda x: x + 1, backend="hadacore", options={"bogus": 1})
    with pytest.raises(Exception, match="bogus"):
        f(torch.randn(3))


@pytest.mark.parametrize("key,value", [
    ("quantize", "w8a8"), ("group_size", 0), ("group_size", 32.0), ("bits", 8), ("rotate", "offline"),
    ("split_k", -1), ("split_k", "fast"), ("skip_layers", 3), ("deterministic", "yes"), ("inductor", 1), ("fp8_attention", None),
    ("rotated_kv_cache", "yes"),
])
def test_bad_option_values(key, value):
    with pytest.raises(ValueError, match=f"hadacore option '{key}'"):
        CompileOptions.from_mapping({key: value})


def test_rotated_kv_cache_needs_online_rotation_and_no_fp8_attention():
    with pytest.raises(ValueError, match="'rotated_kv_cache': needs rotate='online'"):
        CompileOptions.from_mapping({"rotated_kv_cache": True})
    with pytest.raises(ValueError, match="'rotated_kv_cache' and 'fp8_attention' cannot be combined"):
        CompileOptions.from_mapping({"rotated_kv_cache": True, "rotate": "online", "fp8_attention": True})


def test_defaults_and_mode():
    assert CompileOptions.from_mapping(None) == CompileOptions()
    assert CompileOptions.from_mapping({"split_k": "auto", "skip_layers": ["lm_head"]}) == CompileOptions(
        split_k=0, skip_layers=("lm_head",))
    gm = torch.fx.symbolic_trace(nn.ReLU())
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        hadacore_backend(gm, [torch.randn(2)], mode="fastest")


# --------------------------------------------------------------------------- hand-written block


@pytest.fixture(scope="module")
def quant_block():
    """A QuantLinear Llama block (act-order down_proj with an online Hadamard, act-order
    o_proj), compiled once with Inductor and dynamic shapes."""
    torch.manual_seed(0)
    block = quantize_modules(TinyLlamaBlock().eval(), 32, act_order=("down_proj", "o_proj"), online=("down_proj",))
    torch._dynamo.reset()
    hadacore.reset_stats()
    compiled = torch.compile(block, backend="hadacore", dynamic=True)
    first = torch.randn(2, 5, 64)
    with torch.no_grad():
        out = compiled(first)
    return block, compiled, first, out, hadacore.stats()


# The CPU lowering computes W4A16 activations in bf16 (hadacore.fxpasses.lower): compiled
# results match the fp32 eager reference to the bf16 kernel tolerance.
KERNEL_TOL = 1e-2


def test_quantlinear_block_compiled_matches_eager(quant_block):
    block, compiled, x, out, s = quant_block
    with torch.no_grad():
        err = rel_err(out, block(x))
    assert err < KERNEL_TOL
    assert s["graphs_compiled"] == 1
    assert (s["linear_found"], s["linear_rewritten"], s["attention_found"]) == (7, 7, 1)
    assert (s["gather_removed"], s["gather_kept"]) == (1, 1)  # down: into the Hadamard; o_proj: kept


def test_dynamic_sequence_lengths_do_not_recompile(quant_block):
    block, compiled, *_ = quant_block
    with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
        for seq in (3, 9, 12):  # (a size of 1 is specialised by Dynamo itself: 0/1 guard)
            x = torch.randn(3, seq, 64)
            assert rel_err(compiled(x), block(x)) < KERNEL_TOL


def test_grad_mode_keeps_the_differentiable_pattern():
    """With grad enabled and trainable parameters, AOTAutograd builds a joint graph and
    w4a16_gemm has no backward: the layers stay dequantize -> linear and still train."""
    torch.manual_seed(0)
    block = quantize_modules(TinyLlamaBlock().eval(), 32, act_order=("o_proj",))
    x = torch.randn(2, 5, 64)
    torch._dynamo.reset()
    hadacore.reset_stats()
    out = torch.compile(block, backend="hadacore", options={"inductor": False})(x)
    out.sum().backward()
    s = hadacore.stats()
    assert s["linear_rewritten"] == 0 and s["skipped"]["autograd graph (w4a16_gemm has no backward): kept dequantize -> linear"] == 7
    assert rel_err(out.detach(), block(x).detach()) < 1e-5
    assert block.input_norm.weight.grad is not None


# --------------------------------------------------------------------------- transformers Llama


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    return model, ids, ref


def _compile_logits(model, ids, **options):
    torch._dynamo.reset()
    hadacore.reset_stats()
    f = torch.compile(model.forward, backend="hadacore", options=options)
    with torch.no_grad():
        return f(ids).logits, hadacore.stats()


def test_llama_compile_time_quantization_vs_eager_rtn(llama):
    model, ids, ref = llama
    got, s = _compile_logits(model, ids, quantize="w4a16", group_size=32)
    with torch.no_grad():
        expect = quantize_modules(model, 32)(ids).logits  # every nn.Linear (lm_head too) -> QuantLinear
    assert rel_err(got, expect) < KERNEL_TOL
    assert rel_err(got, ref) > 1e-3  # quantization really happened
    assert (s["linear_found"], s["linear_quantized"], s["attention_found"]) == (15, 15, 2)


def test_llama_compile_time_quantization_exact_without_lowering(llama):
    """The passes' own output (generic ops, before the CPU lowering) is exact in fp32."""
    from compiler_models import apply_passes, capture

    model, ids, _ = llama
    with torch.no_grad():
        gm, inputs = capture(model.forward, ids)
        apply_passes(gm, inputs, quantize="w4a16", group_size=32)
        expect = quantize_modules(model, 32)(ids).logits
        logits = next(o for o in gm(*inputs) if o.shape == expect.shape)
        assert rel_err(logits, expect) < 1e-5


def test_llama_rotations_only_are_exact(llama):
    model, ids, ref = llama
    got, s = _compile_logits(model, ids, rotate="online", inductor=False)
    assert rel_err(got, ref) < 1e-4
    assert s["hadamard_inserted"] == 6 and s["attention_rewritten"] == 2


def test_llama_fp8_attention_emulation_bound(llama):
    model, ids, ref = llama
    got, s = _compile_logits(model, ids, fp8_attention=True, inductor=False)
    err = rel_err(got, ref)
    # Stated bound: per-head e4m3 Q and K (3 mantissa bits, 2**-4 relative per element)
    # moves the logits of this 2-layer model by less than 2**-4 relative.
    assert 1e-5 < err < 2**-4
    # HF Llama's SDPA (no dropout, constant scale/causal) becomes the fused op in both layers
    assert (s["fp8_attention_fused"], s["fp8_qdq_inserted"]) == (2, 0)


def test_llama_rotated_quantized_with_inductor_vs_eager_reference(llama):
    model, ids, _ = llama
    got, s = _compile_logits(model, ids, quantize="w4a16", group_size=32, rotate="online")
    with torch.no_grad():
        expect = quantize_modules(model, 32, online=("down_proj",))(ids).logits
    assert rel_err(got, expect) < KERNEL_TOL
    assert s["linear_fused"] == 10 and s["hadamard_inserted"] == 6  # (q, k, v) + (gate, up) per layer


# --------------------------------------------------------------------------- plain graphs, re-compiles


def test_graph_with_nothing_to_rewrite_equals_inductor():
    def f(x, y):
        return torch.softmax(x @ y.t(), -1).sin() * 3 + x.sum()

    x, y = torch.randn(8, 16), torch.randn(8, 16)
    torch._dynamo.reset()
    hadacore.reset_stats()
    ours = torch.compile(f, backend="hadacore")(x, y)
    assert hadacore.stats()["linear_found"] == 0
    torch._dynamo.reset()
    theirs = torch.compile(f, backend="inductor")(x, y)
    assert torch.equal(ours, theirs)


def test_compiling_an_already_compiled_model():
    """Dynamo traces through an OptimizedModule, so the outer torch.compile wins: the model
    behaves exactly as if the original module had been compiled with the outer options."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 32))
    x = torch.randn(3, 64)
    opts = {"quantize": "w4a16", "group_size": 32, "inductor": False}
    torch._dynamo.reset()
    inner = torch.compile(m, backend="hadacore", options={"inductor": False})
    inner(x)
    hadacore.reset_stats()
    outer = torch.compile(inner, backend="hadacore", options=opts)
    got = outer(x)
    assert hadacore.stats()["linear_quantized"] == 2, hadacore.stats()
    assert rel_err(got, quantize_modules(m, 32)(x)) < 1e-5


# --------------------------------------------------------------------------- caches

_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys, torch, hadacore
    from torch._dynamo.utils import counters
    from torch import nn
    from hadacore.quant.linear import QuantLinear
    torch.manual_seed(int(sys.argv[1]))  # a different model in each process, same shapes
    m = nn.Sequential(nn.Linear(64, 128, bias=False), nn.SiLU(), nn.Linear(128, 64, bias=False))
    f = torch.compile(m, backend="hadacore", options={"quantize": "w4a16", "group_size": 32})
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = f(x)
        ref = nn.Sequential(QuantLinear.from_linear(m[0], group_size=32), nn.SiLU(),
                            QuantLinear.from_linear(m[2], group_size=32))(x)
    print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"],
                      "miss": counters["inductor"]["fxgraph_cache_miss"],
                      "rewritten": hadacore.stats()["linear_rewritten"],
                      "err": float((y - ref).norm() / ref.norm())}))
""")


def test_second_compile_in_fresh_process_hits_fx_graph_cache(tmp_path):
    """The rewrite happens before AOT, so a fresh process hits Inductor's FX graph cache;
    the quantized weights are graph inputs, not baked constants, so a different model of
    the same shapes reuses the cached code and still computes its own result."""
    import json

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    script = tmp_path / "compile_once.py"
    script.write_text(_CACHE_SCRIPT)
    runs = []
    for seed in (0, 1):
        out = subprocess.run([sys.executable, str(script), str(seed)], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["miss"] >= 1 and first["hit"] == 0
    assert second["hit"] >= 1 and second["miss"] == 0
    assert first["rewritten"] == second["rewritten"] == 2
    assert first["err"] < KERNEL_TOL and second["err"] < KERNEL_TOL


def test_symbolic_divisibility_checks_add_no_guards():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from hadacore.fxpasses.lower import known_multiple

    env = ShapeEnv()
    s = env.create_unbacked_symint()
    torch._check(s >= 2)
    assert known_multiple(s * 64, 64) and known_multiple(4096, 64)
    assert not known_multiple(s, 64) and not known_multiple(4100, 64)
    assert len(env.guards) == 0


def test_no_silent_eager_fallback_of_a_quantized_model_at_the_recompile_limit():
    """Issue 13.7: past Dynamo's recompile_limit the eager (float) function would run. A
    hadacore compile that changes the model refuses the last slot with what to change;
    one that does not (exact rotations only) falls back as Dynamo does."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    f = torch.compile(lin, backend="hadacore", dynamic=False, options={"quantize": "w4a16", "group_size": 32})
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=3), torch.no_grad():
        f(torch.randn(1, 64))
        f(torch.randn(2, 64))
        with pytest.raises(Exception, match=r"recompile_limit is 3.*dynamic=True"):
            f(torch.randn(3, 64))
        torch._dynamo.reset()
        g = torch.compile(lin, backend="hadacore", dynamic=False, options={"inductor": False})
        for m in range(1, 6):  # past the limit Dynamo runs lin eagerly: the same function here
            x = torch.randn(m, 64)
            torch.testing.assert_close(g(x), lin(x), rtol=1e-5, atol=1e-5)
