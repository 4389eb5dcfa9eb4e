"""The score store: this rank's score shard and the rules that write it outside a selection.

One job: the scores s_i of the rank's own global ids. Selection steps write them through the
global selector (`global_selection.py`); plain steps (burn-in, anneal, prune) write them here
from the training losses, by the rule the method's selection reads (`policies.score_update`).
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

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Training losses of a plain step update the scores of `ids` (non-finite: kept)."""
        tdev = self.table.device
        ids_t, losses_t = ids.to(tdev), losses.to(tdev)
        s_new = score_update(self.es.method, self.table.gather(ids_t), losses_t, self.es.beta2)
        self.table.update(ids_t, s_new, torch.isfinite(losses_t))

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and a CPU tensor (weights_only-safe)."""
        scores = dict(self.table.state_dict())
        scores["scores"] = scores["scores"].detach().to("cpu")
        return scores

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores = dict(state)
        scores["scores"] = torch.as_tensor(scores["scores"]).to(self.table.device)
        self.table.load_state_dict(scores)
