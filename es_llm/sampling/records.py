"""Per-sample records as one int64 tensor, and the locality-first training assignment.

Why records: ranks exchange only what the global selection needs (id, loss, previous score,
validity, prune loss weight): 24 bytes a sample in one all-gather, never token ids. fp32
values travel as their bit patterns, two to an int64 word, so an id never passes through a
float and the values arrive bit-exact.

Why locality-first: after the selection every rank holds B_meta/W scored samples of which
some were chosen. Each rank trains its own chosen samples (up to B/W); only the surplus of
ranks that own more than B/W moves to ranks that own fewer, and the receiving rank re-reads
those samples by global id from the (memory-mapped) training set. All of it is computed from
the selection alone, identically on every rank, with fixed shapes (no host sync).

Why a packet layout: a step copies what the host needs (ids it receives, counts, losses, the
lock-step flags) to the host once. `PacketLayout` names the fields of that one int64 tensor,
so packing and reading it cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "RECORD_WORDS",
    "Assignment",
    "PacketLayout",
    "Records",
    "bits_f32",
    "f32_bits",
    "locality_first",
    "pack",
    "unpack",
]

RECORD_WORDS = 3  # int64 words per sample: id | loss, score | valid, prune weight
_LOW = (1 << 32) - 1


def f32_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> its 32 bits as a non-negative int64 (0 .. 2^32 - 1)."""
    return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _LOW


def bits_f32(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of `f32_bits` for int64 holding 0 .. 2^32 - 1."""
    signed = torch.where(bits >= (1 << 31), bits - (1 << 32), bits)
    return signed.to(torch.int32).view(torch.float32)


@dataclass
class Records:
    ids: torch.Tensor  # int64 [n]
    losses: torch.Tensor  # fp32 [n]
    scores: torch.Tensor  # fp32 [n] previous scores s(t-1)
    valid: torch.Tensor  # bool [n]
    prune_weights: torch.Tensor  # fp32 [n]


def pack(r: Records) -> torch.Tensor:
    """[n, RECORD_WORDS] int64 on the records' device."""
    if r.ids.dtype != torch.int64:
        raise TypeError(f"sample ids must be int64, got {r.ids.dtype}")
    w0 = r.ids.reshape(-1)
    w1 = (f32_bits(r.losses.reshape(-1)) << 32) | f32_bits(r.scores.reshape(-1))
    w2 = (r.valid.reshape(-1).to(torch.int64) << 32) | f32_bits(r.prune_weights.reshape(-1))
    return torch.stack([w0, w1, w2], dim=1)


def unpack(packed: torch.Tensor) -> Records:
    w0, w1, w2 = packed.unbind(dim=1)
    return Records(
        ids=w0.contiguous(),
        losses=bits_f32((w1 >> 32) & _LOW),
        scores=bits_f32(w1 & _LOW),
        valid=((w2 >> 32) & 1).to(torch.bool),
        prune_weights=bits_f32(w2 & _LOW),
    )


@dataclass
class Assignment:
    """Which chosen samples one rank trains, in its training order (fixed shapes)."""

    positions: torch.Tensor  # int64 [B/W] into the gathered meta-batch
    local: torch.Tensor  # bool [B/W]: the rank scored (and holds the tokens of) this sample
    slot: torch.Tensor  # int64 [B/W]: index into `positions` of the selection (selection order)
    moved: torch.Tensor  # 0-dim int64: samples of the whole step that change rank


def locality_first(
    positions: torch.Tensor, *, per_rank_meta: int, world: int, rank: int
) -> Assignment:
    """Assign the k selected positions (ascending, rank-major meta-batch) to ranks, k/W each.

    Rank r keeps its own chosen samples in selection order, up to k/W; the surplus of all
    ranks, in selection order, fills the ranks short of k/W in rank order. Returns rank
    `rank`'s share: first its own samples, then those it receives.
    """
    k = positions.numel()
    if k % world:
        raise ValueError(f"{k} selected samples do not split evenly across {world} ranks")
    q = k // world
    dev = positions.device
    owner = torch.div(positions, per_rank_meta, rounding_mode="floor")
    counts = torch.bincount(owner, minlength=world)[:world]
    starts = torch.cumsum(counts, 0) - counts
    order = torch.arange(k, device=dev)
    within = order - starts[owner]  # index among the owner's chosen samples
    kept = within < q
    own_n = torch.clamp(counts, max=q)
    deficit = q - own_n
    deficit_end = torch.cumsum(deficit, 0)
    surplus_idx = torch.cumsum((~kept).to(torch.int64), 0) - 1  # rank of each surplus sample
    receiver = torch.searchsorted(deficit_end, surplus_idx, right=True).clamp(max=world - 1)
    recv_slot = own_n[receiver] + surplus_idx - (deficit_end - deficit)[receiver]
    assignee = torch.where(kept, owner, receiver)
    slot_in_rank = torch.where(kept, within, recv_slot)
    # scatter this rank's positions into its q slots; everyone else's go to a dump slot q
    target = torch.where(assignee == rank, slot_in_rank, torch.full_like(slot_in_rank, q))
    mine_pos = torch.zeros(q + 1, dtype=torch.int64, device=dev).scatter_(0, target, positions)
    mine_slot = torch.zeros(q + 1, dtype=torch.int64, device=dev).scatter_(0, target, order)
    mine_pos, mine_slot = mine_pos[:q], mine_slot[:q]
    return Assignment(
        positions=mine_pos,
        local=torch.div(mine_pos, per_rank_meta, rounding_mode="floor") == rank,
        slot=mine_slot,
        moved=(~kept).sum(),
    )


def f64_bits(x: torch.Tensor) -> torch.Tensor:
    """A float scalar as the int64 bit pattern of its float64 value, shape [1]."""
    return x.to(torch.float64).reshape(1).view(torch.int64)


@dataclass(frozen=True)
class PacketLayout:
    """Named fields of one int64 tensor: `(name, words, kind)`, kind "i64" or "f64".

    `pack` concatenates the fields on their device (f64 scalars as bit patterns); the caller
    copies the result to the host once; `unpack` returns each field by name (int64 tensors,
    f64 fields as Python floats).
    """

    fields: tuple[tuple[str, int, str], ...]

    def __post_init__(self) -> None:
        names = [f[0] for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate packet fields: {names}")
        for name, words, kind in self.fields:
            if kind not in ("i64", "f64") or words < 1 or (kind == "f64" and words != 1):
                raise ValueError(f"packet field {name!r}: bad size {words} / kind {kind!r}")

    @property
    def words(self) -> int:
        return sum(w for _, w, _ in self.fields)

    def pack(self, **values: torch.Tensor) -> torch.Tensor:
        if set(values) != {f[0] for f in self.fields}:
            raise ValueError(
                f"packet fields {sorted(values)} != layout {[f[0] for f in self.fields]}"
            )
        parts = []
        for name, words, kind in self.fields:
            v = values[name]
            t = f64_bits(v) if kind == "f64" else v.to(torch.int64).reshape(-1)
            if t.numel() != words:
                raise ValueError(f"packet field {name!r} has {t.numel()} words, expected {words}")
            parts.append(t)
        return torch.cat(parts)

    def unpack(self, host: torch.Tensor) -> dict[str, torch.Tensor | float]:
        if host.numel() != self.words:
            raise ValueError(f"packet of {host.numel()} words, layout has {self.words}")
        out: dict[str, torch.Tensor | float] = {}
        at = 0
        for name, words, kind in self.fields:
            part = host[at : at + words]
            out[name] = float(part.view(torch.float64)[0]) if kind == "f64" else part
            at += words
        return out
