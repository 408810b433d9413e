"""Hadamard matrices: the one place that decides what ``H_n`` is.

``n = m * 2**k`` with ``m`` in :data:`HADAMARD_BASES` (or ``m = 1``). The transform of
a row ``x`` is QuaRot's ``matmul_hadU`` (unnormalised): view ``x`` as an ``(m, 2**k)``
matrix ``X`` (m-index slow), apply Sylvester's ``H_{2**k}`` to every row, then mix the
rows with ``H_m``::

    Y = H_m @ X @ H_{2**k}        i.e.  y = x @ (H_m kron H_{2**k})^T

The base matrices are QuaRot's / SpinQuant's tables (N. J. A. Sloane's library), kept
bit-packed in ``_data/hadamard_bases.txt``; ``tools/hadamard_bases_provenance.md``
records how they were checked against the published source.
"""

from __future__ import annotations

import bisect
import functools
from importlib import resources

import torch

__all__ = [
    "HADAMARD_BASES",
    "MAX_POW2_LOG2",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_base",
    "sylvester",
    "is_supported_size",
    "nearest_supported_sizes",
    "check_hadamard_size",
]

#: Odd-factor orders ``m`` supported on top of powers of two.
HADAMARD_BASES: tuple[int, ...] = (12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172)

#: Largest power-of-two factor, ``2**15`` (HadaCore's and fast-hadamard-transform's limit).
MAX_POW2_LOG2 = 15

# Where two bases fit one n (only 20 and 40 can: 40 * 2**k == 20 * 2**(k+1)) the larger
# wins, as QuaRot's get_hadK does.
_BASES_LARGEST_FIRST = tuple(sorted(HADAMARD_BASES, reverse=True))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n == m * p``, ``p = 2**k`` and ``m`` a base or 1.

    Raises ``ValueError`` naming the nearest supported sizes when ``n`` has no
    supported factorisation.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"Hadamard size must be an int, got {type(n).__name__}")
    if n >= 1:
        if _is_pow2(n) and n <= 1 << MAX_POW2_LOG2:
            return 1, n
        for m in _BASES_LARGEST_FIRST:
            if n % m == 0 and _is_pow2(n // m) and n // m <= 1 << MAX_POW2_LOG2:
                return m, n // m
    lo, hi = nearest_supported_sizes(n)
    near = " or ".join(str(s) for s in (lo, hi) if s is not None)
    raise ValueError(
        f"no Hadamard transform of size {n}: supported sizes are 2**k (k <= {MAX_POW2_LOG2}) "
        f"and m * 2**k for m in {HADAMARD_BASES}; nearest supported: {near}"
    )


@functools.lru_cache(maxsize=None)
def _supported_sizes() -> tuple[int, ...]:
    sizes = {1 << k for k in range(MAX_POW2_LOG2 + 1)}
    sizes |= {m << k for m in HADAMARD_BASES for k in range(MAX_POW2_LOG2 + 1)}
    return tuple(sorted(sizes))


def is_supported_size(n: int) -> bool:
    try:
        hadamard_factors(n)
    except (ValueError, TypeError):
        return False
    return True


def nearest_supported_sizes(n: int) -> tuple[int | None, int | None]:
    """The largest supported size below ``n`` and the smallest above it (either may be None)."""
    sizes = _supported_sizes()
    i = bisect.bisect_left(sizes, n)
    below = sizes[i - 1] if i > 0 else None
    j = bisect.bisect_right(sizes, n)
    above = sizes[j] if j < len(sizes) else None
    return below, above


def check_hadamard_size(n: int, *, what: str = "Hadamard size") -> tuple[int, int]:
    """Like :func:`hadamard_factors`, with ``what`` (e.g. a layer name) in the error."""
    try:
        return hadamard_factors(n)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


@functools.lru_cache(maxsize=None)
def _load_bases() -> dict[int, torch.Tensor]:
    text = resources.files("hadacore").joinpath("_data/hadamard_bases.txt").read_text()
    bases: dict[int, torch.Tensor] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m_str, *rows = line.split()
        m = int(m_str)
        if len(rows) != m:
            raise RuntimeError(f"hadamard_bases.txt: base {m} has {len(rows)} rows")
        ndig = (m + 3) // 4
        if any(len(row) != ndig for row in rows):
            raise RuntimeError(f"hadamard_bases.txt: base {m} needs rows of {ndig} hex digits")
        pad = 4 * ndig - m  # rows are right-padded with zero bits to whole hex digits
        bits = [[(int(row, 16) >> (pad + m - 1 - j)) & 1 for j in range(m)] for row in rows]
        bases[m] = 1 - 2 * torch.tensor(bits, dtype=torch.int8)  # bit 1 means -1
    missing = set(HADAMARD_BASES) - set(bases)
    if missing:
        raise RuntimeError(f"hadamard_bases.txt lacks bases {sorted(missing)}")
    return bases


def hadamard_base(m: int) -> torch.Tensor:
    """QuaRot's / SpinQuant's ``H_m`` (entries +-1, int8, a fresh copy)."""
    if m not in HADAMARD_BASES:
        raise ValueError(f"no Hadamard base of order {m}; bases: {HADAMARD_BASES}")
    return _load_bases()[m].clone()


@functools.lru_cache(maxsize=32)
def _sylvester_int8(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def sylvester(p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's ``H_p`` (symmetric, entries +-1) for a power of two ``p``."""
    if not _is_pow2(p) or p > 1 << MAX_POW2_LOG2:
        raise ValueError(f"Sylvester Hadamard needs a power of two <= 2**{MAX_POW2_LOG2}, got {p}")
    return _sylvester_int8(p).to(dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The exact matrix of the transform: ``hadamard_transform(x, s) == s * x @ hadamard_matrix(n)``.

    Unnormalised (entries +-1); ``hadamard_matrix(n) @ hadamard_matrix(n).T == n * I``.
    """
    m, p = hadamard_factors(n)
    hp = sylvester(p, torch.float64)
    if m == 1:
        return hp.to(dtype)
    hm = _load_bases()[m].to(torch.float64)
    return torch.kron(hm, hp).T.contiguous().to(dtype)
