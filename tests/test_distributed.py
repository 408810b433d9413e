"""Tensor parallelism on gloo: sharded forward == single process, collectives, failures.

Each multi-process test spawns its ranks on 127.0.0.1 (one spawn per test, many checks
per spawn: process start-up dominates on small CPUs). Workers assert; the parent waits
with a deadline, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from hadacore.checkpoint import load
from hadacore.checkpoint.read import DictSource, SafetensorsSource, read_gptq
from hadacore.distributed import ShardLoadError, plan_mlp_shard
from hadacore.quant.act_order import fold_into_gate_up, is_sorted_by_group
from hadacore.quant.linear import reference_numerics
from hadacore.formats.gptq import dequantize_gptq
from tiny_checkpoints import tiny_llama_config, write_tiny_checkpoint

GROUP = 16
SPAWN_TIMEOUT_S = 240
PG_TIMEOUT_S = 60


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target, args, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    status = "ok"
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=PG_TIMEOUT_S),
        )
        target(rank, world, *args)
    except BaseException:  # reported to the parent through the file
        status = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(status)
        if dist.is_initialized():
            dist.destroy_process_group()
    if status != "ok":
        os._exit(1)


def spawn(world: int, target, *args, out_dir, timeout: float = SPAWN_TIMEOUT_S) -> list[int]:
    """Run ``target(rank, world, *args)`` on ``world`` gloo ranks; fail on error or timeout."""
    out_dir = str(out_dir)
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.txt")
        if os.path.exists(path):
            os.remove(path)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, target, args, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} still running after {timeout}s"
    reports = {}
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.txt")
        reports[r] = open(path).read() if os.path.exists(path) else None
    failed = {r: rep for r, rep in reports.items() if rep not in ("ok", None)}
    assert not failed, "\n".join(f"--- rank {r}:\n{rep}" for r, rep in failed.items())
    return [p.exitcode for p in procs]


class OpCounter(TorchDispatchMode):
    """Counts every aten/custom op call (functional collectives show up as ``_c10d_functional.*``)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.hadamard_perm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name  # e.g. "_c10d_functional::all_reduce"
        self.counts[name] += 1
        if name == "hadacore::hadamard" and len(args) > 3 and args[3] is not None:
            self.hadamard_perm += 1
        return func(*args, **kwargs)

    def __getitem__(self, name: str) -> int:
        return self.counts[name]


# --------------------------------------------------------------------------- fixtures


def _checkpoints(root, tp: int) -> dict[str, str]:
    """Three act-order checkpoints + references (logits, layer-0 MLP output) for ``tp`` ranks."""
    inter = tiny_llama_config().intermediate_size
    specs = {
        "plain": dict(r4_block=None, down_act_order="global"),
        "r4_block_local": dict(r4_block=inter // tp, down_act_order="block"),
        "r4_global": dict(r4_block=inter // tp, down_act_order="global"),
    }
    paths = {}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 7), generator=gen)
    x = torch.randn(2, 5, 64, generator=gen)
    for name, kw in specs.items():
        path = os.path.join(str(root), name)
        ref = write_tiny_checkpoint(path, seed=3, group_size=GROUP, **kw)
        with torch.no_grad(), reference_numerics(ref):
            torch.save(
                {"ids": ids, "logits": ref(ids).logits, "x": x, "mlp": ref.model.layers[0].mlp(x)},
                os.path.join(path, "reference.pt"),
            )
        paths[name] = path
    return paths


# --------------------------------------------------------------------------- single process


def test_shard_plans_read_the_slices_of_the_offline_fold(tmp_path):
    """What a rank reads at load time (``plan_mlp_shard`` + ``read_gptq``) from an unplanned
    act-order checkpoint == the contiguous shard of the offline TP-aware fold
    (``fold_into_gate_up``), bit for bit; and the fold computes the same MLP."""
    path = str(tmp_path / "ck")
    write_tiny_checkpoint(path, seed=0, group_size=GROUP)
    src = SafetensorsSource(path)
    full = {p: read_gptq(src, f"model.layers.0.mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")}
    assert not is_sorted_by_group(full["down_proj"]["g_idx"])
    gate, up, down = fold_into_gate_up(full["gate_proj"], full["up_proj"], full["down_proj"])
    assert is_sorted_by_group(down["g_idx"])

    def deq(t):
        return dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], GROUP, dtype=torch.float64)

    x = torch.randn(3, 64, dtype=torch.float64)

    def mlp(g, u, d):
        return torch.nn.functional.silu(x @ deq(g).T) * (x @ deq(u).T) @ deq(d).T

    torch.testing.assert_close(mlp(gate, up, down), mlp(full["gate_proj"], full["up_proj"], full["down_proj"]), rtol=1e-12, atol=1e-12)
    folded = DictSource({f"{n}.{k}": v for n, t in (("gate", gate), ("up", up), ("down", down)) for k, v in t.items()})
    inter = 256
    for tp in (2, 4):
        for rank in range(tp):
            plan = plan_mlp_shard(full["down_proj"]["g_idx"], tp_rank=rank, tp_size=tp, group_size=GROUP)
            assert plan.gather_index is None and plan.local_perm is None
            mine = torch.arange(rank * inter // tp, (rank + 1) * inter // tp)
            for name, lead in (("gate_proj", "gate"), ("up_proj", "up")):
                got = read_gptq(src, f"model.layers.0.mlp.{name}", out_index=plan.gate_up_rows)
                assert torch.equal(deq(got), deq(read_gptq(folded, lead, out_index=mine)))
            got = read_gptq(src, "model.layers.0.mlp.down_proj", in_index=plan.down_cols)
            lead = read_gptq(folded, "down", in_index=mine)
            assert torch.equal(deq(got), deq(lead))
            assert torch.equal(got["g_idx"], lead["g_idx"])  # a group-aligned shard keeps its own groups
            assert lead["scales"].shape[0] == inter // tp // GROUP


def test_plan_errors():
    g_idx = torch.randperm(256) // GROUP
    with pytest.raises(ValueError, match="cross tp shards"):
        plan_mlp_shard(g_idx, tp_rank=0, tp_size=2, strategy="tp_aware", hadamard_block=128)
    with pytest.raises(ValueError, match="does not divide the shard width"):
        plan_mlp_shard(g_idx, tp_rank=0, tp_size=4, strategy="naive", hadamard_block=128)
    with pytest.raises(ValueError, match="strategy must be one of"):
        plan_mlp_shard(g_idx, tp_rank=0, tp_size=2, strategy="fast")
    with pytest.raises(ValueError, match="not divisible by tp_size"):
        plan_mlp_shard(g_idx, tp_rank=0, tp_size=3)
    naive = plan_mlp_shard(g_idx, tp_rank=1, tp_size=2, strategy="naive")
    aware = plan_mlp_shard(g_idx, tp_rank=1, tp_size=2, strategy="tp_aware")
    assert naive.all_gathers and not aware.all_gathers
    assert torch.equal(naive.down_cols, aware.down_cols)  # same sorted down shard; only the producer differs
    with pytest.raises(RuntimeError, match="initialised default process group"):
        load("/nonexistent", tp_rank=0, tp_size=2)


# --------------------------------------------------------------------------- tp = 2, 4


def _check_equivalence(rank: int, world: int, paths: dict[str, str]) -> None:
    cases = [
        ("plain", "naive"), ("plain", "tp_aware"),
        ("r4_block_local", "naive"), ("r4_block_local", "tp_aware"),
        ("r4_global", "naive"),
    ]
    for name, strategy in cases:
        ref = torch.load(os.path.join(paths[name], "reference.pt"))
        model = load(paths[name], tp_rank=rank, tp_size=world, strategy=strategy)
        with torch.no_grad(), reference_numerics(model):
            logits = model(ref["ids"]).logits
            with OpCounter() as ops:
                y = model.model.layers[0].mlp(ref["x"])
        where = f"{name}/{strategy} tp={world} rank={rank}"
        assert rel_err(logits, ref["logits"]) < 1e-5, where
        assert rel_err(y, ref["mlp"]) < 1e-5, where
        assert ops["_c10d_functional::all_reduce"] == 1, (where, ops.counts)
        gathers = ops["_c10d_functional::all_gather_into_tensor"]
        assert gathers == (1 if strategy == "naive" else 0), (where, ops.counts)
        if name.startswith("r4"):
            # tp_aware + R4: the shard-local order is fused into the Hadamard's store.
            assert ops["hadacore::hadamard"] == 1, (where, ops.counts)
            assert ops.hadamard_perm == (1 if strategy == "tp_aware" else 0), (where, ops.counts)
        if strategy == "tp_aware":
            assert ops["aten::index_select"] == 0 and ops["aten::index"] == 0, (where, ops.counts)
    # A global act-order cannot stay shard-local behind R4: every rank refuses, clearly.
    with pytest.raises(ShardLoadError, match="cross tp shards"):
        load(paths["r4_global"], tp_rank=rank, tp_size=world, strategy="tp_aware")


def _check_compiled(rank: int, world: int, path: str) -> None:
    """Per-rank torch.compile: functional collectives stay in the graph; only naive gathers.

    Inductor keeps fp32 exactness; hadacore's backend rewrites the three quantized linears
    into its CPU W4A16 op, which computes in bf16 (the W4A16 contract), hence 1e-2.
    """
    import hadacore
    from torch._inductor.utils import run_and_get_code

    ref = torch.load(os.path.join(path, "reference.pt"))
    for backend, tol in (("inductor", 1e-5), ("hadacore", 1e-2)):
        for strategy in ("naive", "tp_aware"):
            mlp = load(path, tp_rank=rank, tp_size=world, strategy=strategy).model.layers[0].mlp
            torch._dynamo.reset()
            hadacore.reset_stats()
            compiled = torch.compile(mlp, backend=backend, fullgraph=True)
            with torch.no_grad():
                y, codes = run_and_get_code(compiled, ref["x"])
            code = "\n".join(codes)
            where = (backend, strategy)
            assert rel_err(y, ref["mlp"]) < tol, where
            assert "all_reduce" in code, where
            assert ("all_gather_into_tensor" in code) == (strategy == "naive"), (where, code[-3000:])
            if backend == "hadacore":
                assert hadacore.stats()["linear_rewritten"] == 3, (where, hadacore.stats())


def _check_converted(rank: int, world: int, path: str) -> None:
    """A checkpoint written by hadacore-convert (GPTQ act-order, R4, tp planned) == hadacore.load at tp=1."""
    ref = torch.load(os.path.join(path, "reference.pt"))
    for strategy in ("naive", "tp_aware"):
        model = load(path, tp_rank=rank, tp_size=world, strategy=strategy)
        with torch.no_grad(), reference_numerics(model):
            assert rel_err(model(ref["ids"]).logits, ref["logits"]) < 1e-5, strategy
            with OpCounter() as ops:
                model.model.layers[0].mlp(ref["x"])
        assert ops["_c10d_functional::all_gather_into_tensor"] == (1 if strategy == "naive" else 0), (strategy, ops.counts)


def _tp2_checks(rank: int, world: int, paths: dict[str, str], converted: str) -> None:
    _check_equivalence(rank, world, paths)
    _check_compiled(rank, world, paths["plain"])
    _check_converted(rank, world, converted)


def _tp4_checks(rank: int, world: int, paths: dict[str, str], kv2: str) -> None:
    _check_equivalence(rank, world, paths)
    with pytest.raises(ShardLoadError, match=r"rank\(s\) \[0, 1, 2, 3\].*num_key_value_heads \(2\)"):
        load(kv2, tp_rank=rank, tp_size=world)


def _converted_checkpoint(root) -> str:
    """hadacore-convert on a tiny random Llama: GPTQ act-order, R1/R2 + online R4, planned for tp=2."""
    import hadacore
    from transformers import LlamaForCausalLM

    path = os.path.join(str(root), "converted")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    hadacore.convert(model, path, bits=4, group_size=GROUP, method="gptq", act_order=True, rotate="full", tp=2,
                     calibration=calib, dtype=torch.float32)
    ref = hadacore.load(path)  # the converter's own single-process loader
    gen = torch.Generator().manual_seed(2)
    ids, x = torch.randint(0, 128, (2, 7), generator=gen), torch.randn(2, 5, 64, generator=gen)
    with torch.no_grad(), reference_numerics(ref):
        torch.save({"ids": ids, "logits": ref(ids).logits, "x": x}, os.path.join(path, "reference.pt"))
    return path


def test_tp2_matches_single_process_compiles_and_loads_converted(tmp_path):
    """tp=2: both strategies, with/without R4, act-order on: logits and MLP == one process,
    collective counts, per-rank Inductor graphs, and a checkpoint from hadacore-convert."""
    paths = _checkpoints(tmp_path, 2)
    converted = _converted_checkpoint(tmp_path)
    spawn(2, _tp2_checks, paths, converted, out_dir=tmp_path, timeout=400)


def test_tp4_matches_single_process(tmp_path):
    paths = _checkpoints(tmp_path, 4)
    kv2 = str(tmp_path / "kv2")
    write_tiny_checkpoint(kv2, seed=0, group_size=GROUP, config=tiny_llama_config(num_key_value_heads=2))
    spawn(4, _tp4_checks, paths, kv2, out_dir=tmp_path)


# --------------------------------------------------------------------------- failures


def _load_with_one_bad_rank_then_one_dead(rank: int, world: int, good: str, bad: str) -> None:
    # Both failures must surface before the process group's timeout (PG_TIMEOUT_S) would.
    # 1. rank 1's shard cannot be read: every rank raises, naming rank 1 and the cause.
    start = time.monotonic()
    with pytest.raises(ShardLoadError) as info:
        load(bad if rank == 1 else good, tp_rank=rank, tp_size=world)
    msg = str(info.value)
    assert "rank(s) [1]" in msg and "has neither model.safetensors" in msg, msg
    assert time.monotonic() - start < PG_TIMEOUT_S
    # 2. rank 1 dies outright: rank 0 raises (gloo sees the closed connection) instead of hanging.
    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    with pytest.raises(ShardLoadError, match="a rank crashed or the process group timed out"):
        load(good, tp_rank=rank, tp_size=world)
    assert time.monotonic() - start < PG_TIMEOUT_S


def test_failed_or_dead_rank_fails_the_group(tmp_path):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    write_tiny_checkpoint(good, seed=0, group_size=GROUP)
    shutil.copytree(good, bad)
    os.remove(os.path.join(bad, "model.safetensors"))
    exitcodes = spawn(2, _load_with_one_bad_rank_then_one_dead, good, bad, out_dir=tmp_path, timeout=150)
    assert exitcodes == [0, 3]


# --------------------------------------------------------------------------- example


def test_tp_generate_example_tiny():
    """examples/tp_generate.py --tiny under torchrun: sharded greedy tokens == one process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(root, "examples", "tp_generate.py"), "--tiny", "--max-new-tokens", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny: tp=2 greedy tokens match the single-process model" in proc.stdout, proc.stdout
