"""The score shard: s_i for the contiguous global ids [offset, offset + num_samples).

Why this layout: 4 bytes per sample. Scores are fp32 and "never scored" is encoded as NaN,
so no second array is needed and ids are implied by the offset. A stored score is always
finite (updates with non-finite values or invalid samples are dropped), so NaN is unambiguous.
Per-step work (gather/update of a meta-batch) is O(batch), independent of the shard size.
The storage lives on a device (the accelerator in training): gather and update run there
without waiting on it; only the once-per-epoch reductions and checkpoints come to the host.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ScoreTable"]

_CHUNK = 1 << 22


class ScoreTable:
    """Scores of one contiguous shard of global ids; a never-scored sample reads as s_init."""

    def __init__(
        self,
        num_samples: int,
        offset: int = 0,
        s_init: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """s_init None -> 1/num_samples (only right for a single shard: distributed callers pass
        cfg.resolved_s_init(N) for the global N). device: where the fp32 storage lives
        (default CPU)."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.num_samples = int(num_samples)
        self.offset = int(offset)
        self.s_init = float(1.0 / max(num_samples, 1) if s_init is None else s_init)
        self._scores = torch.full(
            (self.num_samples,), float("nan"), dtype=torch.float32, device=device
        )

    # --- layout ---
    def __len__(self) -> int:
        return self.num_samples

    @property
    def device(self) -> torch.device:
        return self._scores.device

    @property
    def nbytes(self) -> int:
        return self._scores.numel() * self._scores.element_size()

    @property
    def raw_scores(self) -> torch.Tensor:
        """The fp32 storage (NaN = never scored); a view, for planners and benchmarks."""
        return self._scores

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        return (ids >= self.offset) & (ids < self.offset + self.num_samples)

    def _local(self, ids: torch.Tensor) -> torch.Tensor:
        """Local int64 indices of global `ids`, on the table's device.

        The ownership check runs where it costs no device sync: in full (with a message) for
        ids on the CPU, as an asynchronous device assertion for CUDA ids; ids on other devices
        (e.g. meta) are not checked.
        """
        ids = torch.as_tensor(ids)
        if ids.is_floating_point():
            raise TypeError("ids must be an int64 tensor (never float)")
        ids = ids.to(torch.int64).reshape(-1)
        if ids.device.type == "cpu":
            if ids.numel() and not bool(self.owns(ids).all()):
                bad = ids[~self.owns(ids)][:4].tolist()
                raise IndexError(
                    f"ids {bad} are outside this shard "
                    f"[{self.offset}, {self.offset + self.num_samples})"
                )
        elif ids.device.type == "cuda":
            torch._assert_async(
                self.owns(ids).all(),
                f"ScoreTable: ids outside this shard [{self.offset}, "
                f"{self.offset + self.num_samples})",
            )
        return (ids - self.offset).to(self.device)

    # --- per-step access ---
    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 scores of `ids` (global), s_init where never scored, on the table's device."""
        s = self._scores.index_select(0, self._local(ids))
        return torch.where(torch.isnan(s), self.s_init, s).reshape(torch.as_tensor(ids).shape)

    def update(
        self, ids: torch.Tensor, new_scores: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Write new scores where valid and finite; others keep their score (spec section 1).

        With duplicate ids the last valid occurrence wins, deterministically. No boolean
        compaction (which would wait on the device): every entry is written, and all entries
        of one id carry the same final value, so the write order cannot matter.
        """
        local = self._local(ids)
        new = torch.as_tensor(new_scores).reshape(-1).to(self.device, torch.float32)
        if new.numel() != local.numel():
            raise ValueError(f"{local.numel()} ids but {new.numel()} scores")
        if not local.numel():
            return
        ok = torch.isfinite(new)
        if valid is not None:
            ok &= torch.as_tensor(valid).reshape(-1).to(self.device, torch.bool)
        # sort by (id, ok, position): the last entry of each id's run is its last ok entry
        # when it has one
        order = torch.sort(local * 2 + ok.to(torch.int64), stable=True).indices
        srt = local.index_select(0, order)
        last = torch.ones_like(srt, dtype=torch.bool)
        last[:-1] = srt[1:] != srt[:-1]
        final = torch.where(
            ok.index_select(0, order),
            new.index_select(0, order),
            self._scores.index_select(0, srt),
        )
        # each entry takes the value of the last entry of its run (reverse running minimum)
        big = srt.numel()
        run_end = torch.where(last, torch.arange(big, device=srt.device), big)
        run_end = torch.flip(torch.cummin(torch.flip(run_end, (0,)), 0).values, (0,))
        self._scores.index_copy_(0, srt, final.index_select(0, run_end))

    # --- whole-shard views ---
    def scored_mask(self) -> torch.Tensor:
        return ~torch.isnan(self._scores)

    def sum_and_count(self) -> tuple[float, int]:
        """Sum (float64) and count of scored samples; the distributed layer all-reduces both.

        Called once per epoch: accumulates chunk by chunk on the table's device and syncs once.
        """
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        for lo in range(0, self.num_samples, _CHUNK):
            c = self._scores[lo : lo + _CHUNK]
            scored = ~torch.isnan(c)
            total += torch.where(scored, c.to(torch.float64), 0.0).sum()
            count += scored.sum()
        return float(total), int(count)

    def mean(self) -> float:
        """Local mean of scored samples (NaN when none): the single-process global mean."""
        total, count = self.sum_and_count()
        return total / count if count else float("nan")

    # --- checkpointing ---
    def state_dict(self) -> dict[str, Any]:
        """Scores as a CPU tensor: the live storage for a CPU table (no 4 B/sample copy; save it
        before further updates), a host copy for a table on an accelerator."""
        return {
            "num_samples": self.num_samples,
            "offset": self.offset,
            "s_init": self.s_init,
            "scores": self._scores.detach().cpu(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if int(d["num_samples"]) != self.num_samples or int(d["offset"]) != self.offset:
            raise ValueError(
                "ScoreTable state is for shard "
                f"[{d['offset']}, {int(d['offset']) + int(d['num_samples'])}) but this table is "
                f"[{self.offset}, {self.offset + self.num_samples})"
            )
        scores = torch.as_tensor(d["scores"])
        if scores.shape != self._scores.shape or scores.dtype != torch.float32:
            raise ValueError(
                f"ScoreTable state scores have shape {tuple(scores.shape)}/{scores.dtype}, "
                f"expected ({self.num_samples},)/torch.float32"
            )
        self._scores.copy_(scores)  # to the table's device
        self.s_init = float(d["s_init"])
