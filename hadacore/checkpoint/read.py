"""Reading checkpoint tensors: a whole tensor, or one rank's slice, from safetensors files or memory.

A rank reads only the rows/columns it keeps: contiguous index ranges become one
``safe_open(...).get_slice(name)[a:b, c:d]``; scattered indices (a permutation that was
not planned offline) become one read per contiguous run. Packed int4 words are unpacked
and repacked only where a selection does not fall on whole words, so every result is a
bit-exact rearrangement of the stored values.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from hadacore.checkpoint.config import read_json
from hadacore.checkpoint.write import INDEX_FILE
from hadacore.formats.compressed_tensors import TENSOR_SUFFIXES, compressed_tensors_to_gptq
from hadacore.formats.gptq import (
    check_g_idx_range, mirror_zero_point_zero, pack_gptq, pack_rows, unpack_gptq, unpack_rows, unpack_zeros_wordwise,
)

__all__ = ["TensorSource", "SafetensorsSource", "DictSource", "ConvertedSource", "take", "read_gptq"]


class TensorSource(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor: ...
    def has(self, name: str) -> bool: ...


class DictSource:
    """Tensors already in memory (tests, the converter, benchmarks)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[name][index].clone()

    def has(self, name: str) -> bool:
        return name in self.tensors


class SafetensorsSource:
    """A checkpoint directory: ``model.safetensors`` or an index ``model.safetensors.index.json``.

    Remembers which tensors were read (:attr:`unread` lists the others) and each file's
    header metadata (:attr:`metadata`)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        from safetensors import safe_open

        path = os.fspath(path)
        index_file = os.path.join(path, INDEX_FILE)
        if os.path.exists(index_file):
            weight_map = read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_file}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
            weight_map = None
        else:
            raise FileNotFoundError(f"{path} has neither model.safetensors nor {INDEX_FILE}")
        self._handles = {}
        self._where: dict[str, str] = {}
        self.metadata: dict[str, dict] = {}  # file -> its header metadata
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.exists(full):
                raise FileNotFoundError(f"missing weight shard {full}")
            try:
                handle = safe_open(full, framework="pt", device=device)
            except Exception as e:  # safetensors' own error types for a corrupt header
                raise ValueError(f"corrupt safetensors file {full}: {e}") from None
            self._handles[fname] = handle
            self.metadata[full] = handle.metadata() or {}
            for key in handle.keys():
                self._where[key] = fname
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise ValueError(f"{index_file}: tensors listed in the index but absent from the files: {missing[:5]}")
        self._read: set[str] = set()

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    @property
    def unread(self) -> list[str]:
        return sorted(set(self._where) - self._read)

    def _slice(self, name: str):
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in the checkpoint")
        self._read.add(name)
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self._slice(name)[index]

    def has(self, name: str) -> bool:
        return name in self._where


def _as_index(index: torch.Tensor | None, size: int) -> torch.Tensor:
    return torch.arange(size) if index is None else index.to(torch.int64).cpu()


def _runs(sorted_unique: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering consecutive values of a sorted, duplicate-free index."""
    if sorted_unique.numel() == 0:
        return []
    breaks = torch.nonzero(sorted_unique[1:] != sorted_unique[:-1] + 1).flatten() + 1
    starts = torch.cat([torch.tensor([0]), breaks]).tolist()
    stops = torch.cat([breaks, torch.tensor([sorted_unique.numel()])]).tolist()
    vals = sorted_unique.tolist()
    return [(vals[a], vals[b - 1] + 1) for a, b in zip(starts, stops)]


def take(src: TensorSource, name: str, indices: dict[int, torch.Tensor]) -> torch.Tensor:
    """``tensor.index_select`` along each dim in ``indices`` (1-D or 2-D), reading only those entries."""
    shape = src.shape(name)
    if len(shape) not in (1, 2):
        raise ValueError(f"take supports 1-D and 2-D tensors; {name} has shape {shape}")
    per_dim = []
    for d, size in enumerate(shape):
        idx = _as_index(indices.get(d), size)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise IndexError(f"index out of range for dim {d} of {name} {shape}")
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        per_dim.append((_runs(uniq), inverse, bool(uniq.numel() == idx.numel() and torch.equal(uniq, idx))))
    if len(shape) == 1:
        runs, inverse, ordered = per_dim[0]
        out = torch.cat([src.read(name, (slice(a, b),)) for a, b in runs]) if runs else torch.empty(0)
        return out if ordered else out[inverse]
    (runs0, inv0, ord0), (runs1, inv1, ord1) = per_dim
    rows = [torch.cat([src.read(name, (slice(a, b), slice(c, d))) for c, d in runs1], dim=1) for a, b in runs0]
    out = torch.cat(rows, dim=0)
    if not ord0:
        out = out[inv0]
    if not ord1:
        out = out[:, inv1]
    return out.contiguous()


def _select_packed_rows(
    src: TensorSource, name: str, index: torch.Tensor, cols: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Rows ``index`` of the *unpacked* [R*per, C] view of a tensor packed along dim 0, repacked."""
    per = 32 // bits
    words = index // per
    if index.numel() % per == 0:
        aligned = index.reshape(-1, per)
        if bool((aligned == aligned[:, :1] + torch.arange(per)).all()) and bool((aligned[:, 0] % per == 0).all()):
            return take(src, name, {0: aligned[:, 0] // per, **({1: cols} if cols is not None else {})})
    uniq = torch.unique(words, sorted=True)
    packed = take(src, name, {0: uniq, **({1: cols} if cols is not None else {})})
    vals = unpack_rows(packed, bits)
    pos = torch.searchsorted(uniq, words) * per + index % per
    return pack_rows(vals[pos], bits)


def read_gptq(
    src: TensorSource,
    prefix: str,
    *,
    in_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    bits: int = 4,
) -> dict[str, torch.Tensor]:
    """GPTQ tensors of ``W[out_index][:, in_index]`` (and ``bias[out_index]`` if stored).

    Keeps exactly the groups the selected columns reference (re-based, in group order),
    so a group-aligned K-shard of a sorted weight keeps its own groups and an act-order
    shard keeps every group it touches (scales replicated, as vLLM does).
    """
    per = 32 // bits
    k = src.shape(f"{prefix}.qweight")[0] * per
    n = src.shape(f"{prefix}.qweight")[1]
    in_index = _as_index(in_index, k)
    out_index = _as_index(out_index, n)
    if in_index.numel() % per or out_index.numel() % per:
        raise ValueError(f"{prefix}: a shard needs multiples of {per} rows and columns")
    stored_groups = src.shape(f"{prefix}.scales")[0]
    if src.has(f"{prefix}.g_idx"):
        g_idx = take(src, f"{prefix}.g_idx", {0: in_index}).to(torch.int64)
        check_g_idx_range(g_idx, stored_groups, prefix)
    else:
        g_idx = in_index // (k // stored_groups)
    groups = torch.unique(g_idx, sorted=True)
    out = {
        "qweight": _select_packed_rows(src, f"{prefix}.qweight", in_index, out_index, bits),
        "scales": take(src, f"{prefix}.scales", {0: groups, 1: out_index}),
        # qzeros is packed along N: select on its transpose
        "qzeros": _select_packed_rows(_Transposed(src), f"{prefix}.qzeros", out_index, groups, bits).t().contiguous(),
        "g_idx": torch.searchsorted(groups, g_idx).to(torch.int32),
    }
    if src.has(f"{prefix}.bias"):
        out["bias"] = take(src, f"{prefix}.bias", {0: out_index})
    return out


class _Transposed:
    """View a 2-D source tensor transposed (reads stay slices of the stored layout)."""

    def __init__(self, src: TensorSource):
        self.src = src

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self.src.shape(name)))

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.src.read(name, tuple(reversed(index))).t()

    def has(self, name: str) -> bool:
        return self.src.has(name)


#: Layouts :class:`ConvertedSource` reads: compressed-tensors ``pack-quantized``; GPTQ with v2
#: zeros (the zero itself); GPTQModel's v1 (zeros read word-wise, :func:`unpack_zeros_wordwise`).
CONVERTED_LAYOUTS = ("compressed-tensors", "gptq_v2", "gptqmodel_v1")


class ConvertedSource:
    """A checkpoint whose quantized linears are in another layout (:data:`CONVERTED_LAYOUTS`),
    read as GPTQ v1 tensors: each layer's tensors are converted whole on first use (exact:
    the same numbers; a zero point of 0, which v1 cannot store, by
    :func:`~hadacore.formats.gptq.mirror_zero_point_zero`), then sliced like any other source.
    Other tensors pass through; online transform matrices (the R4 Sylvester matrix of a
    compressed-tensors checkpoint, rebuilt by the runtime) count as read."""

    def __init__(self, src: SafetensorsSource, *, layout: str, group_size: int, symmetric: bool):
        if layout not in CONVERTED_LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; known: {CONVERTED_LAYOUTS}")
        self.src, self.layout, self.group_size, self.symmetric = src, layout, group_size, symmetric
        self.metadata = src.metadata
        self._layers: dict[str, DictSource] = {}
        if layout == "compressed-tensors":
            self._prefixes = {n.rsplit(".", 1)[0] for n in src.names if n.endswith(".weight_packed")}
            for n in src.names:
                if n.endswith(("_input.weight", "_output.weight")):
                    src._read.add(n)
        else:
            self._prefixes = {n.rsplit(".", 1)[0] for n in src.names if n.endswith(".qzeros")}

    def _split(self, name: str) -> tuple[str, str] | None:
        prefix, _, leaf = name.rpartition(".")
        if prefix in self._prefixes and leaf in ("qweight", "qzeros", "scales", "g_idx"):
            return prefix, leaf
        return None

    def _layer(self, prefix: str) -> DictSource:
        if prefix not in self._layers:
            if self.layout == "compressed-tensors":
                raw = {s: take(self.src, f"{prefix}.{s}", {}) for s in TENSOR_SUFFIXES if self.src.has(f"{prefix}.{s}")}
                t = compressed_tensors_to_gptq(raw, self.group_size, symmetric=self.symmetric, name=prefix)
                t.pop("g_idx")  # contiguous groups: read_gptq derives them
            else:
                raw = {s: take(self.src, f"{prefix}.{s}", {}) for s in ("qweight", "qzeros", "scales", "g_idx")
                       if self.src.has(f"{prefix}.{s}")}
                q, scales, zeros, g_idx = unpack_gptq(raw, 4, checkpoint_format="gptq_v2")
                if self.layout == "gptqmodel_v1":
                    zeros = unpack_zeros_wordwise(raw["qzeros"])
                t = pack_gptq(*mirror_zero_point_zero(q, scales, zeros, g_idx), g_idx, 4)
                if "g_idx" not in raw:
                    t.pop("g_idx")
            self._layers[prefix] = DictSource(t)
        return self._layers[prefix]

    def shape(self, name: str) -> tuple[int, ...]:
        split = self._split(name)
        return self._layer(split[0]).shape(split[1]) if split else self.src.shape(name)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        split = self._split(name)
        return self._layer(split[0]).read(split[1], index) if split else self.src.read(name, index)

    def has(self, name: str) -> bool:
        split = self._split(name)
        return self._layer(split[0]).has(split[1]) if split else self.src.has(name)

    @property
    def unread(self) -> list[str]:
        return self.src.unread
