"""Greedy generation with a hadacore checkpoint sharded over N tensor-parallel ranks.

    hadacore-convert meta-llama/Llama-3.2-1B out/ --tp 2          # once
    torchrun --standalone --nproc-per-node 2 examples/tp_generate.py out/ --prompt "The capital of France is"

    torchrun --standalone --nproc-per-node 2 examples/tp_generate.py --tiny   # self-contained check

Every rank loads only its shard (``hadacore.load(path, tp_rank=, tp_size=)``), runs the
same ``generate`` (logits are replicated after the row-parallel all-reduce, so every rank
picks the same token) and rank 0 prints. Uses gloo on CPU and NCCL on CUDA. ``--tiny``
converts a random tiny Llama (GPTQ with act-order, R1/R2 + online R4, planned for the
number of ranks) and checks the sharded greedy tokens against the single-process model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

import hadacore


def _generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _tiny_checkpoint(path: str, tp: int) -> str:
    """A random tiny Llama converted as a real model would be, planned for ``tp`` ranks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    hadacore.convert(LlamaForCausalLM(config), path, group_size=16, method="gptq", rotate="full", tp=tp,
                     calibration=calibration, dtype=torch.float32)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a directory written by hadacore-convert")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--strategy", choices=["tp_aware", "naive"], default="tp_aware")
    p.add_argument("--tiny", action="store_true", help="random tiny checkpoint; check against one process")
    args = p.parse_args()
    if not args.tiny and not args.checkpoint:
        p.error("give a checkpoint directory or --tiny")

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))

    reference = None
    tmp = None
    if args.tiny:
        # One rank writes the checkpoint; everyone learns where.
        holder = [None]
        if rank == 0:
            tmp = tempfile.TemporaryDirectory(prefix="hadacore_tp_tiny_")
            holder = [_tiny_checkpoint(os.path.join(tmp.name, "ckpt"), tp=world)]
            reference = hadacore.load(holder[0])
        if world > 1:
            dist.broadcast_object_list(holder, src=0)
        path = holder[0]
        ids = torch.tensor([[1, 17, 42, 99, 5]])
    else:
        from transformers import AutoTokenizer

        path = args.checkpoint
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids

    model = hadacore.load(path, tp_rank=rank, tp_size=world, device=device, strategy=args.strategy)
    out = _generate(model, ids.to(device), args.max_new_tokens)

    if rank == 0:
        if args.tiny:
            expected = _generate(reference, ids, args.max_new_tokens)
            same = torch.equal(out.cpu(), expected)
            print(f"tiny: tp={world} ({args.strategy}) tokens {out[0, ids.shape[1]:].tolist()}")
            print(f"tiny: tp={world} greedy tokens {'match' if same else 'DIFFER FROM'} the single-process model")
            if not same:
                raise SystemExit(1)
        else:
            print(tokenizer.decode(out[0], skip_special_tokens=True))
    if world > 1:
        dist.barrier()  # rank 0 may delete the tiny checkpoint only after everyone is done
        dist.destroy_process_group()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
