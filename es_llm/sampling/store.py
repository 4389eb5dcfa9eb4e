"""The score store: this rank's score shard and the rules that write it outside a selection.

One job: the scores s_i of the rank's own global ids. Selection steps write them through the
global selector (`global_selection.py`); plain steps (burn-in, anneal, prune) write them here
from the training losses, by the rule the method's selection reads (`policies.score_update`
on the run's own validated config).
With scorer stale it also keeps each sample's last observed training loss (`last_loss`, NaN:
never observed, read as s_init), and every training loss, of any step, updates both here.
"""

from __future__ import annotations

from typing import Any

import torch

from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.policies import score_update
from es_llm.sampling.scores import ScoreTable

__all__ = ["ScoreStore"]


class ScoreStore:
    """The scores of global ids [lo, hi) of `num_samples`, on `device`."""

    def __init__(
        self,
        es: EvolvedSamplingConfig,
        *,
        lo: int,
        hi: int,
        num_samples: int,
        device: torch.device,
    ) -> None:
        self.es = es
        self.table = ScoreTable(
            hi - lo, offset=lo, s_init=es.resolved_s_init(num_samples), device=device
        )
        # scorer stale: the last observed training loss, a second 4 B/sample table
        self.last_loss: ScoreTable | None = None
        if es.stale:
            self.last_loss = ScoreTable(hi - lo, offset=lo, s_init=self.table.s_init, device=device)
        # the method's extra per-sample fp32 columns (`SamplingMethod.state`, e.g. ref_loss),
        # over the same ids as the scores; filled by whoever computes them (set_column)
        self.columns: dict[str, torch.Tensor] = {}

    def set_column(self, name: str, values: torch.Tensor) -> None:
        """Store column `name` of the shard: fp32 [hi - lo], index i for global id lo + i."""
        if name not in self.es.sampling_method.state:
            raise ValueError(f"method {self.es.method!r} reads no per-sample column {name!r}")
        v = torch.as_tensor(values)
        if v.shape != (self.table.num_samples,):
            raise ValueError(
                f"column {name!r} has shape {tuple(v.shape)}, the shard holds "
                f"{self.table.num_samples} samples"
            )
        self.columns[name] = v.to(device=self.table.device, dtype=torch.float32)

    def column_state(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every column at the global `ids` this rank owns (on the ids' device, no sync).

        Raises ValueError naming the columns the method reads that were never set.
        """
        missing = [c for c in self.es.sampling_method.state if c not in self.columns]
        if missing:
            raise ValueError(f"method {self.es.method!r} needs the per-sample state {missing}")
        if not self.columns:
            return {}
        local = ids.to(self.table.device).to(torch.int64) - self.table.offset
        return {n: c.index_select(0, local).to(ids.device) for n, c in self.columns.items()}

    def observe(
        self, ids: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Training losses update the scores of `ids` (and, stale, their last loss); entries
        that are non-finite or not `valid` keep theirs. Every id must be this rank's."""
        tdev = self.table.device
        ids_t, losses_t = ids.to(tdev), losses.to(tdev)
        ok = torch.isfinite(losses_t)
        if valid is not None:
            ok &= valid.to(tdev)
        state = self.column_state(ids_t)
        # the run's config, as a selection step reads it (not a rebuilt beta2-only one)
        s_new = score_update(self.es, self.table.gather(ids_t), losses_t, state=state)
        self.table.update(ids_t, s_new, ok)
        if self.last_loss is not None:
            self.last_loss.update(ids_t, losses_t, ok)

    def observe_owned(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """`observe` of the entries of `ids` this rank owns; the others are left to their
        owners (the all-gathered training losses of a stale selection step). No host sync:
        a foreign id is written as a no-op entry of the shard's first id."""
        tdev = self.table.device
        ids_t = ids.to(tdev)
        own = self.table.owns(ids_t)
        placeholder = torch.full_like(ids_t, self.table.offset)
        self.observe(torch.where(own, ids_t, placeholder), losses, own)

    def stale_losses(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 last observed training loss of this rank's `ids` (s_init: never observed)."""
        if self.last_loss is None:
            raise RuntimeError("only scorer 'stale' keeps the last training loss")
        return self.last_loss.gather(ids.to(self.table.device)).to(ids.device)

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and CPU tensors (weights_only-safe)."""
        scores = dict(self.table.state_dict())
        scores["scores"] = scores["scores"].detach().to("cpu")
        scores["columns"] = {n: c.detach().to("cpu").clone() for n, c in self.columns.items()}
        if self.last_loss is not None:
            scores["last_loss"] = self.last_loss.state_dict()["scores"].detach().to("cpu").clone()
        return scores

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Scores and columns exactly as saved (the saved columns replace recomputed ones)."""
        scores = dict(state)
        columns = scores.pop("columns", {})
        last_loss = scores.pop("last_loss", None)
        if (last_loss is None) != (self.last_loss is None):
            raise ValueError(
                "the saved state "
                + ("has no" if last_loss is None else "has a")
                + " last-loss column (scorer stale), this run "
                + ("needs one" if last_loss is None else "keeps none")
            )
        if sorted(columns) != sorted(self.es.sampling_method.state):
            raise ValueError(
                f"the saved per-sample columns {sorted(columns)} are not the method's "
                f"{sorted(self.es.sampling_method.state)}"
            )
        scores["scores"] = torch.as_tensor(scores["scores"]).to(self.table.device)
        self.table.load_state_dict(scores)
        for name, values in columns.items():
            self.set_column(name, values)
        if self.last_loss is not None:
            self.last_loss.load_state_dict({**scores, "scores": torch.as_tensor(last_loss)})
