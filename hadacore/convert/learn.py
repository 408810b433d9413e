"""Learned rotations: R1 and every layer's R2 optimised with the quantizer in the loop.

SpinQuant (Liu et al., 2024) on a laptop-sized CPU. Starting from hadacore's seeded random
Hadamard R1 and per-head Hadamard R2, the matrices are trained as orthogonal matrices so
that the model, with every quantized linear's weight rotated and fake-quantized by the
target quantizer (bits, group size, symmetry; min-max RTN with a straight-through
estimator), matches the fp model on calibration text. R4 stays the fixed online Hadamard,
in the graph. The learned matrices are then folded exactly like the Hadamard ones, so the
checkpoint has the format and the run-time cost of ``rotate="full"``.

How the rotations enter the training forward (they never touch the embedding or lm_head
weights, which are not quantized): the residual stream is rotated after the embedding
(``h @ R1``) and rotated back before the lm_head (``h @ R1^T``); every quantized linear
gets its effective weight each step, readers ``fq(W R1)``, writers ``fq(R1^T W)``, v_proj
``fq(blockdiag(R2^T) W R1)``, o_proj ``fq(R1^T W blockdiag(R2))``.

Optimiser: Adam in the Lie algebra with a Cayley retraction ("Cayley-Adam"). Each step
maps the Euclidean gradient ``G`` of a matrix ``R`` to the skew-symmetric Riemannian
direction ``A = G R^T - R G^T``, keeps Adam's moments on ``A`` (elementwise moments of skew
matrices stay skew, so the preconditioned direction ``D`` is skew too), and moves along
the Cayley curve ``R <- (I + lr/2 D)^-1 (I - lr/2 D) R``, which is exactly orthogonal for
skew ``D``. Why this over SpinQuant's Cayley SGD: its step size rests on clipping the
global gradient norm to 1 and a 1/||W||_1 cap (hidden in its trainer), whereas Adam's
per-entry normalisation gives R1 (whose gradient sums over every layer) and the small R2s
comparable steps without tuning; and the exact Cayley solve in fp64 (a 576 x 576 solve per
step, ~10 ms) keeps ``R^T R = I`` to ~1e-14 with no re-projection.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hadacore.convert.modules import OnlineHadamardLinear
from hadacore.convert.rotate import random_signs
from hadacore.hadamard import hadamard_matrix
from hadacore.quant.rtn import quant_grid

__all__ = ["LearnOptions", "LearnedRotations", "ROTATIONS_FILE", "learn_rotations", "hadamard_start", "CayleyAdam",
           "fake_quantize", "orthogonality_error"]

log = logging.getLogger(__name__)

_READERS = ("q_proj", "k_proj", "gate_proj", "up_proj")  # plus v_proj, which R2 also rotates
LOSSES = ("kl", "ce")


@dataclass(frozen=True)
class LearnOptions:
    """How R1/R2 are learned (the converter's ``--rotation-*`` options)."""

    steps: int = 60
    lr: float = 2e-3
    samples: int = 64  # calibration sequences the steps cycle through
    seqlen: int = 256
    batch: int = 2  # sequences per step
    loss: str = "kl"  # "kl": to the fp model's next-token distribution; "ce": next-token cross-entropy
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.samples < 1 or self.seqlen < 2 or self.batch < 1:
            raise ValueError("rotation learning: steps >= 0, samples >= 1, seqlen >= 2, batch >= 1")
        if not self.lr > 0:
            raise ValueError(f"rotation learning: lr must be positive, got {self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"rotation learning: loss must be one of {LOSSES}, got {self.loss!r}")


#: Where a converted checkpoint keeps its learned rotations. A subdirectory: vLLM's loader
#: reads every top-level ``*.safetensors`` of a checkpoint without an index as weights.
ROTATIONS_FILE = "rotations/learned.safetensors"


@dataclass
class LearnedRotations:
    """R1 ``[D, D]`` and R2 ``[layers, head_dim, head_dim]`` (fp64, orthogonal), and how they
    were made (``record``: JSON-able, kept in the checkpoint's provenance)."""

    r1: torch.Tensor
    r2: torch.Tensor
    record: dict

    def check(self, hidden: int, head_dim: int, layers: int) -> None:
        """Raise ``ValueError`` unless the matrices fit the model and are orthogonal."""
        want = {"r1": (hidden, hidden), "r2": (layers, head_dim, head_dim)}
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"learned {name} has shape {tuple(t.shape)}; this model needs {shape}")
            err = orthogonality_error(t)
            if not err <= 1e-6:
                raise ValueError(f"learned {name} is not orthogonal (max |R^T R - I| = {err:.1e})")

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/ROTATIONS_FILE`` (fp64, the record in its metadata)."""
        from safetensors.torch import save_file

        path = Path(directory) / ROTATIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"r1": self.r1.contiguous(), "r2": self.r2.contiguous()}, str(path),
                  metadata={"hadacore_rotations": json.dumps(self.record, sort_keys=True)})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "LearnedRotations":
        """The rotations a ``rotate="learned"`` conversion wrote to ``directory`` (its output)."""
        from safetensors import safe_open

        path = Path(directory) / ROTATIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --rotation-from takes the output directory of a "
                                    f"--rotate learned conversion")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if set(f.keys()) != {"r1", "r2"}:
                raise ValueError(f"{path} holds {sorted(f.keys())}, expected r1 and r2")
            r1, r2 = f.get_tensor("r1"), f.get_tensor("r2")
        if r1.dtype != torch.float64 or r2.dtype != torch.float64:
            raise ValueError(f"{path}: learned rotations are stored in float64, got {r1.dtype}/{r2.dtype}")
        record = json.loads(meta.get("hadacore_rotations", "{}"))
        return cls(r1, r2, record)


def orthogonality_error(r: torch.Tensor) -> float:
    """``max |R^T R - I|`` in fp64 (batched ``[..., n, n]`` too)."""
    r = r.double()
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    return float((r.mT @ r - eye).abs().max())


def hadamard_start(hidden: int, head_dim: int, layers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hadacore's seeded random Hadamard R1 and the per-head Hadamard R2 of ``rotate="full"``, as matrices."""
    r1 = random_signs(hidden, seed)[:, None] * hadamard_matrix(hidden) / math.sqrt(hidden)
    r2 = (hadamard_matrix(head_dim) / math.sqrt(head_dim)).expand(layers, head_dim, head_dim).clone()
    return r1, r2


class _STERound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Min-max RTN of ``w [N, K]`` on the converter's grid (:func:`~hadacore.quant.rtn.quant_grid`),
    with a straight-through gradient.

    The grid (scale, zero) comes from the detached weight, as in SpinQuant's trainer: the
    gradient reaches the rotations through the rounded values only.
    """
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    groups = w.reshape(-1, gs)  # row-major: each row of w is k // gs consecutive groups
    scale, zero = quant_grid(groups.detach(), bits, sym)
    scale, zero = scale.to(w.dtype)[:, None], zero.to(w.dtype)[:, None]
    q = torch.clamp(_STERound.apply(groups / scale) + zero, 0, (1 << bits) - 1)
    return ((q - zero) * scale).reshape(n, k)


class CayleyAdam:
    """Adam in the Lie algebra of the orthogonal group with a Cayley retraction (module docstring).

    ``params``: fp64 masters, each ``[..., n, n]`` orthogonal (batched ones are stepped per
    matrix, with one moment per entry). ``step(grads)`` updates them in place.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float | None = None) -> None:
        self.t += 1
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        for r, g, m, v in zip(self.params, grads, self.m, self.v):
            g = g.to(torch.float64)
            a = g @ r.mT - r @ g.mT  # skew: the Riemannian gradient, left-trivialised
            m.mul_(b1).add_(a, alpha=1 - b1)
            v.mul_(b2).addcmul_(a, a, value=1 - b2)
            d = (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps)
            d = 0.5 * (d - d.mT)  # exactly skew (it is, up to rounding)
            eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)
            r.copy_(torch.linalg.solve(eye + 0.5 * lr * d, (eye - 0.5 * lr * d) @ r))


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    at, mlp = layer.self_attn, layer.mlp
    down = mlp.down_proj.linear if isinstance(mlp.down_proj, OnlineHadamardLinear) else mlp.down_proj
    return {"q_proj": at.q_proj, "k_proj": at.k_proj, "v_proj": at.v_proj, "o_proj": at.o_proj,
            "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": down}


class _RotatedQuantizedModel:
    """The training forward: effective weights from (R1, R2) each step (module docstring)."""

    def __init__(self, model: nn.Module, bits: int, group_size: int, sym: bool, head_dim: int):
        self.model, self.bits, self.group_size, self.sym, self.hd = model, bits, group_size, sym, head_dim
        self.names = {}  # parameter name -> (layer index, linear name)
        for name, module in model.named_modules():
            for i, layer in enumerate(model.model.layers):
                for lin_name, lin in _linears(layer).items():
                    if module is lin:
                        self.names[f"{name}.weight"] = (i, lin_name)
        self.base = {n: p.detach() for n, p in model.named_parameters() if n in self.names}

    def weights(self, r1: torch.Tensor, r2: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        hd = self.hd
        for name, (i, lin) in self.names.items():
            w = self.base[name]
            if lin in _READERS:
                w = w @ r1
            elif lin == "v_proj":  # per KV head: R2^T W_h, then the R1 reader rotation
                rows, d = w.shape
                w = (r2[i].mT @ w.reshape(rows // hd, hd, d)).reshape(rows, d) @ r1
            elif lin == "o_proj":  # per head: W[:, h] R2, then the R1 writer rotation
                d, cols = w.shape
                w = r1.mT @ (w.reshape(d, cols // hd, hd) @ r2[i]).reshape(d, cols)
            else:  # down_proj: a writer
                w = r1.mT @ w
            out[name] = fake_quantize(w, self.bits, self.group_size, self.sym)
        return out

    def logits(self, ids: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        m = self.model
        h = m.model.embed_tokens(ids) @ r1  # the residual stream, rotated
        handle = m.lm_head.register_forward_pre_hook(lambda _mod, args: (args[0] @ r1.mT,))
        try:
            out = functional_call(m, self.weights(r1, r2), args=(), kwargs={"inputs_embeds": h, "use_cache": False})
        finally:
            handle.remove()
        return out.logits


def learn_rotations(model: nn.Module, calibration_ids: torch.Tensor, *, bits: int, group_size: int, sym: bool,
                    opts: LearnOptions, start: tuple[torch.Tensor, torch.Tensor], head_dim: int,
                    progress: bool | None = None) -> LearnedRotations:
    """Optimise R1/R2 from ``start`` (fp64 matrices, e.g. :func:`hadamard_start`) for ``model``
    (fp32, norms folded, R4 applied, no R1/R2 yet; not modified) quantized to ``bits``,
    ``group_size``, ``sym``. ``calibration_ids [n, >= opts.seqlen]``: the first ``opts.batch``
    sequences are held out (the loss before/after is measured on them), the steps draw batches
    from the rest. Returns the learned matrices and a record of the run."""
    from tqdm.auto import tqdm

    if calibration_ids.dim() != 2 or calibration_ids.shape[1] < opts.seqlen:
        raise ValueError(f"rotation learning needs calibration ids [samples, >= {opts.seqlen}], got "
                         f"{tuple(calibration_ids.shape)}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(opts.seed)
    pool = calibration_ids[:opts.samples, :opts.seqlen]
    held_out = pool[:opts.batch]
    train = pool[opts.batch:] if pool.shape[0] > opts.batch else pool
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    student = _RotatedQuantizedModel(model, bits, group_size, sym, head_dim)
    masters = [start[0].to(torch.float64).clone(), start[1].to(torch.float64).clone()]
    optim = CayleyAdam(masters, lr=opts.lr)

    def loss_of(ids: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        logits = student.logits(ids, r1, r2)[:, :-1].float()
        if opts.loss == "ce":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        with torch.no_grad():
            teacher = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="sum")
        return kl / (logits.shape[0] * logits.shape[1])  # per token

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(loss_of(held_out, masters[0].float(), masters[1].float()))

    try:
        before = held_out_loss()
        losses = []
        bar = tqdm(range(opts.steps), desc="learning R1/R2", unit="step",
                   disable=None if progress is None else not progress)
        for step in bar:
            idx = torch.randint(0, train.shape[0], (opts.batch,), generator=gen)
            r1 = masters[0].float().requires_grad_(True)
            r2 = masters[1].float().requires_grad_(True)
            loss = loss_of(train[idx], r1, r2)
            loss.backward()
            lr = opts.lr * 0.5 * (1 + math.cos(math.pi * step / opts.steps))  # cosine decay to 0
            optim.step([r1.grad, r2.grad], lr=lr)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        after = held_out_loss()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    errors = [orthogonality_error(m) for m in masters]
    seconds = time.perf_counter() - t0
    log.info("learned R1/R2 in %d steps (%.0f s): held-out %s loss %.4f -> %.4f, orthogonality error %.1e",
             opts.steps, seconds, opts.loss, before, after, max(errors))
    record = {
        "options": asdict(opts),
        "quantizer": {"bits": bits, "group_size": group_size, "sym": sym},
        "held_out_loss": {"before": before, "after": after},
        "train_loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        "orthogonality_error": max(errors),
        "seconds": round(seconds, 1),
    }
    return LearnedRotations(masters[0], masters[1], record)
