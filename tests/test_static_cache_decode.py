"""Decoding over HF's ``StaticCache`` through the hadacore passes.

- Regression: the cache's in-place writes survive. Dead-code elimination once dropped
  ``index_copy_`` / ``add_`` on the cache (they have no users), so every compiled decode
  step attended over a stale cache while prefill and perplexity (no cache) stayed correct.
- ``rotated_kv_cache``: R3 rotates K where it is written, so the cache holds rotated keys.
- Whenever the compiled model is another function than the eager one (compile-time
  quantization), every writer of the cache must be the compiled model.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import hadacore
import hadacore.fxpasses.cleanup as cleanup
from compiler_models import quantize_modules, rel_err

# Compile-time quantization with online rotations, and its eager reference: every nn.Linear
# an RTN QuantLinear of the same group size, down_proj's weight rotated for the online R4.
QUANT = {"quantize": "w4a16", "group_size": 32, "rotate": "online"}
W4A16_TOL = 1e-2  # bf16 activations (the W4A16 contract)


@pytest.fixture(scope="module")
def gqa_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def rtn_llama(gqa_llama):
    return quantize_modules(gqa_llama, QUANT["group_size"], online=("down_proj",))


def _decode_logits(model, prompt, steps, backend=None, options=None, compile_prefill=False):
    """Prefill + ``steps`` greedy decode steps; the logits of each (prefill included)."""
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 1)

    def step(ids, pos):
        return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]

    def prefill(ids, pos):  # its own code object: its own graph
        return step(ids, pos)

    fn = torch.compile(step, backend=backend, options=options, fullgraph=True) if backend else step
    pre = torch.compile(prefill, backend=backend, options=options, fullgraph=True) if compile_prefill else step
    n = prompt.shape[1]
    with torch.no_grad():
        logits = pre(prompt, torch.arange(n)[None])
        out = [logits]
        for s in range(steps):
            logits = fn(logits.argmax(-1)[:, None], torch.tensor([[n + s]]))
            out.append(logits)
    return torch.stack(out)


def test_compiled_quantized_decode_with_static_cache_matches_the_eager_model_it_compiles(gqa_llama, rtn_llama):
    """Prefill and decode steps compiled with compile-time quantization and online rotations
    read and write the cache in place: each step's logits are the eager RTN model's."""
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    ref = _decode_logits(rtn_llama, prompt, 4)
    torch._dynamo.reset()
    out = _decode_logits(gqa_llama, prompt, 4, backend="hadacore", options=QUANT, compile_prefill=True)
    for step, (o, r) in enumerate(zip(out, ref)):
        assert rel_err(o, r) < W4A16_TOL, f"step {step}"
    assert rel_err(out, _decode_logits(gqa_llama, prompt, 4)) > 1e-3  # really quantized


ROTATE = {"rotate": "online", "inductor": False}


def test_rotated_kv_cache_exact_when_every_writer_is_compiled(gqa_llama):
    torch.manual_seed(1)
    prompt = torch.randint(0, 96, (2, 5))
    ref = _decode_logits(gqa_llama, prompt, 4)
    torch._dynamo.reset()
    hadacore.reset_stats()
    out = _decode_logits(gqa_llama, prompt, 4, "hadacore", {**ROTATE, "rotated_kv_cache": True}, compile_prefill=True)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    # per layer and graph (prefill, decode): R4, and R3 as one Hadamard over Q and the written K
    s = hadacore.stats()
    assert (s["graphs_compiled"], s["attention_rewritten"], s["hadamard_inserted"]) == (2, 4, 8)


def test_rotated_kv_cache_really_holds_rotated_keys(gqa_llama):
    """An eager prefill writes unrotated keys into the cache that compiled decode steps read
    as rotated: the option's contract is broken and the logits move. (Were K not rotated at
    the write, the cache would not care who wrote it.)"""
    torch.manual_seed(1)
    prompt = torch.randint(0, 96, (2, 5))
    ref = _decode_logits(gqa_llama, prompt, 3)
    torch._dynamo.reset()
    out = _decode_logits(gqa_llama, prompt, 3, "hadacore", {**ROTATE, "rotated_kv_cache": True})
    assert (out[0] - ref[0]).abs().max() == 0  # the eager prefill itself
    assert (out[1:] - ref[1:]).abs().max() > 1e-3


def test_rotated_kv_cache_refuses_a_cache_it_cannot_account_for():
    """A cache buffer with a use the pass does not understand: neither place for R3 is exact
    (other graphs may have stored rotated keys), so compiling fails with the reason; without
    the option, K is rotated as attention reads it, which is exact."""
    from compiler_models import apply_passes, capture, HADAMARD

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("keys", torch.randn(1, 2, 6, 16))

        def forward(self, q, k, v, pos):
            self.keys.index_copy_(2, pos, k)
            self.keys.mul_(1.0)  # an in-place op the pass does not know
            return torch.nn.functional.scaled_dot_product_attention(q, self.keys, v)

    m = Attn()
    args = (torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 6, 16), torch.tensor([3]))
    keys0 = m.keys.clone()
    gm, inputs = capture(m, *args)  # runs m once: writes into m.keys
    with pytest.raises(ValueError, match="rotated_kv_cache: cannot rotate K .* the cache buffer has another use"):
        apply_passes(gm, inputs, rotate="online", rotated_kv_cache=True)
    gm, inputs = capture(m, *args)
    apply_passes(gm, inputs, rotate="online")
    rotated = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == HADAMARD.default]
    assert sorted(n.args[0].meta["example_value"].shape[2] for n in rotated) == [1, 6]  # Q, and K as read
    m.keys.copy_(keys0)
    expect = m(*args)
    m.keys.copy_(keys0)  # the graph reads the same buffer (an input) and writes into it again
    got = gm(*inputs)
    torch.testing.assert_close(got[0] if isinstance(got, (tuple, list)) else got, expect, rtol=1e-5, atol=1e-5)


def test_dead_code_elimination_keeps_in_place_ops():
    g = torch.fx.Graph()
    buf, x = g.placeholder("buf"), g.placeholder("x")
    g.call_method("index_copy_", (buf, 0, g.call_function(torch.arange, (1,)), x))
    g.call_method("add_", (buf, 1))
    dead = g.call_function(torch.neg, (x,))
    g.output(x)
    cleanup.eliminate_dead_code(g)
    targets = [n.target for n in g.nodes if n.op == "call_method"]
    assert targets == ["index_copy_", "add_"]
    assert dead not in g.nodes


def test_static_decoder_compiles_prefill_for_a_rotated_cache(gqa_llama):
    from hadacore.generate import StaticDecoder

    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    ref = StaticDecoder(gqa_llama, max_len=12, batch=2).generate(prompt, 5).tokens
    torch._dynamo.reset()
    hadacore.reset_stats()
    dec = StaticDecoder(gqa_llama, max_len=12, batch=2, backend="hadacore",
                        options={**ROTATE, "rotated_kv_cache": True})
    assert torch.equal(dec.generate(prompt, 5).tokens, ref)
    # prefill, where the cache creates its buffers; decode; prefill into the existing cache
    assert torch.equal(dec.generate(prompt, 5).tokens, ref)
    assert hadacore.stats()["graphs_compiled"] == 3
    assert torch.equal(dec.generate(prompt, 5).tokens, ref)
    assert hadacore.stats()["graphs_compiled"] == 3


def test_static_decoder_compiles_prefill_when_the_compiled_model_is_another_function(gqa_llama, rtn_llama):
    """Issue 13.5: with compile-time quantization (no rotated cache) an eager prefill would fill
    the cache from the float model and the quantized decode steps would read it: the tokens
    drift. The decoder compiles its prefill too, so they are the eager RTN model's, step by step."""
    from hadacore.generate import StaticDecoder

    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = StaticDecoder(rtn_llama, max_len=20).generate(prompt, 12).tokens
    torch._dynamo.reset()
    hadacore.reset_stats()
    dec = StaticDecoder(gqa_llama, max_len=20, backend="hadacore", options=QUANT)
    assert torch.equal(dec.generate(prompt, 12).tokens, ref)
    assert hadacore.stats()["graphs_compiled"] == 2  # prefill and decode
