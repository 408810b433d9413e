"""Hadamard matrices: the one place that decides what ``H_n`` is.

``n = m * 2**k`` with ``m`` in :data:`HADAMARD_BASES` (or ``m = 1``) and ``k <= 15``.
The transform of a row ``x`` is QuaRot's ``matmul_hadU`` (unnormalised): view ``x`` as
an ``(m, 2**k)`` matrix ``X`` (m-index slow), apply Sylvester's ``H_{2**k}`` to every
row, then mix the rows with ``H_m``::

    Y = H_m @ X @ H_{2**k}        i.e.  y = x @ (H_m kron H_{2**k})^T

Where ``H_m`` comes from (:func:`base_construction`):

* QuaRot's / SpinQuant's tables (N. J. A. Sloane's library) for their orders
  12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172, kept bit-packed in
  ``_data/hadamard_bases.txt``, so weights rotated by those tools run unchanged;
* otherwise, in this order of preference, Paley I (order q + 1, q a prime power
  = 3 mod 4), Paley II (order 2(q + 1), q a prime power = 1 mod 4) or a Kronecker
  product ``H_a kron H_b`` (smallest a); :mod:`hadacore.hadamard.constructions` writes
  each one down exactly (GF(q) element order, irreducible polynomial, block layout).

Which m for a given n (:func:`hadamard_factors`):

1. ``n = 2**k``: ``m = 1``.
2. Otherwise, if a QuaRot base fits, the largest one that does (QuaRot's ``get_hadK``
   order; only 20 and 40 can both fit: 40 wins). This keeps every size supported
   before the constructions were added on exactly the matrix it had.
3. Otherwise the *smallest* constructible m (with ``n / m`` a power of two <= 2**15).
   Every size has at most one candidate per power of two, ``m0 * 2**j``; the smallest is
   the cheapest on every path (the base mix is a dense ``m x m`` matmul on the CPU,
   ``m`` flops per element, and Triton pads m to ``M_PAD``, fusing it only up to 64),
   and it needs no tie-breaking, so the choice is deterministic. The power of two it
   leaves goes to the (cheap, O(log n)) Sylvester part; a Kronecker product with
   ``H_2`` is exactly what that part already applies.

Base orders stop at :data:`MAX_BASE_ORDER` (1024): the mix costs ``m`` multiply-adds
per element on the CPU and an ``M_PAD x M_PAD`` fp32 matrix on the GPU, so a larger
base would cost about as much as the matmul the rotation sits next to. 1024 covers the
largest base a popular model needs (924, Qwen2-72B's 29568 = 924 x 32).

``tools/hadamard_bases_provenance.md`` records where every order comes from and how
the stored tables were checked against the published source.
"""

from __future__ import annotations

import bisect
import functools
from importlib import resources
from typing import Optional

import torch

from hadacore.hadamard import constructions as _hc

__all__ = [
    "HADAMARD_BASES",
    "QUAROT_BASES",
    "MAX_POW2_LOG2",
    "MAX_BASE_ORDER",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_base",
    "base_construction",
    "sylvester",
    "is_supported_size",
    "nearest_supported_sizes",
    "check_hadamard_size",
]

#: Orders m with a stored QuaRot / SpinQuant table (``_data/hadamard_bases.txt``).
QUAROT_BASES: tuple[int, ...] = (12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172)

#: Largest power-of-two factor, ``2**15`` (HadaCore's and fast-hadamard-transform's limit).
MAX_POW2_LOG2 = 15

#: Largest base order m (see the module docstring for why).
MAX_BASE_ORDER = 1024

# Where two QuaRot bases fit one n (only 20 and 40 can: 40 * 2**k == 20 * 2**(k+1)) the
# larger wins, as QuaRot's get_hadK does.
_QUAROT_LARGEST_FIRST = tuple(sorted(QUAROT_BASES, reverse=True))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None, typed=True)  # typed: True must not share 1's entry
def base_construction(m: int) -> Optional[tuple]:
    """How ``H_m`` is built, or None when no construction here gives order m:
    ``("sylvester",)``, ``("quarot",)``, ``("paley1", q)``, ``("paley2", q)`` or
    ``("kronecker", a, b)`` (``H_a kron H_b``, the smallest such ``a >= 2``).
    Checked in this order; the first that applies is the construction."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        return None
    if _is_pow2(m):
        return ("sylvester",)
    if m in QUAROT_BASES:
        return ("quarot",)
    if m % 4:
        return None  # a Hadamard matrix of order > 2 has order 0 mod 4
    q = m - 1
    if q % 4 == 3 and _hc.prime_power(q):
        return ("paley1", q)
    q = m // 2 - 1
    if q % 4 == 1 and _hc.prime_power(q):
        return ("paley2", q)
    a = 2
    while a * a <= m:
        if m % a == 0 and base_construction(a) and base_construction(m // a):
            return ("kronecker", a, m // a)
        a += 1
    return None


def _enumerate_bases() -> tuple[int, ...]:
    """QuaRot's orders, and every constructible ``m <= MAX_BASE_ORDER`` that is the
    smallest constructible order with its odd part (``m / 2`` is not one)."""
    bases = set(QUAROT_BASES)
    for m in range(12, MAX_BASE_ORDER + 1, 4):
        if not _is_pow2(m) and base_construction(m) and not base_construction(m // 2):
            bases.add(m)
    return tuple(sorted(bases))


#: The orders m that multiply a power of two: ``n = m * 2**k`` is supported for these
#: (with ``k <= 15``). QuaRot's 12 ... 172 and, for every other odd part, the smallest
#: order the constructions give, up to :data:`MAX_BASE_ORDER` (93 orders).
HADAMARD_BASES: tuple[int, ...] = _enumerate_bases()

def _odd_part(n: int) -> int:
    return n >> ((n & -n).bit_length() - 1)


def _bases_by_odd_part() -> dict[int, tuple[int, ...]]:
    """odd part -> the bases with it, preferred first. Only odd part 5 has two (QuaRot's
    20 and 40; 40 first, as in get_hadK); every other odd part has one base."""
    by_odd: dict[int, list[int]] = {}
    for m in HADAMARD_BASES:
        by_odd.setdefault(_odd_part(m), []).append(m)
    out = {}
    for odd, ms in by_odd.items():
        if len(ms) > 1 and not set(ms) <= set(QUAROT_BASES):
            raise AssertionError(f"bases {ms} share an odd part")  # _enumerate_bases keeps one
        out[odd] = tuple(sorted(ms, reverse=True))
    return out


_BASES_BY_ODD = _bases_by_odd_part()


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n == m * p``, ``p = 2**k`` (k <= 15) and ``m`` a base or 1.

    The rule for choosing m is in the module docstring. Raises ``ValueError`` naming
    the nearest supported sizes when ``n`` has no supported factorisation.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"Hadamard size must be an int, got {type(n).__name__}")
    if n >= 1:
        if _is_pow2(n) and n <= 1 << MAX_POW2_LOG2:
            return 1, n
        for m in _BASES_BY_ODD.get(_odd_part(n), ()):
            if n % m == 0 and n // m <= 1 << MAX_POW2_LOG2:
                return m, n // m
    lo, hi = nearest_supported_sizes(n)
    near = " or ".join(str(s) for s in (lo, hi) if s is not None)
    raise ValueError(
        f"no Hadamard transform of size {n}: supported sizes are 2**k (k <= {MAX_POW2_LOG2}) "
        f"and m * 2**k for m in hadacore.HADAMARD_BASES (QuaRot's {QUAROT_BASES[0]}..{QUAROT_BASES[-1]} "
        f"and the Paley/Kronecker orders up to {MAX_BASE_ORDER}); nearest supported: {near}"
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
    """QuaRot's / SpinQuant's tables, decoded from ``_data/hadamard_bases.txt``."""
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
    missing = set(QUAROT_BASES) - set(bases)
    if missing:
        raise RuntimeError(f"hadamard_bases.txt lacks bases {sorted(missing)}")
    return bases


@functools.lru_cache(maxsize=64)
def _constructed(m: int) -> torch.Tensor:
    """``H_m`` (int8) for an order without a stored table, as :func:`base_construction` says."""
    how = base_construction(m)
    if how is None or how[0] == "quarot":
        raise ValueError(f"no Hadamard construction of order {m}")
    kind = how[0]
    if kind == "sylvester":
        return _sylvester_int8(m)
    if kind == "paley1":
        return _hc.paley1(how[1])
    if kind == "paley2":
        return _hc.paley2(how[1])
    return torch.kron(_order_matrix(how[1]), _order_matrix(how[2]))


def _order_matrix(m: int) -> torch.Tensor:
    """The canonical ``H_m`` (int8, shared: do not modify) of any constructible order m.
    Looked up through ``_load_bases`` for QuaRot's orders (tests substitute it)."""
    stored = _load_bases()
    if m in stored:
        return stored[m]
    return _constructed(m)


def hadamard_base(m: int) -> torch.Tensor:
    """``H_m`` for a base order m (entries +-1, int8, a fresh copy): QuaRot's / SpinQuant's
    table for their orders, else the construction :func:`base_construction` names."""
    if m not in HADAMARD_BASES:
        raise ValueError(
            f"no Hadamard base of order {m}; bases: hadacore.HADAMARD_BASES "
            f"({len(HADAMARD_BASES)} orders from {HADAMARD_BASES[0]} to {HADAMARD_BASES[-1]})"
        )
    return _order_matrix(m).clone()


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
    hm = _order_matrix(m).to(torch.float64)
    return torch.kron(hm, hp).T.contiguous().to(dtype)
