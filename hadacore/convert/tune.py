"""End-to-end scale tuning: after GPTQ, train each group's scale against the fp model.

GPTQ fixes every weight's integer code layer by layer; what it cannot see is how the
layers' errors add up through the network. With the codes (and zero points) frozen, the
group scales are the continuous part of the checkpoint: this stage trains them so the
quantized model's next-token distribution matches the fp model's on calibration text (KL),
the "E2E-QP" stage of EfficientQAT (Chen et al., 2024) on a CPU budget. The checkpoint keeps
its format (only ``scales`` change) and its runtime cost.

Each scale is trained multiplicatively, ``s = s0 * exp(t)`` with ``t`` starting at 0, so
the learning rate is a relative step the same for every group whatever its magnitude, and
a scale never changes sign. The training forward replaces each :class:`QuantLinear` by a
float linear whose weight is ``codes * s[g_idx]`` (codes = ``q - z``, exact in fp32), the
online Hadamard kept in front where the layer has one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hadacore.formats.gptq import unpack_gptq
from hadacore.ops import block_hadamard_transform
from hadacore.quant.linear import QuantLinear

__all__ = ["TuneOptions", "tune_scales"]

log = logging.getLogger(__name__)

HELD_OUT = 8  # calibration sequences kept out of training, to report an honest before/after


@dataclass(frozen=True)
class TuneOptions:
    """How the scales are tuned (the converter's ``--tune-*`` options); ``steps=0``: off."""

    steps: int = 0
    lr: float = 1e-3  # a relative step on each scale (Adam on log-scale)
    # Calibration sequences the steps draw from. 256 x 256 tokens: on SmolLM2 a pool of 64
    # overfits (train KL 0.02 against held-out 0.08 after 200 steps; see BENCHMARKS.md).
    samples: int = 256
    seqlen: int = 256
    batch: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.samples < 1 or self.seqlen < 2 or self.batch < 1:
            raise ValueError("scale tuning: steps >= 0, samples >= 1, seqlen >= 2, batch >= 1")
        if not self.lr > 0:
            raise ValueError(f"scale tuning: lr must be positive, got {self.lr}")


class _TunedLinear(nn.Module):
    """A QuantLinear's training form: ``[H ->] x @ (codes * s0 exp(t))[g_idx].T + bias``."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        intweight, scales, zeros, g_idx = unpack_gptq(
            {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales, "g_idx": layer.g_idx},
            bits=layer.bits)
        g = g_idx.long()
        self.layer, self.g_idx = layer, g
        self.codes = (intweight.float() - zeros.float().T[:, g])  # [N, K]: exact small integers
        self.s0 = scales.float()  # [G, N]
        self.log_scale = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = None if layer.bias is None else layer.bias.float()

    def weight(self) -> torch.Tensor:
        s = self.s0 * self.log_scale.exp()
        return self.codes * s.T[:, self.g_idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.online_hadamard:
            x = block_hadamard_transform(x, layer.hadamard_block or layer.in_features)
        return F.linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def store(self) -> None:
        """Write the tuned scales back into the QuantLinear (in its scales' dtype)."""
        s = self.layer.scales
        s.copy_((self.s0 * self.log_scale.exp()).to(s.dtype))


def _swap(model: nn.Module) -> list[tuple[nn.Module, str, _TunedLinear]]:
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                tuned = _TunedLinear(child)
                setattr(parent, name, tuned)
                swapped.append((parent, name, tuned))
    return swapped


def tune_scales(model: nn.Module, teacher: nn.Module, calibration_ids: torch.Tensor, opts: TuneOptions,
                *, progress: bool | None = None) -> dict:
    """Tune the scales of every QuantLinear of ``model`` (fp32 activations; modified in place)
    to match ``teacher``'s (the fp model's) next-token distribution on ``calibration_ids``
    ``[n, >= opts.seqlen]``. The first ``HELD_OUT`` sequences (a quarter of a smaller pool) are
    held out: KL per token before and after; returns a record of the run."""
    from tqdm.auto import tqdm

    if calibration_ids.dim() != 2 or calibration_ids.shape[1] < opts.seqlen:
        raise ValueError(f"scale tuning needs calibration ids [samples, >= {opts.seqlen}], got "
                         f"{tuple(calibration_ids.shape)}")
    t0 = time.perf_counter()
    pool = calibration_ids[:opts.samples, :opts.seqlen]
    n_held = min(HELD_OUT, pool.shape[0] // 4)
    held_out, train = (pool[:n_held], pool[n_held:]) if n_held else (pool[:1], pool)
    gen = torch.Generator().manual_seed(opts.seed)
    was_training = model.training
    model.eval()
    teacher.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    swapped = _swap(model)
    if not swapped:
        raise ValueError("scale tuning: the model has no QuantLinear layers")
    params = [t.log_scale for _, _, t in swapped]
    optim = torch.optim.Adam(params, lr=opts.lr)

    def kl(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        out = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="sum")
        return out / (ids.shape[0] * (ids.shape[1] - 1))

    def held_out_kl() -> float:  # in batches: a 49k vocabulary makes the logits the big tensor
        return sum(float(kl(b)) * b.shape[0] for b in held_out.split(opts.batch)) / held_out.shape[0]

    try:
        with torch.no_grad():
            before = held_out_kl()
        losses = []
        bar = tqdm(range(opts.steps), desc="tuning scales", unit="step",
                   disable=None if progress is None else not progress)
        for step in bar:
            for group in optim.param_groups:  # cosine decay to 0
                group["lr"] = opts.lr * 0.5 * (1 + math.cos(math.pi * step / opts.steps))
            idx = torch.randint(0, train.shape[0], (opts.batch,), generator=gen)
            loss = kl(train[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        with torch.no_grad():
            after = held_out_kl()
        for _, _, tuned in swapped:
            tuned.store()
    finally:
        for parent, name, tuned in swapped:
            setattr(parent, name, tuned.layer)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    moved = max(float(t.log_scale.detach().abs().max()) for _, _, t in swapped)
    seconds = time.perf_counter() - t0
    log.info("tuned %d layers' scales in %d steps (%.0f s): held-out KL %.4f -> %.4f (largest change %.1f%%)",
             len(swapped), opts.steps, seconds, before, after, 100 * (math.exp(moved) - 1))
    return {"options": asdict(opts), "held_out_kl": {"before": before, "after": after},
            "train_kl": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
            "largest_relative_change": math.exp(moved) - 1, "seconds": round(seconds, 1)}
