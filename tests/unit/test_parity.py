"""Erasure codes (checkpoint/parity.py): every loss pattern the code promises to survive gives the
data back bit-exact; GF(2^8) arithmetic checked against a bitwise reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from longtrain.checkpoint.parity import (
    MUL,
    ErasureCode,
    cauchy_matrix,
    gf_inv,
    gf_invert,
    gf_mul,
    join,
    rs_decode,
    rs_encode,
    split,
    xor_decode,
    xor_encode,
)
from longtrain.config_checks import ConfigError


def carryless_mul(a: int, b: int) -> int:
    """GF(2^8) product the slow way: shift-and-add, reduced by 0x11d."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return out


def random_shards(k: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for _ in range(k)]


def test_field_tables_match_the_bitwise_product():
    for a in range(256):
        row = [carryless_mul(a, b) for b in range(256)]
        assert [gf_mul(a, b) for b in range(256)] == row
        assert MUL[a].tolist() == row
        if a:
            assert gf_mul(a, gf_inv(a)) == 1


def test_every_square_cauchy_submatrix_is_invertible():
    """The property that makes every loss pattern of size <= m recoverable (k=4, m=3)."""
    k, m = 4, 3
    generator = [[int(i == j) for j in range(k)] for i in range(k)] + cauchy_matrix(k, m)
    for rows in itertools.combinations(range(k + m), k):
        sub = [generator[r] for r in rows]
        inv = gf_invert(sub)
        product = [[0] * k for _ in range(k)]
        for i in range(k):
            for j in range(k):
                for t in range(k):
                    product[i][j] ^= gf_mul(sub[i][t], inv[t][j])
        assert product == [[int(i == j) for j in range(k)] for i in range(k)], rows


def test_split_pads_to_words_and_join_undoes_it():
    flat = torch.arange(37, dtype=torch.uint8)
    shards = split(flat, 3)
    assert len(shards) == 3 and all(s.numel() == 16 for s in shards)
    assert torch.equal(join(shards, 37), flat)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_xor_rebuilds_every_single_lost_shard(k):
    data = random_shards(k, 64, seed=k)
    parity = xor_encode(data)
    assert torch.equal(xor_decode(list(data), parity)[0], data[0])  # nothing lost
    for lost in range(k):
        damaged: list[torch.Tensor | None] = list(data)
        damaged[lost] = None
        rebuilt = xor_decode(damaged, parity)
        assert all(torch.equal(a, b) for a, b in zip(rebuilt, data, strict=True)), lost
    assert all(torch.equal(a, b) for a, b in zip(xor_decode(list(data), None), data, strict=True))


def test_xor_refuses_two_losses():
    data = random_shards(3, 16, seed=0)
    with pytest.raises(ValueError, match="2 are lost"):
        xor_decode([None, None, data[2]], xor_encode(data))
    with pytest.raises(ValueError, match="2 are lost"):
        xor_decode([None, data[1], data[2]], None)


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 2), (3, 2), (4, 2), (3, 3), (5, 3)])
def test_rs_rebuilds_every_loss_pattern_up_to_m(k, m):
    data = random_shards(k, 40, seed=10 * k + m)
    shards = data + rs_encode(data, m)
    for lost_count in range(m + 1):
        for lost in itertools.combinations(range(k + m), lost_count):
            damaged = [None if i in lost else s for i, s in enumerate(shards)]
            rebuilt = rs_decode(damaged, k)
            assert all(torch.equal(a, b) for a, b in zip(rebuilt, data, strict=True)), lost


def test_rs_refuses_more_than_m_losses():
    data = random_shards(3, 16, seed=1)
    shards: list[torch.Tensor | None] = [*data, *rs_encode(data, 2)]
    shards[0] = shards[1] = shards[4] = None
    with pytest.raises(ValueError, match="at most 2"):
        rs_decode(shards, 3)


@pytest.mark.parametrize("ec", ["xor", "rs:4+2", "rs:3+1"])
def test_random_snapshots_round_trip_across_blocks(ec, monkeypatch):
    """Odd lengths (padding) and several blocks per shard (small BLOCK): what a snapshot looks like."""
    monkeypatch.setattr("longtrain.checkpoint.parity.BLOCK", 64)
    code = ErasureCode.parse(ec)
    k = code.k or 4
    for seed, length in enumerate([1, 1000, 4097]):
        flat = torch.randint(
            0, 256, (length,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
        )
        data = split(flat, k)
        parity = code.encode(data)
        assert len(parity) == code.m
        g = torch.Generator().manual_seed(100 + seed)
        lost = set(torch.randperm(k + code.m, generator=g)[: code.m].tolist())
        damaged = [None if i in lost else s for i, s in enumerate(data + parity)]
        assert torch.equal(join(code.decode(damaged, k), length), flat), (ec, length, lost)


def test_parity_changes_when_any_byte_changes():
    """A code whose parity ignored some bytes would round-trip above only by luck of the loss pattern."""
    data = random_shards(3, 24, seed=2)
    parity = rs_encode(data, 2)
    for j in range(3):
        changed = [s.clone() for s in data]
        changed[j][5] ^= 1
        assert all(not torch.equal(a, b) for a, b in zip(rs_encode(changed, 2), parity, strict=True))


@pytest.mark.parametrize("bad", ["rs", "rs:0+2", "rs:4+0", "rs:200+57", "raid5", "XOR"])
def test_bad_ec_values_are_one_line_errors_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"^checkpoint\.ec") as e:
        ErasureCode.parse(bad)
    assert "\n" not in str(e.value)
