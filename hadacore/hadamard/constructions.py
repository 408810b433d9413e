"""Classical Hadamard constructions: Paley I, Paley II and Kronecker products.

Only integer arithmetic, so every matrix has the same bits on every call and platform.
:mod:`hadacore.hadamard` decides which order uses which construction; this module only
builds. Every construction is written down exactly (element order of GF(q), the
irreducible polynomial, the block layout), because a different but equally valid
choice would give a different matrix, and weights rotated with one would not run with
the other.

GF(q), q = p**k
    Element ``i`` (0 <= i < q) is the polynomial ``sum_t d_t x**t`` where ``d_t`` are the
    base-p digits of ``i`` (``d_0`` least significant), taken modulo the monic
    irreducible polynomial ``x**k + c_{k-1} x**(k-1) + ... + c_0`` whose code
    ``sum_t c_t p**t`` is smallest (:func:`irreducible_poly`). For k = 1 that is
    GF(p) = Z/p with its usual order. The quadratic character is ``chi(0) = 0``,
    ``chi(a) = 1`` for a nonzero square and ``-1`` otherwise, and the Jacobsthal matrix is
    ``Q[a, b] = chi(a - b)`` (subtraction digit-wise modulo p).

Paley I (q = 3 mod 4), order q + 1::

    H = [[ 1, 1^T  ],
         [-1, Q + I]]

Paley II (q = 1 mod 4), order 2(q + 1): with the symmetric conference matrix
``S = [[0, 1^T], [1, Q]]`` (order q + 1),
``H = S kron [[1, -1], [-1, -1]] + I kron [[1, 1], [1, -1]]``.

Kronecker: ``H_a kron H_b`` (torch.kron), factors chosen by the caller.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["prime_power", "irreducible_poly", "quadratic_character", "paley1", "paley2"]


def _is_prime(v: int) -> bool:
    if v < 2:
        return False
    d = 2
    while d * d <= v:
        if v % d == 0:
            return False
        d += 1
    return True


def prime_power(q: int) -> Optional[tuple[int, int]]:
    """``(p, k)`` with ``q == p**k`` for a prime p and k >= 1, else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # smallest prime factor
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _digits(v: int, p: int, k: int) -> list[int]:
    return [(v // p**t) % p for t in range(k)]


def _poly_rem(a: list[int], b: list[int], p: int) -> list[int]:
    """Remainder of ``a`` by monic ``b`` over GF(p) (coefficient lists, lowest degree first)."""
    a = a[:]
    db = len(b) - 1
    for t in range(len(a) - 1, db - 1, -1):
        c = a[t] % p
        if c:
            for s in range(db + 1):
                a[t - db + s] = (a[t - db + s] - c * b[s]) % p
    return [c % p for c in a[:db]]


@functools.lru_cache(maxsize=None)
def irreducible_poly(p: int, k: int) -> tuple[int, ...]:
    """``(c_0, ..., c_{k-1})`` of the monic irreducible ``x**k + sum_t c_t x**t`` over GF(p)
    with the smallest code ``sum_t c_t p**t`` (k = 1: ``(0,)``, the polynomial x)."""
    if k == 1:
        return (0,)
    for code in range(p**k):
        f = _digits(code, p, k) + [1]
        # Reducible iff it has a monic factor of degree 1 .. k // 2.
        if not any(
            not any(_poly_rem(f, _digits(g, p, d) + [1], p))
            for d in range(1, k // 2 + 1)
            for g in range(p**d)
        ):
            return tuple(f[:k])
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _field_digits(p: int, k: int) -> torch.Tensor:
    """``[q, k]`` int64: the base-p digits of every element index."""
    idx = torch.arange(p**k, dtype=torch.int64)
    return torch.stack([(idx // p**t) % p for t in range(k)], dim=1)


@functools.lru_cache(maxsize=None)
def quadratic_character(q: int) -> torch.Tensor:
    """``chi`` over GF(q) as an int64 ``[q]`` tensor indexed by element (values 0, 1, -1)."""
    pk = prime_power(q)
    if pk is None or pk[0] == 2:
        raise ValueError(f"the quadratic character needs an odd prime power, got {q}")
    p, k = pk
    d = _field_digits(p, k)
    # Square every element: polynomial product, then reduce x**t (t >= k) with x**k = -sum c_s x**s.
    sq = torch.zeros(q, 2 * k - 1, dtype=torch.int64)
    for i in range(k):
        for j in range(k):
            sq[:, i + j] += d[:, i] * d[:, j]
    f = irreducible_poly(p, k)
    for t in range(2 * k - 2, k - 1, -1):
        c = sq[:, t] % p
        for s in range(k):
            sq[:, t - k + s] -= c * f[s]
    weights = torch.tensor([p**t for t in range(k)], dtype=torch.int64)
    squares = ((sq[:, :k] % p) * weights).sum(1)
    chi = -torch.ones(q, dtype=torch.int64)
    chi[squares[1:]] = 1  # squares of the nonzero elements
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[a, b] = chi(a - b)`` over GF(q), int64 ``[q, q]``."""
    p, k = prime_power(q)  # type: ignore[misc]
    d = _field_digits(p, k)
    weights = torch.tensor([p**t for t in range(k)], dtype=torch.int64)
    diff = ((d[:, None, :] - d[None, :, :]) % p * weights).sum(-1)
    return quadratic_character(q)[diff]


def paley1(q: int) -> torch.Tensor:
    """Paley I Hadamard matrix of order ``q + 1`` for a prime power ``q = 3 (mod 4)`` (int8)."""
    if q % 4 != 3 or prime_power(q) is None:
        raise ValueError(f"Paley I needs a prime power q = 3 (mod 4), got {q}")
    h = torch.empty(q + 1, q + 1, dtype=torch.int64)
    h[0, :] = 1
    h[1:, 0] = -1
    h[1:, 1:] = _jacobsthal(q) + torch.eye(q, dtype=torch.int64)
    return h.to(torch.int8)


def paley2(q: int) -> torch.Tensor:
    """Paley II Hadamard matrix of order ``2 (q + 1)`` for a prime power ``q = 1 (mod 4)`` (int8)."""
    if q % 4 != 1 or prime_power(q) is None:
        raise ValueError(f"Paley II needs a prime power q = 1 (mod 4), got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    h = torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)
    return h.to(torch.int8)
