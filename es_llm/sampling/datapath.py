"""The ES data path: the one stateful component both drivers (native loop, HF Trainer) and a
user's own DeepSpeed loop drive. A driver does per optimizer step::

    draw = dp.next_step()                 # None: the planned steps are done
    a = dp.assign(draw)                   # score + select (SELECT) or the plain batch
    for each micro-batch of a:            # the driver's forward/backward/optimizer
        dp.observe_training_losses(a, ids, per_sample_losses)
    record = dp.finish_step(a)            # what the step logs (host numbers)

It composes three parts with one job each, each with `state_dict`/`load_state_dict`:

* `StepStream` (`stream.py`): the sampler, epoch order, pruning plan and row reads by global
  id (`input_ids`, and `labels` when the data has them);
* `ScoreStore` (`store.py`): the rank's score shard and the plain-step score updates;
* `GlobalSelector` (`global_selection.py`): every collective, over the communicator it is
  given (the data-parallel group): record all-gather, selection, ESWP plan, lock-step counts.

The run's shape (geometry, planned steps, burn-in) is the `RunPlan` (`plan.py`) it is built
from. Data movement: ranks all-gather only per-sample records (`records.py`), never tokens;
the chosen samples are trained locality-first and a sample that changes rank is re-read by
global id from the training set, which every rank has memory-mapped. The host synchronises
once per optimizer step, on one small int64 tensor (`records.PacketLayout`): in a SELECT step
after the selection (it needs the ids of the samples it receives), in a plain step at
`finish_step` (for the logged loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from es_llm.sampling.comm import Communicator, SelectionDivergedError
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.global_selection import GlobalSelector, gather_trained
from es_llm.sampling.plan import DataPathError, RunPlan
from es_llm.sampling.records import PacketLayout, bits_f32, f32_bits
from es_llm.sampling.schedule import Phase, phase_for_step
from es_llm.sampling.scores import ScoreTable
from es_llm.sampling.selector import selection_digest
from es_llm.sampling.store import ScoreStore
from es_llm.sampling.stream import StepStream
from es_llm.sampling.timing import StepTimers

__all__ = ["DataPathError", "ESDataPath", "StepAssignment", "StepDraw"]

# 2: the state is one dict per part (stream, scores, selector); 1 was one flat dict
STATE_VERSION = 2


@dataclass
class StepDraw:
    """This rank's samples of one optimizer step, before any selection."""

    step: int  # 0-based index of the optimizer step
    epoch: int
    phase: Phase
    ids: torch.Tensor  # int64 [n] global ids, on the device
    tokens: torch.Tensor  # int64 [n, T] on the device
    prune_weights: torch.Tensor  # fp32 [n] ESWP rescale weights, on the device
    labels: torch.Tensor | None = None  # int64 [n, T] (-100: not trained), None: the tokens

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
    labels: torch.Tensor | None = None  # int64 [B/W, T] (device), None: the tokens
    record: dict[str, Any] = field(default_factory=dict)  # host numbers, complete after finish
    train_losses: list[torch.Tensor] = field(default_factory=list)  # device, per micro-batch
    train_ids: list[torch.Tensor] = field(default_factory=list)  # stale SELECT: their ids


# evolved_sampling fields a checkpoint written before them does not have
SCORER_FIELDS = ("scorer", "proxy_model", "proxy_lr", "proxy_learn")


@lru_cache(maxsize=8)
def _select_packet(k: int, q: int) -> PacketLayout:
    """What a SELECT step brings to the host (one copy)."""
    return PacketLayout(
        (
            ("selected", k, "i64"),  # the chosen global ids, selection order
            ("my_ids", q, "i64"),  # what this rank trains
            ("local", q, "i64"),  # 1: this rank holds its tokens already
            ("diverged", 1, "i64"),
            ("stop", 1, "i64"),
            ("invalid", 1, "i64"),
            ("moved", 1, "i64"),
            ("train_loss", 1, "f64"),
            ("meta_loss", 1, "f64"),
        )
    )


@lru_cache(maxsize=8)
def _plain_packet(n: int) -> PacketLayout:
    """What a plain step brings to the host (one copy)."""
    return PacketLayout((("ids", n, "i64"), ("train_loss", 1, "f64"), ("stop", 1, "i64")))


@lru_cache(maxsize=1)
def _stale_packet() -> PacketLayout:
    """What a stale SELECT step brings to the host after training (its second copy)."""
    return PacketLayout((("train_loss", 1, "f64"), ("stop", 1, "i64")))


# The step flag each rank adds to its step's all-reduce (MAX over ranks): what the step must
# act on, the largest value winning. A non-finite training loss outranks a stop request.
FLAG_STOP = 1  # SIGINT/SIGTERM on this rank
FLAG_NONFINITE = 2  # a training loss of this step is NaN or inf
FLAG_NONFINITE_BEFORE = 3  # a training loss of the previous step (a SELECT step) was


def _masked_mean(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """float64 mean of x where ok (NaN when none), with fixed shapes: no host sync."""
    xd = torch.where(ok, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    return xd.sum() / ok.sum().to(torch.float64)


class ESDataPath:
    """One data-parallel rank's ES data stream and selection state (see the module doc).

    `comm` is the data-parallel group (`es_llm.dist.Communicator()`: the whole world);
    `device` is where the step's tensors live (default: the communicator's); `scorer` is the
    no-grad scoring forward (`es_llm.drivers.scoring.Scorer`), needed for scoring methods.
    """

    def __init__(
        self,
        plan: RunPlan,
        train_dataset: Any,
        *,
        comm: Communicator,
        device: torch.device | str | None = None,
        scorer: Any = None,
        timer_event: Callable[[], Any] | None = None,
    ) -> None:
        if comm.size != plan.dp_size:
            raise ValueError(
                f"the run plan is for {plan.dp_size} data-parallel ranks, the communicator "
                f"has {comm.size}"
            )
        if len(train_dataset) != plan.num_samples:
            raise ValueError(
                f"the run plan is for {plan.num_samples} training samples, the dataset has "
                f"{len(train_dataset)}"
            )
        self.plan, self.es, self.geo = plan, plan.es, plan.geo
        self.comm = comm
        self.rank, self.world = comm.rank, comm.size
        self.device = torch.device(device) if device is not None else comm.device
        self.scorer = scorer
        if self.es.proxy and not callable(getattr(scorer, "learn", None)):
            raise ValueError(
                "scorer proxy needs a scorer that learns (es_llm.drivers.proxy.ProxyScorer): "
                f"got {type(scorer).__name__}"
            )
        self.stream = StepStream(train_dataset, rank=self.rank, size=self.world, seed=plan.seed)
        self.store = ScoreStore(
            plan.es,
            lo=self.stream.lo,
            hi=self.stream.hi,
            num_samples=plan.num_samples,
            device=self.device,
        )
        self.selector = GlobalSelector(plan.es, comm, seed=plan.seed, k=plan.geo.train_batch)
        self.step = 0
        self.done = False
        self.totals = {"bp_samples": 0, "scored_samples": 0, "invalid_samples": 0, "pruned": 0}
        self.timers = StepTimers(self.device, timer_event)
        self.host_syncs = 0
        # Polled once per step; the ranks agree on it inside the step's collectives, so a
        # stop (SIGINT/SIGTERM on any rank) lands on the same step everywhere.
        self.stop_requested: Callable[[], bool] = lambda: False
        # 1 when a SELECT step's training losses held a NaN/inf on this rank: that step has no
        # host sync after training, so the next step's all-reduce (or `nonfinite_step()`,
        # before a checkpoint and at the end) carries it. Device int64 [1]: no host copy.
        self._nonfinite_pending = torch.zeros(1, dtype=torch.int64, device=comm.device)
        self._nonfinite_step = 0  # the step of that flag

    # ------------------------------------------------------------------ views
    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def burn_in_steps(self) -> int:
        return self.plan.burn_in_steps

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def table(self) -> ScoreTable:
        return self.store.table

    @property
    def moved_samples(self) -> int:
        return self.selector.moved_samples

    # ------------------------------------------------------------------ schedule
    def phase(self) -> Phase:
        if not self.es.uses_scoring_forward:
            return Phase.PLAIN  # plain batches of B (uniform, prune)
        return phase_for_step(self.step, self.total_steps, self.es, self.plan.plain_steps_per_epoch)

    def _start_epoch(self) -> None:
        """Epoch head (a collective): ESWP plan, lock-step sample count, visiting order."""
        s = self.stream
        plan = self.selector.plan_epoch(self.table, epoch=s.epoch, epochs=self.plan.epochs)
        self.totals["pruned"] += self.selector.count_pruned(plan)
        s.begin_epoch(plan, self.selector.available(s.sampler, plan))

    def next_step(self) -> StepDraw | None:
        """This rank's draw for the next optimizer step; None once the planned steps are done."""
        if self.done or self.step >= self.total_steps:
            self.done = True
            return None
        s = self.stream
        while True:
            if not s.started:
                self._start_epoch()
            phase = self.phase()
            need = self.geo.meta_per_rank if phase == Phase.SELECT else self.geo.train_per_rank
            if s.fits(need):
                break
            if s.epoch + 1 >= self.plan.epochs:
                self.done = True
                return None
            s.next_epoch()
        ids, weights = s.take(need)
        rows = s.read(ids)
        return StepDraw(
            step=self.step,
            epoch=s.epoch,
            phase=phase,
            ids=self._to_device(ids),
            tokens=self._to_device(rows.tokens),
            prune_weights=self._to_device(weights),
            labels=self._to_device(rows.labels) if rows.labels is not None else None,
        )

    # ------------------------------------------------------------------ data
    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _stop_flag(self, device: torch.device, nonfinite_now: torch.Tensor | None = None):
        """This rank's step flag (FLAG_*) as an int64 [1] on `device`, without a host copy:
        the stop request, the previous SELECT step's non-finite training loss, and (plain
        steps) this step's `nonfinite_now` (0/1 int64 [1])."""
        flag = torch.full((1,), int(self.stop_requested()), dtype=torch.int64, device=device)
        flag = torch.maximum(flag, FLAG_NONFINITE_BEFORE * self._nonfinite_pending.to(device))
        if nonfinite_now is not None:
            flag = torch.maximum(flag, FLAG_NONFINITE * nonfinite_now.to(device))
        return flag

    def _flag_fields(self, flag: int, step: int) -> dict[str, Any]:
        """The step record's view of the agreed step flag (`step`: this step, 1-based). The
        flag carried this rank's pending non-finite loss: it is reported now."""
        self._nonfinite_pending.zero_()
        bad = {FLAG_NONFINITE_BEFORE: self._nonfinite_step, FLAG_NONFINITE: step}.get(flag)
        return {"stop_requested": flag == FLAG_STOP, "nonfinite_loss_step": bad}

    def nonfinite_step(self) -> int | None:
        """The step whose training loss was NaN/inf on some rank and that no step's
        all-reduce has reported yet (the last SELECT step), or None. Collective, and it
        syncs the host: call it before a checkpoint and at the end, on every rank."""
        bad = self.comm.all_reduce_sum([float(self._nonfinite_pending.sum().item())])[0]
        return self._nonfinite_step if bad > 0 else None

    @staticmethod
    def _nonfinite(losses: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """0/1 int64 [1] on `device`: is any of the step's training losses NaN/inf?"""
        if not losses:
            return torch.zeros(1, dtype=torch.int64, device=device)
        bad = ~torch.isfinite(torch.cat([x.reshape(-1) for x in losses]))
        return bad.any().to(torch.int64).reshape(1).to(device)

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
        with self.timers.span("proxy_fwd_s" if self.es.proxy else "score_fwd_s"):
            if draw.labels is None:
                loss, valid = self.scorer(draw.tokens, draw.ids)
            else:
                loss, valid = self.scorer(draw.tokens, draw.ids, draw.labels)
        return loss.float(), valid.to(torch.bool)

    def _trainable(self, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """bool [n]: the row has a label token to predict (a loss), read from the rows alone."""
        target = (tokens if labels is None else labels)[:, 1:]
        return (target != self.es.ignore_index).any(dim=1)

    def assign(self, draw: StepDraw) -> StepAssignment:
        """The step's training batch: the selection for SELECT steps, else the draw itself."""
        if draw.selecting:
            if self.es.stale:  # no forward: the stored last losses (s_init: never observed)
                loss, valid = (
                    self.store.stale_losses(draw.ids),
                    self._trainable(draw.tokens, draw.labels),
                )
            else:
                loss, valid = self.score(draw)
            return self.select(draw, loss, valid)
        return StepAssignment(
            draw=draw,
            ids=draw.ids,
            tokens=draw.tokens,
            labels=draw.labels,
            loss_weights=draw.prune_weights,
            update_scores=self.es.plain_steps_update_scores,
        )

    def select(self, draw: StepDraw, losses: torch.Tensor, valid: torch.Tensor) -> StepAssignment:
        """All-gather the records, select B globally, update the owned scores, assign."""
        dev = self.comm.device
        k, q = self.geo.train_batch, self.geo.train_per_rank
        layout = _select_packet(k, q)
        with self.timers.span("select_s"):
            gs = self.selector.select(
                self.table,
                step=draw.step,
                ids=draw.ids,
                losses=losses,
                valid=valid,
                prune_weights=draw.prune_weights,
                state=self.store.column_state(draw.ids),
            )
            g, a = gs.gathered, gs.assignment
            meta_ok = torch.isfinite(g.losses) & g.valid
            sel_pos = gs.selection.positions.to(dev)
            diverged, stop = self.comm.lockstep_flags(gs.digest, self._stop_flag(dev))
            host = layout.unpack(
                self._to_host(
                    layout.pack(
                        selected=gs.selected_ids,
                        my_ids=g.ids[a.positions],
                        local=a.local,
                        diverged=diverged,
                        stop=stop,
                        invalid=(~g.valid).sum(),
                        moved=a.moved,
                        train_loss=_masked_mean(g.losses[sel_pos], meta_ok[sel_pos]),
                        meta_loss=_masked_mean(g.losses, meta_ok),
                    )
                )
            )
        digest = selection_digest(host["selected"])
        if int(host["diverged"][0]):
            raise SelectionDivergedError(self.rank, digest)
        my_ids, local = host["my_ids"], host["local"].bool()
        positions = a.positions.to(self.device)
        tokens = self._assemble(draw.tokens, positions, my_ids, local, "tokens")
        labels = None
        if draw.labels is not None:
            labels = self._assemble(draw.labels, positions, my_ids, local, "labels")
        weights = gs.loss_weights().to(self.device)
        m = draw.ids.numel()
        n_invalid = int(host["invalid"][0])
        scored = 0 if self.es.stale else m * self.world
        self.totals["bp_samples"] += k
        self.totals["scored_samples"] += scored
        self.totals["invalid_samples"] += n_invalid
        self.selector.moved_samples += int(host["moved"][0])
        record = {
            "train_loss": host["train_loss"],
            "scored": scored,
            "selected": k,
            "invalid": n_invalid,
            "meta_loss": host["meta_loss"],
            "digest": digest,
            **self._flag_fields(int(host["stop"][0]), draw.step + 1),
        }
        return StepAssignment(
            draw=draw,
            ids=my_ids.to(self.device),
            tokens=tokens,
            labels=labels,
            loss_weights=weights,
            update_scores=False,
            record=record,
        )

    def _assemble(
        self,
        drawn: torch.Tensor,
        positions: torch.Tensor,
        my_ids: torch.Tensor,
        local: torch.Tensor,
        column: str,
    ) -> torch.Tensor:
        """Rows of the samples this rank trains: own ones from the draw's rows (device), moved
        ones re-read by global id (`column`: "tokens" or "labels")."""
        m = drawn.size(0)
        own = (positions - self.rank * m).clamp(0, m - 1)
        rows = drawn.index_select(0, own)
        if not bool(local.all()):
            moved = torch.nonzero(~local).reshape(-1)
            remote = getattr(self.stream.read(my_ids[moved]), column)
            rows[moved.to(self.device)] = self._to_device(remote)
        return rows

    def observe_training_losses(
        self, a: StepAssignment, ids: torch.Tensor, losses: torch.Tensor
    ) -> None:
        """Per-sample training losses of one micro-batch (device, detached): plain steps
        update the scores of `ids` from them (the free scoring of burn-in / anneal / prune)."""
        losses = losses.detach().float()
        a.train_losses.append(losses)
        if a.update_scores:
            self.store.observe(ids, losses)
        elif self.es.stale and a.draw.selecting:  # their owners update them at finish_step
            a.train_ids.append(ids.detach())

    def finish_step(self, a: StepAssignment) -> dict[str, Any]:
        """Close the step: count it and return its record (the plain step's one host sync).
        With scorer proxy, the proxy first learns from the rows this rank trained."""
        if self.es.proxy:
            with self.timers.span("proxy_train_s"):
                self.scorer.learn(a.tokens, a.labels, a.loss_weights > 0)
        if not a.draw.selecting:
            dev = self.comm.device
            losses = torch.cat(a.train_losses) if a.train_losses else torch.zeros(0)
            # one extra row per rank carries its stop request: (flag, 0)
            flag = self._stop_flag(dev, self._nonfinite(a.train_losses, dev))
            mine = torch.cat(
                [
                    torch.stack([a.ids.to(dev), f32_bits(losses.to(dev))], dim=1),
                    torch.stack([flag, torch.zeros_like(flag)], dim=1),
                ]
            )
            everyone = self.comm.all_gather_cat(mine).view(self.world, -1, 2)
            samples, flags = everyone[:, :-1].reshape(-1, 2), everyone[:, -1, 0]
            n = samples.shape[0]
            layout = _plain_packet(n)
            host = layout.unpack(
                self._to_host(
                    layout.pack(
                        ids=samples[:, 0],
                        train_loss=bits_f32(samples[:, 1]).mean(),
                        stop=flags.amax(),
                    )
                )
            )
            self.totals["bp_samples"] += n
            a.record = {
                "train_loss": host["train_loss"],
                "scored": 0,
                "selected": n,
                "invalid": 0,
                "digest": selection_digest(host["ids"]),
                **self._flag_fields(int(host["stop"][0]), a.draw.step + 1),
            }
        elif self.es.stale:
            self._finish_stale_select(a)
        else:  # no host sync after training: the next step's all-reduce carries it
            self._nonfinite_pending = torch.maximum(
                self._nonfinite_pending, self._nonfinite(a.train_losses, self.comm.device)
            )
            self._nonfinite_step = a.draw.step + 1
        a.record.update(step=a.draw.step + 1, epoch=a.draw.epoch, phase=a.draw.phase)
        self.step += 1
        return a.record

    def _finish_stale_select(self, a: StepAssignment) -> None:
        """A stale selection step's training losses update score and last loss on the ranks
        that own the samples (one all-gather of (id, loss) rows, with each rank's step flag),
        and its record gets the mean training loss: the step's second host sync."""
        dev = self.comm.device
        ids = torch.cat(a.train_ids).to(dev) if a.train_ids else a.ids[:0].to(dev)
        raw = torch.cat(a.train_losses).to(dev) if a.train_losses else torch.zeros(0, device=dev)
        # the drivers observe consecutive micro-batches from the first: loss weight 0 marks
        # the invalid filler of a selection (no label token, so no loss)
        ok = a.loss_weights[: ids.numel()].to(dev) > 0
        losses = torch.where(ok, raw, torch.full_like(raw, float("nan")))
        flag = self._stop_flag(dev, self._nonfinite(a.train_losses, dev))
        all_ids, got, flags = gather_trained(self.comm, ids, losses, flag)
        self.store.observe_owned(all_ids, got)
        layout = _stale_packet()
        host = layout.unpack(
            self._to_host(
                layout.pack(train_loss=_masked_mean(got, torch.isfinite(got)), stop=flags.amax())
            )
        )
        a.record["train_loss"] = host["train_loss"]
        agreed = int(host["stop"][0])
        a.record["stop_requested"] = a.record["stop_requested"] or agreed == FLAG_STOP
        if a.record["nonfinite_loss_step"] is None and agreed == FLAG_NONFINITE:
            a.record["nonfinite_loss_step"] = a.draw.step + 1

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> dict[str, Any]:
        """What must be equal for a resumed run to continue the same run."""
        p = self.plan
        return {
            "world_size": self.world,
            "num_samples": p.num_samples,
            "shard": [self.stream.lo, self.stream.hi],
            "method": self.es.method,
            "seed": p.seed,
            "epochs": p.epochs,
            "planned_steps": p.total_steps,
            "burn_in_steps": p.burn_in_steps,
            "steps_per_epoch": p.steps_per_epoch,
            "train_batch": self.geo.train_batch,
            "meta_batch": self.geo.meta_batch,
            "micro_batch": self.geo.micro,
            "labels": self.stream.has_labels,
            "evolved_sampling": self.es.model_dump(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and CPU tensors (weights_only-safe); take it between steps."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "step": self.step,
            "done": self.done,
            "stream": self.stream.state_dict(),
            "scores": self.store.state_dict(),
            "selector": self.selector.state_dict(),
            "totals": dict(self.totals),
            "timers": self.timers.state_dict(),
            "host_syncs": self.host_syncs,
            **({"proxy": self.scorer.state_dict()} if self.es.proxy else {}),
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "the ES state") -> None:
        """Continue from `state_dict()` of the same run; a different run is an error."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise DataPathError(
                f"{source} has ES data path state format {version!r}, this es-llm reads "
                f"format {STATE_VERSION}: it was written by another es-llm version; start a "
                f"fresh run (or resume with the es-llm that wrote it)"
            )
        saved, now = dict(state["fingerprint"]), self.fingerprint()
        if isinstance(saved.get("evolved_sampling"), dict):
            # written before the scorer fields existed: they held their defaults
            fields = EvolvedSamplingConfig.model_fields
            added = {k: fields[k].default for k in SCORER_FIELDS}
            saved["evolved_sampling"] = {**added, **saved["evolved_sampling"]}
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in diff)
            raise DataPathError(
                f"{source} was written by a different run configuration ({detail}); resume "
                f"with the same flags and config as the original run"
            )
        try:
            self.store.load_state_dict(state["scores"])
            self.stream.load_state_dict(state["stream"])
            self.selector.load_state_dict(state["selector"])
            if self.es.proxy:  # its weights and optimizer: the resumed proxy scores the same
                self.scorer.load_state_dict(state["proxy"])
        except (KeyError, ValueError, TypeError) as e:
            raise DataPathError(f"{source} does not fit this run: {e}") from e
        self.step = int(state["step"])
        self.done = bool(state["done"])
        self.totals.update({k: int(v) for k, v in state["totals"].items()})
        self.timers.load_state_dict(state["timers"])
        self.host_syncs = int(state["host_syncs"])
