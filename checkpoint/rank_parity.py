"""Parity across ranks: how each rank's snapshot is cut into stripes, which rank keeps which parity
stripe, and the two exchanges over a gloo process group: ``exchange_parity`` after every snapshot
(in the snapshot's background thread) and ``exchange_rebuild`` at resume, when ranks lost their
snapshot (a node lost with its agent's memory).

Layout (RAID-5's rotation generalised to k + m = N ranks; xor: k = N - 1, m = 1; rs:k+m: the
config's k and m, which must add up to N). What is coded is rank r's snapshot *image*: its slot's
bytes from the header to the end of the tensor data (``Slot.image``), so a rebuilt image is a slot
whose table and per-tensor crc32s check the rebuild. Every image is zero-padded to k * S bytes,
S = the longest image / k rounded up to whole 8-byte words, and cut into k stripes of S bytes.
There are N groups. In group g, rank r sits at position q = (r - g) mod N: positions 0..m-1 hold
the group's parity shards 0..m-1, positions m..N-1 its data shards 0..k-1, data shard i being
stripe i of rank (g + m + i) mod N. So each rank gives each of its k stripes to one group and keeps
parity for m groups: m * S bytes, m/k of the largest snapshot (xor: 1/(N-1)), spread evenly. Losing
any m ranks takes at most m shards from each group, and the code rebuilds them from the other k.

Traffic: to encode, each rank sends every stripe to the m ranks holding its group's parity (m
times its image); each parity holder codes the k stripes it received (``ErasureCode.encode_row``).
To rebuild, the survivors send each lost rank k shards per lost stripe and the lost rank decodes.
Both go in ``all_to_all_single`` calls over ``CHUNK`` bytes of every stripe at a time, so the
buffers in flight stay m * k * CHUNK bytes (encode) or k * k * CHUNK (a rebuild), not the state. Both exchanges are called by every
rank with the same arguments where they must agree (lengths, who holds what): the plans are
computed the same way on every rank and never negotiated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longtrain.config_checks import ConfigError

from .parity import ErasureCode

_WORD = 8
CHUNK = 8 << 20  # bytes of each stripe per all_to_all: bounds the exchanges' buffers (a multiple of 8)


class RebuildError(ValueError):
    """More shards of a group are lost than the code rebuilds."""


@dataclass(frozen=True)
class RankParity:
    """The stripe layout of ``code`` over ``world`` ranks (see the module docstring)."""

    code: ErasureCode
    world: int

    @staticmethod
    def build(code: ErasureCode, world: int, key: str = "checkpoint.ec") -> RankParity | None:
        """The layout, or None where there is nothing to code (ec none, or one rank)."""
        if code.kind == "none" or world < 2:
            return None
        if code.kind == "rs" and code.k + code.m != world:
            hint = f"rs:{world - code.m}+{code.m}, " if world > code.m else ""
            raise ConfigError(
                f"{key}=rs:{code.k}+{code.m} spreads {code.k + code.m} shards over as many ranks, this run has "
                f"{world}; set {key} to {hint}xor or none"
            )
        return RankParity(code, world)

    @property
    def m(self) -> int:
        return self.code.m

    @property
    def k(self) -> int:
        return self.world - self.m

    def position(self, rank: int, group: int) -> int:
        return (rank - group) % self.world

    def rank_at(self, group: int, position: int) -> int:
        return (group + position) % self.world

    def data_groups(self, rank: int) -> list[tuple[int, int]]:
        """(group, stripe index) of each of ``rank``'s k stripes."""
        return [(g, q - self.m) for g in range(self.world) if (q := self.position(rank, g)) >= self.m]

    def parity_groups(self, rank: int) -> list[tuple[int, int]]:
        """(group, parity row) of the m parity shards ``rank`` keeps."""
        return [(g, q) for g in range(self.world) if (q := self.position(rank, g)) < self.m]

    def stripe_bytes(self, lengths: Sequence[int]) -> int:
        per = max(1, -(-max(lengths) // self.k))
        return -(-per // _WORD) * _WORD

    @staticmethod
    def stripe(
        image: torch.Tensor, index: int, size: int, lo: int = 0, hi: int | None = None
    ) -> torch.Tensor:
        """Bytes [lo, hi) of stripe ``index`` of an image (uint8; default: the whole stripe),
        zero-padded where the image ends (a view where it does not)."""
        hi = size if hi is None else hi
        piece = image[index * size + lo : index * size + hi]
        if piece.numel() == hi - lo:
            return piece
        padded = torch.zeros(hi - lo, dtype=torch.uint8)
        padded[: piece.numel()] = piece
        return padded

    def encode(self, group: int, row: int, data: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parity shard ``row`` of ``group`` from its k data stripes, in data-shard order."""
        return self.code.encode_row(row, [s.contiguous() for s in data])

    def rebuild_plan(
        self, have_data: Sequence[bool], have_parity: Sequence[bool]
    ) -> list[tuple[int, int, int, list[int]]]:
        """For every stripe of every rank without data: (lost rank, group, stripe index, the k
        positions of the group whose shards rebuild it: data first, then parity). Raises
        ``RebuildError`` when a group has fewer than k shards left."""
        plan = []
        order = [*range(self.m, self.world), *range(self.m)]  # data shards, then parity shards
        for lost in (r for r in range(self.world) if not have_data[r]):
            for g, j in self.data_groups(lost):
                held = [q for q in order if (have_data if q >= self.m else have_parity)[self.rank_at(g, q)]]
                if len(held) < self.k:
                    raise RebuildError(
                        f"parity group {g} has {len(held)} of its {self.world} shards left, "
                        f"{self.k} are needed (checkpoint.ec={self.code_name})"
                    )
                plan.append((lost, g, j, held[: self.k]))
        return plan

    def decode(self, shards: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """A group's k data stripes from k of its shards, keyed by position."""
        ordered = [shards.get(q) for q in [*range(self.m, self.world), *range(self.m)]]
        return self.code.decode(ordered, self.k)

    @property
    def code_name(self) -> str:
        return "xor" if self.code.kind == "xor" else f"rs:{self.code.k}+{self.code.m}"

    # ------------------------------------------------------------------ one process, all ranks

    def encode_images(self, images: Sequence[torch.Tensor]) -> tuple[int, list[dict[int, torch.Tensor]]]:
        """(S, every rank's parity shards {group: bytes}) computed in one process: the reference the
        exchange is tested against, and the definition of what each rank keeps."""
        size = self.stripe_bytes([i.numel() for i in images])
        parity: list[dict[int, torch.Tensor]] = [{} for _ in range(self.world)]
        for r in range(self.world):
            for g, row in self.parity_groups(r):
                data = [self.stripe(images[self.rank_at(g, self.m + i)], i, size) for i in range(self.k)]
                parity[r][g] = self.encode(g, row, data)
        return size, parity

    def rebuild_images(
        self,
        images: Sequence[torch.Tensor | None],
        parity: Sequence[dict[int, torch.Tensor] | None],
        lengths: Sequence[int],
        size: int,
    ) -> dict[int, torch.Tensor]:
        """The images of the ranks whose image is None, from the others' images and parity
        (``parity[r]`` None: rank r's parity is lost too), in one process."""
        plan = self.rebuild_plan([i is not None for i in images], [p is not None for p in parity])
        stripes: dict[int, dict[int, torch.Tensor]] = {}
        for lost, g, j, positions in plan:
            shards = {}
            for q in positions:
                r = self.rank_at(g, q)
                if q >= self.m:
                    image = images[r]
                    assert image is not None
                    shards[q] = self.stripe(image, q - self.m, size)
                else:
                    held = parity[r]
                    assert held is not None
                    shards[q] = held[g]
            stripes.setdefault(lost, {})[j] = self.decode(shards)[j]
        return {x: torch.cat([s[j] for j in range(self.k)])[: lengths[x]] for x, s in stripes.items()}


# ---------------------------------------------------------------------- the exchanges (collective)


def exchange_parity(
    layout: RankParity, rank: int, image: torch.Tensor | None, group: dist.ProcessGroup | None
) -> tuple[dict[int, torch.Tensor], list[int], int] | None:
    """Every rank, once its snapshot image is written (None: this rank has none, its write
    failed): (the parity shards this rank keeps {group: S bytes}, every rank's image length, S),
    or None on every rank when some rank has no image (no parity for this snapshot)."""
    n, m = layout.world, layout.m
    lengths_t = torch.zeros(n + 1, dtype=torch.int64)
    lengths_t[rank] = 0 if image is None else image.numel()
    lengths_t[n] = int(image is None)
    dist.all_reduce(lengths_t, group=group)
    if lengths_t[n] > 0:
        return None
    lengths = lengths_t[:n].tolist()
    size = layout.stripe_bytes(lengths)
    assert image is not None

    sends: list[int] = []  # the stripe index of each piece sent, grouped by destination rank
    send_counts = [0] * n
    for dst in range(n):
        for g, _ in layout.parity_groups(dst):
            q = layout.position(rank, g)
            if q >= m:
                sends.append(q - m)
                send_counts[dst] += 1
    recv_from: list[tuple[int, int]] = []  # (source, group) in the order they arrive
    recv_counts = [0] * n
    for src in range(n):
        for g, _ in layout.parity_groups(rank):
            if layout.position(src, g) >= m:
                recv_from.append((src, g))
                recv_counts[src] += 1
    parity = {g: torch.empty(size, dtype=torch.uint8) for g, _ in layout.parity_groups(rank)}
    for lo in range(0, size, CHUNK):  # in pieces: what is in flight stays m * k * CHUNK bytes
        hi = min(lo + CHUNK, size)
        pieces = [layout.stripe(image, j, size, lo, hi) for j in sends]
        received = _all_to_all(pieces, send_counts, len(recv_from), recv_counts, hi - lo, group)
        got = dict(zip(recv_from, received, strict=True))
        for g, row in layout.parity_groups(rank):
            data = [got[(layout.rank_at(g, m + i), g)] for i in range(layout.k)]
            parity[g][lo:hi] = layout.encode(g, row, data)
    return parity, lengths, size


def exchange_rebuild(
    layout: RankParity,
    rank: int,
    have_data: Sequence[bool],
    have_parity: Sequence[bool],
    image: torch.Tensor | None,
    parity: dict[int, torch.Tensor] | None,
    lengths: Sequence[int],
    size: int,
    group: dist.ProcessGroup | None,
) -> torch.Tensor | None:
    """Every rank: the survivors send what the ranks without data need; returns this rank's
    rebuilt image where it had none (else None). ``have_data``/``have_parity``, ``lengths`` and
    ``size`` must be the same on every rank; ``image``/``parity``: this rank's, where it has them."""
    n, m = layout.world, layout.m
    plan = layout.rebuild_plan(have_data, have_parity)
    outgoing: list[tuple[int, int, int]] = []  # (destination, group, position) in plan order
    incoming: list[tuple[int, int, int]] = []  # (source, group, position) in plan order
    for lost, g, _, positions in plan:
        for q in positions:
            src = layout.rank_at(g, q)
            if src == rank:
                outgoing.append((lost, g, q))
            if lost == rank:
                incoming.append((src, g, q))
    # all_to_all groups by rank, and a stable sort keeps the plan's order within each rank
    outgoing.sort(key=lambda item: item[0])
    incoming.sort(key=lambda item: item[0])
    send_counts = [sum(1 for d, _, _ in outgoing if d == r) for r in range(n)]
    recv_counts = [sum(1 for s, _, _ in incoming if s == r) for r in range(n)]
    out = None if have_data[rank] else torch.empty(layout.k * size, dtype=torch.uint8)
    for lo in range(0, size, CHUNK):
        hi = min(lo + CHUNK, size)
        pieces = []
        for _, g, q in outgoing:
            if q >= m:
                assert image is not None
                pieces.append(layout.stripe(image, q - m, size, lo, hi))
            else:
                assert parity is not None
                pieces.append(parity[g][lo:hi])
        received = _all_to_all(pieces, send_counts, len(incoming), recv_counts, hi - lo, group)
        if out is None:
            continue
        shards: dict[int, dict[int, torch.Tensor]] = {}
        for (_, g, q), t in zip(incoming, received, strict=True):
            shards.setdefault(g, {})[q] = t
        for g, j in layout.data_groups(rank):
            out[j * size + lo : j * size + hi] = layout.decode(shards[g])[j]
    return None if out is None else out[: lengths[rank]]


def _all_to_all(
    chunks: list[torch.Tensor],
    send_counts: list[int],
    n_recv: int,
    recv_counts: list[int],
    size: int,
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """Send ``chunks`` (S bytes each, grouped by destination in rank order, ``send_counts`` per
    rank); returns the ``n_recv`` chunks received, grouped by source in rank order."""
    send = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    recv = torch.empty(n_recv * size, dtype=torch.uint8)
    dist.all_to_all_single(
        recv,
        send,
        output_split_sizes=[c * size for c in recv_counts],
        input_split_sizes=[c * size for c in send_counts],
        group=group,
    )
    return list(recv.view(n_recv, size).unbind(0)) if n_recv else []
