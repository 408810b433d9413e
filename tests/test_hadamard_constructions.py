"""Paley I / II, GF(q) and Kronecker constructions, and which order uses which.

Every base must be a Hadamard matrix (H H^T = m I exactly, entries +-1), QuaRot's orders
must keep their stored tables bit for bit, and every constructed base must keep its bits
(the pinned digests: weights rotated with one matrix do not run with another).
"""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest
import torch

import hadacore.hadamard as hh
from hadacore.hadamard import constructions as hc
from hadacore.hadamard import (
    HADAMARD_BASES, MAX_BASE_ORDER, MAX_POW2_LOG2, QUAROT_BASES, base_construction, hadamard_base,
    hadamard_factors, hadamard_matrix, sylvester,
)

# sha256 of hadamard_base(m).numpy().tobytes() (int8, row-major), recorded from main at
# 8b98ae0, before the constructions existed.
QUAROT_SHA256 = {
    12: "67507aecbe2abee5607ebc930edc6e70f5046bd415503c71e71ac7dc6ddc9e50",
    20: "f54960fecf1ccf70671b403318d07fd1babfee079c6ebd627812276c3f5d91ed",
    28: "a6cb994c78f9acd4ce172a154b97e3982594cc0124ce7af90cb88810b9509a8c",
    36: "d674d8240e6b622bff2b54fd5f16f903ef5ccbde6e5fba55a73e6b8616ce936d",
    40: "b36c95bcae918f982ba87b8a98828c6ee5232919436228600c0714b67fe82036",
    44: "401df984756a7d75781d63d43b70c06778e0880a88c1b555b0bf8e36a9dbdeb8",
    52: "9ee082772819b1055d61f2d6bc89d814caaeb2fdc5f4d8bb54317842856be195",
    60: "091e76fba0aef58371335b478d7b3f320fcc77b1185eff7d2ed962cd5bc5a048",
    108: "690a34c6c9ed2f0edaf44022cfe6147d7e788cc555505ed5293db3c255582370",
    140: "b9ff01506ffe4db50af93f4c21e0c5af43159fbf5ccf5f8366f1c0efeee84417",
    156: "99a1b852ce559ffd6291cfc39889b4963b068b27116191ce7fc24efcacc538fd",
    172: "378ef12c7cc31f3ea558e1c66b9552a83128f8f732b0bc094b864c8e120d84bd",
}
# sha256 over hadamard_matrix(m * p).to(int8) for m in QUAROT_BASES, p in (1, 2, 8), in that
# order, recorded from main at 8b98ae0.
QUAROT_MATRICES_SHA256 = "fcbb6665048f53ce63de9bb6c7afbc5b273d79c3442d2b17fe30a7d0df82624f"
# sha256 over hadamard_base(m) (int8 bytes) for every constructed base, in HADAMARD_BASES
# order: recorded when the constructions were written. A change here changes matrices
# that weights may have been rotated with.
CONSTRUCTED_SHA256 = "d5fee5629eed29a02ea1ed3d5ffab8424bd1187813d0c94b26d35b0d5af9f0af"

# Prime powers (k >= 2) within reach of MAX_BASE_ORDER, each with its Paley order.
PRIME_POWERS = (9, 25, 27, 49, 81, 121, 125, 169, 243, 289, 343, 361)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _is_hadamard(h: torch.Tensor) -> bool:
    """Entries +-1 and H H^T = m I exactly (fp32 is exact: every sum is an integer <= 2**24)."""
    m = h.shape[0]
    hf = h.to(torch.float32)
    return bool(((hf == 1) | (hf == -1)).all()) and torch.equal(hf @ hf.T, m * torch.eye(m))


# --------------------------------------------------------------------------- GF(q)


@pytest.mark.parametrize("q", (3, 5, 7, 11, 13, 67, 73, 461, *PRIME_POWERS))
def test_quadratic_character(q: int) -> None:
    p, k = hc.prime_power(q)
    chi = hc.quadratic_character(q)
    assert chi[0] == 0 and int((chi == 1).sum()) == (q - 1) // 2 and int((chi == -1).sum()) == (q - 1) // 2
    # chi(-1) = (-1)^((q-1)/2); -1 is the constant polynomial p - 1, element index p - 1
    minus_one = p - 1
    assert chi[minus_one] == (1 if q % 4 == 1 else -1)
    # Jacobsthal: Q Q^T = q I - J and every row sums to 0 (holds only if GF(q) is a field).
    jq = hc._jacobsthal(q).to(torch.float64)
    assert torch.equal(jq @ jq.T, q * torch.eye(q, dtype=torch.float64) - 1)
    assert torch.equal(jq.sum(1), torch.zeros(q, dtype=torch.float64))
    assert torch.equal(jq.T, jq if q % 4 == 1 else -jq)


def test_irreducible_polynomials_are_the_smallest() -> None:
    assert hc.irreducible_poly(3, 2) == (1, 0)  # x^2 + 1
    assert hc.irreducible_poly(5, 2) == (2, 0)  # x^2 + 2
    assert hc.irreducible_poly(3, 3) == (1, 2, 0)  # x^3 + 2x + 1
    assert hc.irreducible_poly(7, 1) == (0,)
    for p, k in ((3, 4), (3, 5), (5, 3), (7, 3), (11, 2), (13, 2), (17, 2), (19, 2), (7, 2)):
        f = list(hc.irreducible_poly(p, k)) + [1]
        # no monic factor of degree <= k/2, and every smaller code has one
        for code in range(sum(c * p**t for t, c in enumerate(f[:k]))):
            g = [(code // p**t) % p for t in range(k)] + [1]
            assert any(
                not any(hc._poly_rem(g, [(h // p**t) % p for t in range(d)] + [1], p))
                for d in range(1, k // 2 + 1) for h in range(p**d)
            ), (p, k, code)


def test_base_construction_rejects_non_ints() -> None:
    assert base_construction(True) is None and base_construction(1) == ("sylvester",)
    assert base_construction(12.0) is None and base_construction(0) is None and base_construction(-12) is None


def test_prime_power() -> None:
    assert hc.prime_power(243) == (3, 5) and hc.prime_power(361) == (19, 2) and hc.prime_power(461) == (461, 1)
    assert hc.prime_power(1) is None and hc.prime_power(45) is None and hc.prime_power(91) is None


# --------------------------------------------------------------------------- Paley, Kronecker


@pytest.mark.parametrize("q", (3, 7, 11, 19, 23, 27, 43, 243, 343))
def test_paley1(q: int) -> None:
    h = hc.paley1(q)
    assert h.dtype == torch.int8 and h.shape == (q + 1, q + 1) and _is_hadamard(h)


@pytest.mark.parametrize("q", (5, 9, 13, 25, 37, 49, 81, 121, 125, 169, 289, 361))
def test_paley2(q: int) -> None:
    h = hc.paley2(q)
    assert h.dtype == torch.int8 and h.shape == (2 * q + 2, 2 * q + 2) and _is_hadamard(h)


def test_paley_rejects_wrong_q() -> None:
    for bad in (5, 15, 21):
        with pytest.raises(ValueError, match="Paley I"):
            hc.paley1(bad)
    for bad in (3, 45, 7):
        with pytest.raises(ValueError, match="Paley II"):
            hc.paley2(bad)


@pytest.mark.parametrize("m", (144, 1040, 1904, 24, 48))
def test_any_constructible_order(m: int) -> None:
    """Orders beyond the bases (Kronecker products included) build and are Hadamard."""
    assert base_construction(m) is not None
    assert _is_hadamard(hh._order_matrix(m))


def test_kronecker_beyond_paley() -> None:
    assert base_construction(1904) == ("kronecker", 28, 68)  # 17 * 112: no Paley order
    h = hh._order_matrix(1904)
    assert torch.equal(h, torch.kron(hadamard_base(28), hadamard_base(68)))


# --------------------------------------------------------------------------- the bases


@pytest.mark.parametrize("m", HADAMARD_BASES)
def test_every_base_is_hadamard(m: int) -> None:
    h = hadamard_base(m)
    assert h.dtype == torch.int8 and h.shape == (m, m) and _is_hadamard(h)


def test_bases_are_what_the_rule_says() -> None:
    assert set(QUAROT_BASES) <= set(HADAMARD_BASES)
    assert max(HADAMARD_BASES) <= MAX_BASE_ORDER
    for m in range(4, MAX_BASE_ORDER + 1, 4):
        how = base_construction(m)
        minimal = how is not None and how[0] != "sylvester" and base_construction(m // 2) is None
        assert (m in HADAMARD_BASES) == (minimal or m in QUAROT_BASES), m
    for m in set(HADAMARD_BASES) - set(QUAROT_BASES):
        assert base_construction(m)[0] in ("paley1", "paley2"), m  # no Kronecker base <= 1024


def test_quarot_bases_are_the_stored_tables_bit_for_bit() -> None:
    """Weights rotated by QuaRot / SpinQuant still run: same bits as before the constructions,
    and the same as an independent decode of the data file."""
    text = resources.files("hadacore").joinpath("_data/hadamard_bases.txt").read_text()
    decoded = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            m, *rows = line.split()
            bits = [bin(int(r, 16))[2:].zfill(len(r) * 4)[: int(m)] for r in rows]
            decoded[int(m)] = torch.tensor([[1 - 2 * int(b) for b in row] for row in bits], dtype=torch.int8)
    for m in QUAROT_BASES:
        assert base_construction(m) == ("quarot",)
        assert torch.equal(hadamard_base(m), decoded[m]), m
        assert _sha(hadamard_base(m)) == QUAROT_SHA256[m], m
    h = hashlib.sha256()
    for m in QUAROT_BASES:
        for p in (1, 2, 8):
            mat = hadamard_matrix(m * p)
            mm, pp = hadamard_factors(m * p)  # (40, p / 2) for m = 20, p >= 2
            assert torch.equal(mat, torch.kron(decoded[mm].double(), sylvester(pp)).T)
            h.update(mat.to(torch.int8).numpy().tobytes())
    assert h.hexdigest() == QUAROT_MATRICES_SHA256


def test_paley_matrices_of_quarot_orders_are_not_used() -> None:
    """Paley gives 12, 20, 28, ... too, but a different matrix: the table must win."""
    assert not torch.equal(hc.paley1(11), hadamard_base(12))
    assert not torch.equal(hc.paley2(9), hadamard_base(20))


def test_factor_choice_unchanged_for_every_size_supported_before() -> None:
    """Every n supported before the constructions keeps its (m, p): QuaRot's get_hadK order."""
    old_largest_first = (172, 156, 140, 108, 60, 52, 44, 40, 36, 28, 20, 12)
    for k in range(MAX_POW2_LOG2 + 1):
        assert hadamard_factors(1 << k) == (1, 1 << k)
        for base in old_largest_first:
            n = base << k
            old = next(m for m in old_largest_first if n % m == 0 and (n // m) & (n // m - 1) == 0
                       and n // m <= 1 << MAX_POW2_LOG2)
            assert hadamard_factors(n) == (old, n // old), n


def test_new_sizes_take_the_smallest_base() -> None:
    assert hadamard_factors(4864) == (76, 64)  # Qwen2.5-0.5B intermediate
    assert hadamard_factors(18944) == (148, 128)  # Qwen2.5-7B
    assert hadamard_factors(29568) == (924, 32)  # Qwen2-72B
    assert hadamard_factors(368) == (368, 1)  # 23 * 16: 92 and 184 have no construction here
    assert base_construction(76) == ("paley2", 37) and base_construction(924) == ("paley2", 461)
    assert base_construction(68) == ("paley1", 67) and base_construction(244) == ("paley1", 243)
    assert base_construction(100) == ("paley2", 49) and base_construction(724) == ("paley2", 361)
    for m in HADAMARD_BASES:
        if m not in QUAROT_BASES:
            for p in (1, 2, 1 << MAX_POW2_LOG2):
                assert hadamard_factors(m * p) == (m, p)


def test_constructions_are_deterministic() -> None:
    """Same bits on every call (cache cleared) and against the recorded digest."""
    new = [m for m in HADAMARD_BASES if m not in QUAROT_BASES]
    first = {m: hadamard_base(m) for m in new}
    hh._constructed.cache_clear()
    hc.quadratic_character.cache_clear()
    h = hashlib.sha256()
    for m in new:
        again = hadamard_base(m)
        assert torch.equal(again, first[m]), m
        h.update(again.numpy().tobytes())
    assert h.hexdigest() == CONSTRUCTED_SHA256


def test_hadamard_base_returns_a_copy() -> None:
    a = hadamard_base(76)
    a.fill_(0)
    assert _is_hadamard(hadamard_base(76))


def test_hadamard_base_rejects_other_orders() -> None:
    for m in (1, 24, 92, 1040, 16):
        with pytest.raises(ValueError, match="no Hadamard base of order"):
            hadamard_base(m)
