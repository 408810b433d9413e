"""GPTQ (Frantar et al., 2022): second-order weight quantization into GPTQ v1 tensors.

For a linear ``y = x W^T`` with ``W [N, K]`` and the Hessian of the layer-wise loss
``H = 2/n * X^T X`` (``X`` the layer's calibration inputs, ``[n, K]``), GPTQ quantizes
W's input columns one at a time in some order and, after each, spreads the column's
rounding error over the not-yet-quantized columns through the Cholesky factor of
``H^-1`` (the optimal-brain-surgeon update), so the Hessian-weighted error
``tr((W - Q) H (W - Q)^T)`` is much smaller than round-to-nearest's.

This implementation follows the reference (``gptq.py`` of IST-DASLab/gptq and AutoGPTQ)
step by step: dead inputs zeroed, dampening ``percdamp * mean(diag H)``, optional
act-order (columns in decreasing ``diag H``), lazy batch updates in blocks of 128
columns, and group parameters computed lazily at each group boundary in quantization
order (``static_groups=False``). One deliberate difference: when a group starts inside
a block, the reference computes its scale from columns that have not yet received the
current block's pending updates; here the group's scale is computed from the
up-to-date columns, so the blocked algorithm equals the column-by-column one exactly
(they coincide with the reference whenever groups start on block boundaries, e.g.
group 128 with block 128).

Two options of the later literature:

- ``static_groups`` (AutoGPTQ): every group's grid is computed up front from the weight
  as given, before any update; columns keep their natural groups whatever the
  quantization order, so ``g_idx`` stays ``k // group_size`` even with act-order.
- GPTAQ (GPTQv2, Li et al., ICML 2025, "asymmetric calibration"): the layer's inputs in
  the partly quantized model, ``X~``, differ from the fp model's ``X``; GPTAQ targets the
  fp output ``W X`` instead of ``W X~``. With ``dXXT = 2/n (X - X~)^T X~`` and
  ``H^-1 = U^T U`` it adds ``w_j P[j, j:]`` to each column's update, where
  ``P = alpha * triu(dXXT U^T, 1) U`` (the reference's ``alpha = 0.25``). The reference's
  lazy block update multiplies P by the block's *quantized* columns while its in-block
  update uses the unquantized ones; here both use the value each column had when it was
  quantized, so the blocked algorithm equals the column-by-column one here too.

The quantization grid is the RTN one (:func:`hadacore.quant.rtn.quant_grid`, optionally
with its clip search); scales
are rounded to the storage dtype before use so the error feedback sees the values a
loader will dequantize.
"""

from __future__ import annotations

import torch

from hadacore.formats.gptq import pack_gptq
from hadacore.quant.rtn import quant_grid

__all__ = ["HessianAccumulator", "gptq_quantize", "act_order_perm_from_hessian", "hessian_error"]


class HessianAccumulator:
    """Running ``H = 2/n * sum_i x_i x_i^T`` over calibration rows, as the reference keeps it.

    ``add(x)`` takes any ``[..., K]`` batch; every row along the leading dims is a sample.
    With ``asymmetric=True``, ``add(x, x_fp)`` also takes the same rows as the fp model
    computes them and keeps GPTAQ's ``dXXT = 2/n * sum_i (x_fp_i - x_i) x_i^T``.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, *, asymmetric: bool = False):
        self.in_features = in_features
        self.nsamples = 0
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.dXXT = torch.zeros_like(self.H) if asymmetric else None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got {x.shape[-1]}")
        return x.detach().reshape(-1, self.in_features).to(torch.float32)

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        if (x_fp is None) != (self.dXXT is None):
            raise ValueError("pass x_fp exactly when the accumulator is asymmetric")
        x = self._rows(x)
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        c = (2.0 / total) ** 0.5
        self.H *= self.nsamples / total
        x = x * c
        self.H.addmm_(x.t(), x)
        if self.dXXT is not None:
            x_fp = self._rows(x_fp)
            if x_fp.shape != x.shape:
                raise ValueError(f"x_fp must match x: {tuple(x_fp.shape)} vs {tuple(x.shape)}")
            self.dXXT *= self.nsamples / total
            self.dXXT.addmm_((x_fp * c - x).t(), x)
        self.nsamples = total


def act_order_perm_from_hessian(H: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Act-order: input columns in decreasing ``diag(H)``, ties by index.

    ``blocks > 1`` orders within each of ``blocks`` equal, contiguous column ranges
    (block-local act-order), keeping the blocks in place: then a row-parallel shard or
    an attention head owns exactly the columns (and, when its size is a multiple of
    the group size, the groups) it owned before.
    """
    k = H.shape[0]
    if blocks < 1 or k % blocks:
        raise ValueError(f"cannot split {k} input columns into {blocks} equal blocks")
    size = k // blocks
    d = torch.diagonal(H).reshape(blocks, size)
    local = torch.argsort(-d, dim=1, stable=True)
    return (local + torch.arange(blocks, device=H.device).unsqueeze(1) * size).reshape(k)


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = True,
    perm: torch.Tensor | None = None,
    percdamp: float = 0.01,
    blocksize: int = 128,
    scale_dtype: torch.dtype = torch.float16,
    compute_dtype: torch.dtype = torch.float32,
    clip: bool = False,
    static_groups: bool = False,
    dXXT: torch.Tensor | None = None,
    alpha: float = 0.25,
) -> dict[str, torch.Tensor]:
    """Quantize ``weight [N, K]`` with GPTQ given the Hessian ``H [K, K]`` of its inputs.

    ``act_order``: quantize columns in decreasing ``diag(H)``; ``perm`` overrides the
    order explicitly (e.g. :func:`act_order_perm_from_hessian` with ``blocks``).
    Groups are consecutive ``group_size`` columns *in quantization order*, so with an
    order ``g_idx[perm[j]] = j // group_size``; ``group_size=-1`` is per-channel (one
    group per output row, from the unmodified weight, as the reference).
    ``compute_dtype`` (fp32, or fp64 for reference checks) is the precision of W, H and
    the updates. ``clip``: each group's grid comes from the clip search of
    :func:`hadacore.quant.rtn.quant_grid` (the reference's ``mse=True``), run on the
    group's up-to-date columns at its boundary. ``static_groups``: group grids from the
    weight before any update, natural ``g_idx``. ``dXXT`` (``[K, K]``, from
    :class:`HessianAccumulator` with ``asymmetric=True``): GPTAQ's asymmetric update,
    scaled by ``alpha``. Returns GPTQ v1 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``); dequantizing them gives exactly
    the matrix GPTQ's error feedback was computed against.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    if H.shape != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}], got {tuple(H.shape)}")
    gs = k if group_size == -1 else group_size
    if gs <= 0 or k % gs:
        raise ValueError(f"group_size {group_size} does not divide the input size {k}")
    if not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must lie in [0, 1), got {percdamp}")
    if dXXT is not None and dXXT.shape != (k, k):
        raise ValueError(f"dXXT must be [K, K] = [{k}, {k}], got {tuple(dXXT.shape)}")
    maxq = (1 << bits) - 1

    W = weight.detach().to(compute_dtype).clone()
    H = H.detach().to(device=W.device, dtype=compute_dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    def grid(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = quant_grid(cols, bits, sym, clip=clip, scale_dtype=scale_dtype)
        return scale.to(scale_dtype).to(compute_dtype), zero.to(compute_dtype)  # the stored scale drives the rounding

    if group_size == -1:
        scale, zero = grid(W)  # per-channel: parameters of the weight as given
    if perm is None:
        perm = act_order_perm_from_hessian(H) if act_order else torch.arange(k, device=W.device)
    perm = perm.to(device=W.device, dtype=torch.long)
    if perm.shape != (k,) or not torch.equal(torch.sort(perm).values, torch.arange(k, device=W.device)):
        raise ValueError(f"perm must be a permutation of range({k})")
    groups = k // gs
    static = None
    if static_groups and group_size != -1:
        # Every group's grid from its own columns of the weight as given, before any update
        # (AutoGPTQ's static_groups); a column keeps its natural group whatever the order.
        static = [grid(W[:, g * gs : (g + 1) * gs]) for g in range(groups)]
    W = W[:, perm]
    H = H[perm][:, perm]

    damp = percdamp * torch.mean(torch.diagonal(H))
    H.diagonal().add_(damp)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise RuntimeError(
            f"GPTQ: the damped Hessian is not positive definite ({e}); raise percdamp "
            f"(now {percdamp}) or use more calibration samples"
        ) from None
    P = None
    if dXXT is not None:
        # GPTAQ: the extra update that pulls the layer toward the fp model's output.
        D = dXXT.detach().to(device=W.device, dtype=compute_dtype).clone()
        D[:, dead] = 0.0
        D = D[perm][:, perm]
        P = alpha * torch.triu(D @ Hinv.T, diagonal=1) @ Hinv
        if group_size != -1 and blocksize % gs:
            blocksize = gs * -(-blocksize // gs)  # whole groups per block: the lookahead below omits P

    Q = torch.zeros_like(W, dtype=torch.int32)
    scales = torch.zeros(groups, n, dtype=compute_dtype, device=W.device)
    zeros = torch.zeros(groups, n, dtype=torch.int32, device=W.device)
    if group_size == -1:
        scales[0], zeros[0] = scale, zero.to(torch.int32)

    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Wq1 = torch.zeros_like(W1) if P is not None else None  # each column's value when quantized
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = int(perm[col]) // gs
                scale, zero = static[g]
                scales[g], zeros[g] = scale, zero.to(torch.int32)
            elif group_size != -1 and col % gs == 0:
                # Up-to-date columns of the new group: in-block ones from W1; the rest
                # still owe this block's pending (lazy) update.
                end = col + gs
                cols = W1[:, i : min(end, i2) - i1]
                if end > i2:
                    rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
                    cols = torch.cat([cols, rest], dim=1)
                scale, zero = grid(cols)
                scales[col // gs], zeros[col // gs] = scale, zero.to(torch.int32)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            Q[:, col] = q.to(torch.int32)
            err = (w - scale * (q - zero)) / d
            update = err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            if P is not None:
                Wq1[:, i] = w
                update -= w.unsqueeze(1) * P[col, col:i2].unsqueeze(0)
            W1[:, i:] -= update
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += Wq1 @ P[i1:i2, i2:]

    invperm = torch.argsort(perm)
    if group_size == -1:
        g_idx = torch.zeros(k, dtype=torch.long, device=W.device)
    elif static is not None:
        g_idx = torch.arange(k, device=W.device) // gs
    else:
        g_idx = (torch.arange(k, device=W.device) // gs)[invperm]
    return pack_gptq(Q[:, invperm], scales.to(scale_dtype), zeros, g_idx.to(torch.int32), bits)


def hessian_error(weight: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer-wise output error GPTQ minimizes (up to 1/n)."""
    d = (weight.double() - approx.double())
    return float(torch.einsum("nk,kl,nl->", d, H.double(), d))
