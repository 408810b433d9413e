"""Convert and compile random-weight models with real architectures' layer shapes, 2 layers deep
(1 for the 7B shapes, to keep the suite's time).

Each architecture's own hidden / intermediate / head sizes (and Qwen2's q/k/v biases), with a
small vocabulary: the rotations are exact in fp32, the RTN checkpoint loads as the source's
architecture, and the compiled model computes what the eager one does. Which Hadamard orders
the shapes need is in tests/test_hadamard_models.py; this file runs them end to end.
"""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import hadacore  # noqa: E402
from hadacore.convert.pipeline import rotate_model  # noqa: E402
from hadacore.quant.linear import reference_numerics  # noqa: E402

# model_type, hidden, intermediate, heads, kv heads, head_dim (None: hidden / heads), Hadamard orders exercised
SHAPES = {
    "Qwen2.5-0.5B": ("qwen2", 896, 4864, 14, 2, None),  # R1 28x32, R4 76x64 (Paley II), biases
    "Qwen2.5-1.5B": ("qwen2", 1536, 8960, 12, 2, None),  # R1 12x128, R4 140x64, head_dim 128
    "SmolLM2-360M": ("llama", 960, 2560, 15, 5, None),  # R1 60x16, R4 40x64
    "Llama-3.2-1B": ("llama", 2048, 8192, 32, 8, 64),  # powers of two
    "Qwen2.5-7B": ("qwen2", 3584, 18944, 28, 4, None),  # R4 148x128 (Paley II)
}
SLOW = {"Qwen2.5-7B"}  # 0.23B parameters in its one layer


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SHAPES])
def test_real_shapes_convert_and_compile(name, tmp_path):
    model_type, hidden, intermediate, heads, kv_heads, head_dim = SHAPES[name]
    layers = 1 if name in SLOW else 2
    kw = dict(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
              tie_word_embeddings=True)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        rotated = copy.deepcopy(model)
        rotate_model(rotated, rotate="full", seed=0)
        assert rel(rotated(ids).logits, want) < 1e-4  # R1, R2 and R4 are exact
    del rotated

    out = tmp_path / "w4"
    hadacore.convert(model, out, method="rtn", group_size=64, rotate="full", dtype=torch.float32)
    q = hadacore.load(out)
    assert type(q).__name__ == type(model).__name__  # the source's architecture, biases and all
    if model_type == "qwen2":
        assert q.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        with reference_numerics(q):
            ref = q(ids).logits
        eager = q(ids).logits
        torch._dynamo.reset()
        hadacore.reset_stats()
        compiled = torch.compile(q.forward, backend="hadacore")(input_ids=ids).logits
    assert rel(eager, ref) < 2e-2 and rel(compiled, ref) < 2e-2  # bf16 activations
    assert hadacore.stats()["linear_rewritten"] == 7 * layers  # every quantized linear fused
    assert rel(ref, want) < 0.5  # a 4-bit model of the source, not another one
