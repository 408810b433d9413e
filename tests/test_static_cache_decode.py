"""Regression: a static KV cache's in-place writes survive the hadacore passes.

Dead-code elimination once dropped ``index_copy_`` / ``add_`` on the cache (they have no
users), so every compiled decode step attended over a stale cache while prefill and
perplexity (no cache) stayed correct.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import hadacore.fxpasses.cleanup as cleanup


def _decode_logits(model, prompt, steps, backend=None, options=None):
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 1)

    def step(ids, pos):
        return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]

    fn = torch.compile(step, backend=backend, options=options) if backend else step
    n = prompt.shape[1]
    with torch.no_grad():
        logits = step(prompt, torch.arange(n)[None])
        out = []
        for s in range(steps):
            logits = fn(logits.argmax(-1)[:, None], torch.tensor([[n + s]]))
            out.append(logits)
    return torch.stack(out)


def test_compiled_decode_with_static_cache_matches_eager():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 96, (1, 5))
    ref = _decode_logits(model, prompt, 4)
    torch._dynamo.reset()
    out = _decode_logits(model, prompt, 4, backend="hadacore", options={"inductor": False})
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


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
