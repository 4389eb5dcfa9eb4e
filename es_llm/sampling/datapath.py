"""The ES data path: one stateful component that both drivers (native loop, HF Trainer) use.

It owns the score shard, the rank's sampler position, the epoch's ESWP plan, the step and
epoch counters, the phase schedule and the step's selection. A driver does per optimizer step::

    draw = dp.next_step()                 # None: the planned steps are done
    a = dp.assign(draw)                   # score + select (SELECT) or the plain batch
    for each micro-batch of a:            # the driver's forward/backward/optimizer
        dp.observe_training_losses(a, ids, per_sample_losses)
    record = dp.finish_step(a)            # what the step logs (host numbers)

Data movement: ranks all-gather only per-sample records (`records.py`), never tokens; the
chosen samples are trained locality-first and a sample that changes rank is re-read by global
id from the training set, which every rank has memory-mapped. The host synchronises once per
optimizer step, on one small int64 tensor: in a SELECT step after the selection (it needs the
ids of the samples it receives), in a plain step at `finish_step` (for the logged loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from es_llm import dist
from es_llm.data.sharding import RankSampler, shard_range
from es_llm.drivers.scoring import Scorer
from es_llm.errors import InputError
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.eswp import lockstep_available, plan_epoch_global
from es_llm.sampling.geometry import BatchGeometry
from es_llm.sampling.global_selection import select_global
from es_llm.sampling.policies import score_update
from es_llm.sampling.pruning import EpochPlan
from es_llm.sampling.records import bits_f32, f32_bits
from es_llm.sampling.schedule import (
    Phase,
    estimate_total_steps,
    phase_for_step,
    resolve_burn_in_steps,
)
from es_llm.sampling.scores import ScoreTable
from es_llm.sampling.selector import selection_digest
from es_llm.sampling.timing import StepTimers

__all__ = ["DataPathError", "ESDataPath", "StepAssignment", "StepDraw"]

STATE_VERSION = 1


class DataPathError(InputError):
    """The data does not fit the batch geometry, or a saved state does not fit this run."""


@dataclass
class StepDraw:
    """This rank's samples of one optimizer step, before any selection."""

    step: int  # 0-based index of the optimizer step
    epoch: int
    phase: Phase
    local_idx: torch.Tensor  # int64 (host): positions in this rank's shard
    ids: torch.Tensor  # int64 [n] global ids, on the device
    tokens: torch.Tensor  # int64 [n, T] on the device
    prune_weights: torch.Tensor  # fp32 [n] ESWP rescale weights, on the device

    @property
    def selecting(self) -> bool:
        return self.phase == Phase.SELECT


@dataclass
class StepAssignment:
    """What this rank trains in the step, and what the step logs."""

    draw: StepDraw
    ids: torch.Tensor  # int64 [B/W] global ids (device)
    tokens: torch.Tensor  # int64 [B/W, T] (device)
    loss_weights: torch.Tensor  # fp32 [B/W] (device)
    update_scores: bool  # plain step: the training losses update the scores
    record: dict[str, Any] = field(default_factory=dict)  # host numbers, complete after finish
    train_losses: list[torch.Tensor] = field(default_factory=list)  # device, per micro-batch


def _f64_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64).reshape(1).view(torch.int64)


def _masked_mean(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """float64 mean of x where ok (NaN when none), with fixed shapes: no host sync."""
    xd = torch.where(ok, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    return xd.sum() / ok.sum().to(torch.float64)


class ESDataPath:
    """One rank's ES data stream and selection state (see the module doc)."""

    def __init__(
        self,
        es: EvolvedSamplingConfig,
        geo: BatchGeometry,
        train_dataset: Any,
        *,
        seed: int,
        epochs: int,
        max_steps: int | None = None,
        device: torch.device | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self.es, self.geo, self.seed, self.epochs = es, geo, int(seed), int(epochs)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = torch.device(device) if device is not None else dist.device()
        self.scorer = scorer
        n = len(train_dataset)
        if n == 0:
            raise DataPathError("the training split is empty")
        if "input_ids" not in getattr(train_dataset, "column_names", ["input_ids"]):
            raise DataPathError("the training dataset needs an 'input_ids' column")
        self.num_samples = n
        self.lo, self.hi = shard_range(n, self.rank, self.world)
        # the full set, memory-mapped: own rows at lo + i, moved samples by their global id
        self.dataset = train_dataset.with_format("numpy", columns=["input_ids"])
        self.min_local = dist.all_reduce_min_int(self.hi - self.lo)
        scoring = es.uses_scoring_forward
        need = geo.meta_per_rank if scoring else geo.train_per_rank
        if self.min_local < need:
            raise DataPathError(
                f"{n} training sequences give rank shards of {self.min_local}, fewer than one "
                f"{'meta-' if scoring else ''}batch of {need} per rank: "
                f"use more data, a shorter --seq-len or a smaller batch"
            )
        self.total_steps = estimate_total_steps(
            es,
            min_local=self.min_local,
            train_per_rank=geo.train_per_rank,
            meta_per_rank=geo.meta_per_rank,
            epochs=self.epochs,
            max_steps=max_steps,
        )
        self.steps_per_epoch = max(1, self.min_local // need)
        # burn-in epochs count plain steps (batches of B), see resolve_burn_in_steps
        self._plain_steps_per_epoch = max(1, self.min_local // geo.train_per_rank)
        self.burn_in_steps = (
            resolve_burn_in_steps(es, self.total_steps, self._plain_steps_per_epoch)
            if scoring
            else 0
        )
        self.table = ScoreTable(
            self.hi - self.lo, offset=self.lo, s_init=es.resolved_s_init(n), device=self.device
        )
        self.sampler = RankSampler(
            self.hi - self.lo, offset=self.lo, seed=self.seed, rank=self.rank
        )
        self.plan: EpochPlan | None = None
        self.step = 0
        self.epoch = 0
        self.done = False
        self._started = False  # the current epoch's plan/order/available are set
        self._order: torch.Tensor | None = None
        self._available = 0
        self.totals = {"bp_samples": 0, "scored_samples": 0, "invalid_samples": 0, "pruned": 0}
        self.timers = StepTimers(self.device)
        self.host_syncs = 0
        self.moved_samples = 0
        # Polled once per step; the ranks agree on it inside the step's collectives, so a
        # stop (SIGINT/SIGTERM on any rank) lands on the same step everywhere.
        self.stop_requested: Callable[[], bool] = lambda: False

    # ------------------------------------------------------------------ schedule
    def phase(self) -> Phase:
        if not self.es.uses_scoring_forward:
            return Phase.PLAIN  # plain batches of B (uniform, prune)
        return phase_for_step(self.step, self.total_steps, self.es, self._plain_steps_per_epoch)

    def _start_epoch(self) -> None:
        """Epoch head (a collective): ESWP plan, visiting order, lock-step sample count."""
        self.sampler.set_epoch(self.epoch)
        self.plan = None
        if self.es.uses_pruning:
            self.plan = plan_epoch_global(
                self.table, self.es, epoch=self.epoch, epochs=self.epochs, seed=self.seed
            )
            pruned = float((~self.plan.keep).sum())
            self.totals["pruned"] += int(dist.all_reduce_sum([pruned])[0])
        self._set_order()
        self._available = lockstep_available(self.sampler, self.plan)
        self._started = True

    def _set_order(self) -> None:
        self._order = self.sampler.order(self.plan.keep if self.plan is not None else None)

    def next_step(self) -> StepDraw | None:
        """This rank's draw for the next optimizer step; None once the planned steps are done."""
        if self.done or self.step >= self.total_steps:
            self.done = True
            return None
        while True:
            if not self._started:
                self._start_epoch()
            phase = self.phase()
            need = self.geo.meta_per_rank if phase == Phase.SELECT else self.geo.train_per_rank
            pos = self.sampler.position
            if pos + need <= self._available:
                break
            if self.epoch + 1 >= self.epochs:
                self.done = True
                return None
            self.epoch += 1
            self._started = False
        if self._order is None:
            raise RuntimeError("the epoch order is missing after the epoch start")
        local_idx = self._order[pos : pos + need]
        self.sampler.advance(need)
        if self.plan is None:
            pw = torch.ones(need, dtype=torch.float32)
        else:
            pw = self.plan.loss_weights(local_idx).float()
        return StepDraw(
            step=self.step,
            epoch=self.epoch,
            phase=phase,
            local_idx=local_idx,
            ids=self._to_device(local_idx + self.lo),
            tokens=self._to_device(self.read_tokens(local_idx + self.lo)),
            prune_weights=self._to_device(pw),
        )

    # ------------------------------------------------------------------ data
    def read_tokens(self, global_ids: torch.Tensor) -> torch.Tensor:
        """int64 [n, T] token ids of `global_ids` (host) from the memory-mapped training set."""
        rows = self.dataset[global_ids.tolist()]["input_ids"]
        return torch.from_numpy(np.asarray(rows, dtype=np.int64))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _stop_flag(self, device: torch.device) -> torch.Tensor:
        """This rank's stop request as a 0/1 int64 [1] on `device` (a fill, no host copy)."""
        return torch.full((1,), int(self.stop_requested()), dtype=torch.int64, device=device)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """The step's one device -> host copy."""
        self.host_syncs += 1
        out = t.cpu()
        self.timers.flush()
        return out

    # ------------------------------------------------------------------ one step
    def score(self, draw: StepDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss fp32, valid bool) of the draw's samples, on the device."""
        if self.scorer is None:
            raise RuntimeError("ESDataPath has no scorer: pass scorer= or set .scorer")
        with self.timers.span("score_fwd_s"):
            loss, valid = self.scorer(draw.tokens, draw.ids)
        return loss.float(), valid.to(torch.bool)

    def assign(self, draw: StepDraw) -> StepAssignment:
        """The step's training batch: the selection for SELECT steps, else the draw itself."""
        if draw.selecting:
            loss, valid = self.score(draw)
            return self.select(draw, loss, valid)
        return StepAssignment(
            draw=draw,
            ids=draw.ids,
            tokens=draw.tokens,
            loss_weights=draw.prune_weights,
            update_scores=self.es.plain_steps_update_scores,
        )

    def select(self, draw: StepDraw, losses: torch.Tensor, valid: torch.Tensor) -> StepAssignment:
        """All-gather the records, select B globally, update the owned scores, assign."""
        comm = dist.device()
        with self.timers.span("select_s"):
            gs = select_global(
                self.es,
                self.table,
                step=draw.step,
                seed=self.seed,
                ids=draw.ids.to(comm),
                losses=losses.to(comm),
                valid=valid.to(comm),
                prune_weights=draw.prune_weights.to(comm),
                k=self.geo.train_batch,
            )
            g, a = gs.gathered, gs.assignment
            meta_ok = torch.isfinite(g.losses) & g.valid
            chosen = a.positions
            sel_pos = gs.selection.positions.to(comm)
            sel_ok, sel_losses = meta_ok[sel_pos], g.losses[sel_pos]
            packed = torch.cat(
                [
                    gs.selected_ids,
                    g.ids[chosen],
                    a.local.to(torch.int64),
                    *(
                        t.to(torch.int64).reshape(1)
                        for t in dist.lockstep_diverged(gs.digest, self._stop_flag(comm))
                    ),
                    (~g.valid).sum().reshape(1),
                    a.moved.reshape(1),
                    _f64_bits(_masked_mean(sel_losses, sel_ok)),
                    _f64_bits(_masked_mean(g.losses, meta_ok)),
                ]
            )
            host = self._to_host(packed)
        k, q = self.geo.train_batch, self.geo.train_per_rank
        selected, my_ids, local = host[:k], host[k : k + q], host[k + q : k + 2 * q].bool()
        diverged, stop, n_invalid, moved = (int(v) for v in host[k + 2 * q : k + 2 * q + 4])
        train_loss, meta_loss = (float(v) for v in host[k + 2 * q + 4 :].view(torch.float64))
        digest = selection_digest(selected)
        dist.raise_if_diverged(bool(diverged), digest)
        tokens = self._assemble_tokens(draw, a.positions.to(self.device), my_ids, local)
        weights = gs.loss_weights().to(self.device)
        m = draw.ids.numel()
        self.totals["bp_samples"] += k
        self.totals["scored_samples"] += m * self.world
        self.totals["invalid_samples"] += n_invalid
        self.moved_samples += moved
        record = {
            "train_loss": train_loss,
            "scored": m * self.world,
            "selected": k,
            "invalid": n_invalid,
            "meta_loss": meta_loss,
            "digest": digest,
            "stop_requested": bool(stop),
        }
        return StepAssignment(
            draw=draw,
            ids=my_ids.to(self.device),
            tokens=tokens,
            loss_weights=weights,
            update_scores=False,
            record=record,
        )

    def _assemble_tokens(
        self, draw: StepDraw, positions: torch.Tensor, my_ids: torch.Tensor, local: torch.Tensor
    ) -> torch.Tensor:
        """Own samples from the draw's tokens (device), moved ones re-read by global id."""
        m = draw.ids.numel()
        own = (positions - self.rank * m).clamp(0, m - 1)
        tokens = draw.tokens.index_select(0, own)
        if not bool(local.all()):
            rows = torch.nonzero(~local).reshape(-1)
            remote = self._to_device(self.read_tokens(my_ids[rows]))
            tokens[rows.to(self.device)] = remote
        return tokens

    def observe_training_losses(
        self, a: StepAssignment, ids: torch.Tensor, losses: torch.Tensor
    ) -> None:
        """Per-sample training losses of one micro-batch (device, detached): plain steps
        update the scores of `ids` from them (the free scoring of burn-in / anneal / prune)."""
        losses = losses.detach().float()
        a.train_losses.append(losses)
        if not a.update_scores:
            return
        tdev = self.table.device
        ids_t, losses_t = ids.to(tdev), losses.to(tdev)
        s_new = score_update(self.es.method, self.table.gather(ids_t), losses_t, self.es.beta2)
        self.table.update(ids_t, s_new, torch.isfinite(losses_t))

    def finish_step(self, a: StepAssignment) -> dict[str, Any]:
        """Close the step: count it and return its record (the plain step's one host sync)."""
        if not a.draw.selecting:
            comm = dist.device()
            losses = torch.cat(a.train_losses) if a.train_losses else torch.zeros(0)
            # one extra row per rank carries its stop request: (flag, 0)
            flag = self._stop_flag(comm)
            mine = torch.cat(
                [
                    torch.stack([a.ids.to(comm), f32_bits(losses.to(comm))], dim=1),
                    torch.stack([flag, torch.zeros_like(flag)], dim=1),
                ]
            )
            everyone = dist.all_gather_cat(mine).view(self.world, -1, 2)
            samples, flags = everyone[:, :-1].reshape(-1, 2), everyone[:, -1, 0]
            all_losses = bits_f32(samples[:, 1])
            n = samples.shape[0]
            packed = torch.cat(
                [samples[:, 0], _f64_bits(all_losses.mean()), flags.amax().reshape(1)]
            )
            host = self._to_host(packed)
            self.totals["bp_samples"] += n
            a.record = {
                "train_loss": float(host[n:].view(torch.float64)[0]),
                "scored": 0,
                "selected": n,
                "invalid": 0,
                "digest": selection_digest(host[:n]),
                "stop_requested": bool(host[n + 1]),
            }
        a.record.update(step=a.draw.step + 1, epoch=a.draw.epoch, phase=a.draw.phase)
        self.step += 1
        return a.record

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> dict[str, Any]:
        """What must be equal for a resumed run to continue the same run."""
        return {
            "world_size": self.world,
            "num_samples": self.num_samples,
            "shard": [self.lo, self.hi],
            "method": self.es.method,
            "seed": self.seed,
            "epochs": self.epochs,
            "planned_steps": self.total_steps,
            "burn_in_steps": self.burn_in_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "train_batch": self.geo.train_batch,
            "meta_batch": self.geo.meta_batch,
            "micro_batch": self.geo.micro,
            "evolved_sampling": self.es.model_dump(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and CPU tensors (weights_only-safe); take it between steps."""
        scores = dict(self.table.state_dict())
        scores["scores"] = scores["scores"].detach().to("cpu")
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "step": self.step,
            "epoch": self.epoch,
            "done": self.done,
            "epoch_started": self._started,
            "available": self._available,
            "scores": scores,
            "plan": self.plan.state_dict() if self.plan is not None else None,
            "sampler": self.sampler.state_dict(),
            "totals": dict(self.totals),
            "timers": self.timers.state_dict(),
            "host_syncs": self.host_syncs,
            "moved_samples": self.moved_samples,
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "the ES state") -> None:
        """Continue from `state_dict()` of the same run; a different run is an error."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataPathError(f"{source} has an unknown ES data path state format")
        saved, now = state["fingerprint"], self.fingerprint()
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in diff)
            raise DataPathError(
                f"{source} was written by a different run configuration ({detail}); resume "
                f"with the same flags and config as the original run"
            )
        try:
            scores = dict(state["scores"])
            scores["scores"] = torch.as_tensor(scores["scores"]).to(self.table.device)
            self.table.load_state_dict(scores)
            self.sampler.load_state_dict(state["sampler"])
            plan = state["plan"]
            self.plan = EpochPlan.from_state_dict(plan) if plan is not None else None
        except (KeyError, ValueError, TypeError) as e:
            raise DataPathError(f"{source} does not fit this run: {e}") from e
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.done = bool(state["done"])
        self._started = bool(state["epoch_started"])
        self._available = int(state["available"])
        self._order = None
        if self._started:
            self._set_order()
        self.totals.update({k: int(v) for k, v in state["totals"].items()})
        self.timers.load_state_dict(state["timers"])
        self.host_syncs = int(state["host_syncs"])
        self.moved_samples = int(state["moved_samples"])
