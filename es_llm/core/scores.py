"""The score shard: s_i for the contiguous global ids [offset, offset + num_samples).

Why this layout: 4 bytes per sample. Scores are fp32 and "never scored" is encoded as NaN,
so no second array is needed and ids are implied by the offset. A stored score is always
finite (updates with non-finite values or invalid samples are dropped), so NaN is unambiguous.
Per-step work (gather/update of a meta-batch) is O(batch), independent of the shard size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["ScoreTable"]

_CHUNK = 1 << 22


class ScoreTable:
    """Scores of one contiguous shard of global ids; a never-scored sample reads as s_init."""

    def __init__(self, num_samples: int, offset: int = 0, s_init: float | None = None) -> None:
        """s_init None -> 1/num_samples (only right for a single shard: distributed callers pass
        cfg.resolved_s_init(N) for the global N)."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.num_samples = int(num_samples)
        self.offset = int(offset)
        self.s_init = float(1.0 / max(num_samples, 1) if s_init is None else s_init)
        self._scores = torch.full((self.num_samples,), float("nan"), dtype=torch.float32)

    # --- layout ---
    def __len__(self) -> int:
        return self.num_samples

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
        ids = torch.as_tensor(ids)
        if ids.is_floating_point():
            raise TypeError("ids must be an int64 tensor (never float)")
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() and not bool(self.owns(ids).all()):
            bad = ids[~self.owns(ids)][:4].tolist()
            raise IndexError(
                f"ids {bad} are outside this shard [{self.offset}, {self.offset + self.num_samples})"
            )
        return ids - self.offset

    # --- per-step access ---
    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 scores of `ids` (global), s_init where never scored."""
        s = self._scores.index_select(0, self._local(ids))
        return torch.where(torch.isnan(s), torch.full_like(s, self.s_init), s).reshape(
            torch.as_tensor(ids).shape
        )

    def update(
        self, ids: torch.Tensor, new_scores: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Write new scores where valid and finite; others keep their score (spec section 1).

        With duplicate ids the last occurrence wins, deterministically.
        """
        local = self._local(ids)
        new = torch.as_tensor(new_scores).reshape(-1).to(torch.float32)
        if new.numel() != local.numel():
            raise ValueError(f"{local.numel()} ids but {new.numel()} scores")
        ok = torch.isfinite(new)
        if valid is not None:
            ok &= torch.as_tensor(valid).reshape(-1).to(torch.bool)
        local, new = local[ok], new[ok]
        if local.numel() > 1:
            # keep only the last occurrence of each id, so index_put order cannot matter
            order = torch.sort(local, stable=True).indices
            srt = local[order]
            last = torch.ones_like(srt, dtype=torch.bool)
            last[:-1] = srt[1:] != srt[:-1]
            keep = order[last]
            local, new = local[keep], new[keep]
        self._scores.index_copy_(0, local, new)

    # --- whole-shard views ---
    def scored_mask(self) -> torch.Tensor:
        return ~torch.isnan(self._scores)

    def sum_and_count(self) -> tuple[float, int]:
        """Sum (float64) and count of scored samples; the distributed layer all-reduces both."""
        arr = self._scores.numpy()
        total, count = 0.0, 0
        for lo in range(0, arr.size, _CHUNK):
            c = arr[lo : lo + _CHUNK]
            scored = ~np.isnan(c)
            total += float(c.sum(dtype=np.float64, where=scored))
            count += int(np.count_nonzero(scored))
        return total, count

    def mean(self) -> float:
        """Local mean of scored samples (NaN when none): the single-process global mean."""
        total, count = self.sum_and_count()
        return total / count if count else float("nan")

    # --- checkpointing ---
    def state_dict(self) -> dict[str, Any]:
        """References the live storage (no 4 B/sample copy); save it before further updates."""
        return {
            "num_samples": self.num_samples,
            "offset": self.offset,
            "s_init": self.s_init,
            "scores": self._scores,
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
        self._scores.copy_(scores)
        self.s_init = float(d["s_init"])
