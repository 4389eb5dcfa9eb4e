"""Evolved Sampling inside a Hugging Face `Trainer`: `ESTrainer`, a drop-in subclass.

Use it where you would use `transformers.Trainer`, with `TrainingArguments(deepspeed=...)`
pointing at a DeepSpeed config that carries an `evolved_sampling` section::

    trainer = ESTrainer(model=model, args=TrainingArguments(..., deepspeed="ds.json"),
                        train_dataset=packed)   # columns: input_ids (equal length T)
    trainer.train()

Without the section (or with `enabled: false`) it is a plain `Trainer`.

How an optimizer step maps onto the Trainer (the same semantics as `es_llm.train.loop`):

* `get_train_dataloader` returns this rank's ES data stream. Per optimizer step it draws,
  from the rank's own shard in the native loop's epoch order, `B_meta / W` samples in a
  selection step or `B / W` in a burn-in / anneal / uniform / prune step, and yields them as
  `gradient_accumulation_steps` pieces (the Trainer pulls that many items per step).
* `get_batch_samples` — the one place where the Trainer holds all the items of one optimizer
  step before any forward — joins the pieces, scores the meta-batch with a no-grad forward
  (`scoring_losses`), computes the global selection (`select_global`: all-gather over the DP
  group, counter-based noise from `(seed, step)`), and returns this rank's `B / W` chosen
  samples as exactly `gradient_accumulation_steps` micro-batches of
  `train_micro_batch_size_per_gpu`.
* The Trainer's own loop then does what it always does: one `training_step` per micro-batch,
  DeepSpeed's gradient accumulation boundary on the last one, one optimizer step.
  `compute_loss` computes the per-sample losses times the ES loss weights (ESWP rescale,
  filler weight 0), averaged over the micro-batch: with the Trainer's `1/gas` and DeepSpeed's
  `scale_wrt_gas=False` this is the native loop's loss exactly. In plain steps the per-sample
  training losses update the scores, as in the native loop.

Epochs are the native loop's: the stream moves to the next epoch (new order, ESWP plan) when
the current one cannot fill another step, independently of where the Trainer's own epoch
counter is; the Trainer's per-epoch length is set so that its total step count is the native
loop's planned count (or `max_steps`). When the stream runs out the run stops. One difference
remains: the native loop runs its last epoch out even past the planned count (burn-in steps
draw B, not B_meta, so epochs can hold a step or two more than planned) while the Trainer
stops at its planned count; every step both run selects the same samples.

Per-step selection digests go to `OUTPUT_DIR/es_metrics.jsonl` (same `selection_digest` as
the native `metrics.jsonl`). Resuming from a Trainer checkpoint is not supported yet (the ES
state is not saved with it); `train(resume_from_checkpoint=...)` refuses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer

from es_llm import dist
from es_llm.config import SECTION, EvolvedSamplingConfig, es_config_from_ds_config
from es_llm.core.policies import method_weights
from es_llm.core.pruning import EpochPlan, anneal_epoch
from es_llm.core.schedule import Phase, phase_for_step, resolve_burn_in_steps
from es_llm.core.scores import ScoreTable
from es_llm.core.selector import selection_digest
from es_llm.data.sharding import RankSampler, shard_range
from es_llm.errors import InputError
from es_llm.eswp import lockstep_available, plan_epoch_global
from es_llm.train.geometry import BatchGeometry, resolve_geometry
from es_llm.train.global_selection import select_global
from es_llm.train.loop import _sample_losses
from es_llm.train.scoring import scoring_losses

__all__ = ["ESTrainer", "estimate_total_steps"]

_PHASES = list(Phase)


def estimate_total_steps(
    es: EvolvedSamplingConfig, geo: BatchGeometry, min_local: int, epochs: int
) -> int:
    """Planned optimizer steps, computed as the native loop's `ESRun._estimate_total_steps`."""
    per_rank = geo.meta_per_rank if es.uses_scoring_forward else geo.train_per_rank
    total = 0
    a_epoch = anneal_epoch(es.delta, epochs)
    for e in range(epochs):
        kept = min_local
        if es.uses_pruning and 0 < e < a_epoch:
            kept = int(min_local * (1 - 0.5 * es.prune_ratio))
        total += kept // per_rank
    return max(1, total)


class _ESStream(IterableDataset):
    """One rank's ES data stream: the native loop's epochs, order, pruning and phases.

    Iterating continues where the last iteration stopped (the Trainer re-creates its
    iterator every Trainer epoch; the native epochs are tracked here). The draw for a step
    happens when its first piece is requested, so nothing is consumed ahead.
    """

    def __init__(
        self,
        shard: Any,
        *,
        lo: int,
        es: EvolvedSamplingConfig,
        geo: BatchGeometry,
        table: ScoreTable,
        sampler: RankSampler,
        seed: int,
        epochs: int,
        total_steps: int,
        steps_per_epoch: int,
        length: int,
    ) -> None:
        self.shard, self.lo, self.es, self.geo = shard, lo, es, geo
        self.table, self.sampler, self.seed = table, sampler, seed
        self.epochs, self.total_steps, self.steps_per_epoch = epochs, total_steps, steps_per_epoch
        self.length = length
        self.step = 0
        self.epoch = 0
        self.plan: EpochPlan | None = None
        self._order: torch.Tensor | None = None
        self._available = 0
        self.exhausted = False
        self.pruned_total = 0

    def __len__(self) -> int:
        return self.length

    def phase(self) -> Phase:
        if not self.es.uses_scoring_forward:
            return Phase.ANNEAL  # plain batches of B (uniform, prune)
        return phase_for_step(self.step, self.total_steps, self.es, self.steps_per_epoch)

    def _start_epoch(self, epoch: int) -> None:
        """Native `run()` epoch head: sampler epoch, ESWP plan, lock-step sample count."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.plan = None
        if self.es.uses_pruning:
            self.plan = plan_epoch_global(
                self.table, self.es, epoch=epoch, epochs=self.epochs, seed=self.seed
            )
            pruned = int((~self.plan.keep).sum())
            self.pruned_total += int(dist.all_reduce_sum([float(pruned)])[0])
        self._order = self.sampler.order(self.plan.keep if self.plan is not None else None)
        self._available = lockstep_available(self.sampler, self.plan)

    def draw(self) -> tuple[Phase, torch.Tensor] | None:
        """Local indices of the next step (and its phase), or None when all epochs are done."""
        if self.exhausted:
            return None
        if self._order is None:
            self._start_epoch(self.epoch)
        while True:
            phase = self.phase()
            need = self.geo.meta_per_rank if phase == Phase.SELECT else self.geo.train_per_rank
            pos = self.sampler.position
            if pos + need <= self._available:
                assert self._order is not None
                local_idx = self._order[pos : pos + need]
                self.sampler.advance(need)
                return phase, local_idx
            if self.epoch + 1 >= self.epochs:
                self.exhausted = True
                return None
            self._start_epoch(self.epoch + 1)

    def tokens(self, local_idx: torch.Tensor) -> torch.Tensor:
        rows = self.shard[local_idx.tolist()]["input_ids"]
        return torch.from_numpy(np.asarray(rows, dtype=np.int64))

    def prune_weights(self, local_idx: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            return torch.ones(local_idx.numel())
        return self.plan.loss_weights(local_idx).float()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            drawn = self.draw()
            if drawn is None:
                return
            phase, local_idx = drawn
            step = torch.tensor(self.step)
            self.step += 1
            pieces = torch.tensor_split(torch.arange(local_idx.numel()), self.geo.grad_accum)
            for part in pieces:
                idx = local_idx[part]
                yield {
                    "es_step": step,
                    "es_select": torch.tensor(phase == Phase.SELECT),
                    "es_phase": torch.tensor(_PHASES.index(phase)),
                    "es_epoch": torch.tensor(self.epoch),
                    "es_ids": idx + self.lo,
                    "es_weights": self.prune_weights(idx),
                    "input_ids": self.tokens(idx),
                }


def _strip_es_section(args: Any) -> dict[str, Any] | None:
    """Take the ES section out of the Trainer's own copy of the DeepSpeed config.

    The Trainer loads the user's file (or deep-copies a dict) into `args.hf_deepspeed_config`,
    which is what accelerate hands to `deepspeed.initialize`; the user's file is untouched.
    Returns the processed config (batch "auto" values already resolved by the Trainer).
    """
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    if hf_ds is None:
        return None
    cfg = hf_ds.config
    section = cfg.pop(SECTION, None)
    plugin = getattr(args, "deepspeed_plugin", None)
    plugin_cfg = getattr(plugin, "deepspeed_config", None)
    if isinstance(plugin_cfg, dict) and plugin_cfg is not cfg:
        plugin_cfg.pop(SECTION, None)
    out = dict(cfg)
    if section is not None:
        out[SECTION] = section
    return out


class ESTrainer(Trainer):
    """`transformers.Trainer` that trains with ES/ESWP when the DeepSpeed config says so.

    `es_config` overrides the config's section (e.g. for sweeps). `train_dataset` is a
    `datasets.Dataset` with an `input_ids` column of equal-length packed sequences; the
    global sample id is the row index.
    """

    def __init__(self, *args: Any, es_config: EvolvedSamplingConfig | None = None, **kwargs: Any):
        from es_llm.cuda_env import fix_torch_cuda_arch_list

        fix_torch_cuda_arch_list()  # before DeepSpeed JIT-builds any op (FusedAdam)
        super().__init__(*args, **kwargs)
        ds_config = _strip_es_section(self.args)
        self.es: EvolvedSamplingConfig | None = es_config
        if self.es is None and ds_config is not None:
            self.es = es_config_from_ds_config(ds_config)
        if self.es is not None and ds_config is None:
            raise InputError(
                "ESTrainer needs TrainingArguments(deepspeed=...): ES runs through DeepSpeed"
            )
        self._es_ds_config = ds_config
        self._stream: _ESStream | None = None
        self.es_log: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        if self.es is None:
            return super().get_train_dataloader()
        if self._stream is None:
            self._stream = self._build_stream()
        # batch_size=None: the stream yields ready pieces. No workers and no accelerate
        # sharding: the stream already is this rank's shard and it runs collectives.
        return DataLoader(self._stream, batch_size=None, num_workers=0)

    def _build_stream(self) -> _ESStream:
        assert self.es is not None and self._es_ds_config is not None
        ds = self.train_dataset
        if ds is None or not hasattr(ds, "with_format") or "input_ids" not in ds.column_names:
            raise InputError(
                "ESTrainer needs a datasets.Dataset train_dataset with an 'input_ids' column"
            )
        rank, world = dist.rank(), dist.world_size()
        geo = resolve_geometry(self._es_ds_config, world, self.es.effective_selection_ratio)
        if geo.micro != self.args.per_device_train_batch_size or (
            geo.grad_accum != self.args.gradient_accumulation_steps
        ):
            raise InputError(
                f"DeepSpeed config batch fields (micro {geo.micro}, gas {geo.grad_accum}) differ "
                f"from TrainingArguments ({self.args.per_device_train_batch_size}, "
                f'{self.args.gradient_accumulation_steps}); use "auto" in the config'
            )
        n = len(ds)
        lo, hi = shard_range(n, rank, world)
        shard = ds.select(range(lo, hi)).with_format("numpy", columns=["input_ids"])
        min_local = dist.all_reduce_min_int(hi - lo)
        need = geo.meta_per_rank if self.es.uses_scoring_forward else geo.train_per_rank
        if min_local < need:
            raise InputError(
                f"{n} training sequences give rank shards of {min_local}, fewer than one batch "
                f"of {need} per rank"
            )
        epochs = max(1, math.ceil(self.args.num_train_epochs))
        total = estimate_total_steps(self.es, geo, min_local, epochs)
        if self.args.max_steps > 0:
            total = min(total, self.args.max_steps)
        steps_per_epoch = max(1, min_local // need)
        seed = self.es.resolved_seed(self.args.seed)
        self._geo, self._seed, self._rank = geo, seed, rank
        self._scoring_mbs = self.es.scoring_micro_batch_size or 2 * geo.micro
        self._burn_in = (
            resolve_burn_in_steps(self.es, total, steps_per_epoch)
            if self.es.uses_scoring_forward
            else 0
        )
        # Trainer epochs only count steps: make their total the native plan
        per_trainer_epoch = math.ceil(
            estimate_total_steps(self.es, geo, min_local, epochs) / epochs
        )
        return _ESStream(
            shard,
            lo=lo,
            es=self.es,
            geo=geo,
            table=ScoreTable(hi - lo, offset=lo, s_init=self.es.resolved_s_init(n)),
            sampler=RankSampler(hi - lo, offset=lo, seed=seed, rank=rank),
            seed=seed,
            epochs=epochs,
            total_steps=total,
            steps_per_epoch=steps_per_epoch,
            length=per_trainer_epoch * geo.grad_accum,
        )

    # ------------------------------------------------------------------ one step
    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        """All pieces of one optimizer step -> score, select -> this rank's micro-batches."""
        if self.es is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        pieces = []
        for _ in range(num_batches):
            try:
                pieces.append(next(epoch_iterator))
            except StopIteration:
                break
        if not pieces:
            self.control.should_training_stop = True  # the native epochs are done
            return [], None
        steps = {int(p["es_step"]) for p in pieces}
        if len(steps) != 1 or len(pieces) != self._geo.grad_accum:
            raise RuntimeError(
                f"ES step pieces out of line with gradient accumulation ({len(pieces)} pieces, "
                f"steps {sorted(steps)}); the Trainer must pull {self._geo.grad_accum} per step"
            )
        step = steps.pop()
        ids = torch.cat([p["es_ids"] for p in pieces])
        tokens = torch.cat([p["input_ids"] for p in pieces])
        pw = torch.cat([p["es_weights"] for p in pieces])
        phase = _PHASES[int(pieces[0]["es_phase"])]
        if bool(pieces[0]["es_select"]):
            train_ids, train_tokens, weights, rec = self._select(step, ids, tokens, pw)
            update = False
        else:
            train_ids, train_tokens, weights = ids, tokens, pw
            all_ids = dist.all_gather_cat(ids)
            rec = {"scored": 0, "selected": all_ids.numel(), "invalid": 0}
            rec["digest"] = selection_digest(all_ids)
            update = self.es.method != "uniform"
        dist.check_lockstep(rec["digest"])
        micro = self._geo.micro
        batches = [
            {
                "input_ids": train_tokens[i : i + micro],
                "es_ids": train_ids[i : i + micro],
                "es_weights": weights[i : i + micro].float(),
                "es_update": torch.tensor(update),
            }
            for i in range(0, train_tokens.size(0), micro)
        ]
        self._log_step(step, phase, int(pieces[0]["es_epoch"]), rec)
        return batches, None

    def _score(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad scoring forward through the wrapped (DeepSpeed) module on every rank."""
        assert self.es is not None
        module = self.model_wrapped
        was_training = module.training
        module.eval()
        device = self.args.device
        sums, counts = [], []
        with torch.no_grad():
            for chunk in tokens.split(self._scoring_mbs):
                s, c = scoring_losses(module, chunk.to(device), ignore_index=self.es.ignore_index)
                sums.append(s.float().cpu())
                counts.append(c.float().cpu())
        module.train(was_training)
        loss_sum, count = torch.cat(sums), torch.cat(counts)
        loss = loss_sum / count.clamp(min=1)
        return loss, (count > 0) & torch.isfinite(loss)

    def _select(self, step: int, ids, tokens, pw):
        assert self.es is not None and self._stream is not None
        loss, valid = self._score(tokens)
        gs = select_global(
            self.es,
            self._stream.table,
            step=step,
            seed=self._seed,
            ids=ids,
            losses=loss,
            valid=valid,
            tokens=tokens,
            prune_weights=pw,
            k=self._geo.train_batch,
        )
        mine, weights = gs.rank_slice(self._rank, self._geo.train_per_rank)
        g = gs.gathered
        meta_ok = torch.isfinite(g.losses) & g.valid
        rec = {
            "scored": g.ids.numel(),
            "selected": self._geo.train_batch,
            "invalid": int((~g.valid).sum()),
            "meta_loss": float(g.losses[meta_ok].mean()) if meta_ok.any() else float("nan"),
            "digest": gs.digest,
        }
        return g.ids[mine], g.tokens[mine], weights, rec

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Weighted mean of per-sample losses (the native loop's loss); plain steps update s."""
        if self.es is None or "es_weights" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        assert self._stream is not None
        input_ids = inputs["input_ids"]
        outputs = model(input_ids=input_ids)
        per_sample, _ = _sample_losses(outputs.logits, input_ids, self.es.ignore_index)
        loss = (per_sample * inputs["es_weights"].to(per_sample.device)).mean()
        if bool(inputs["es_update"]):
            losses = per_sample.detach().float().cpu()
            ids = inputs["es_ids"].cpu()
            table = self._stream.table
            _, s_new = method_weights(
                "ema", table.gather(ids), losses, self.es.beta1, self.es.beta2
            )
            table.update(ids, s_new, torch.isfinite(losses))
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ bookkeeping
    def _log_step(self, step: int, phase: Phase, epoch: int, rec: dict[str, Any]) -> None:
        record = {
            "type": "step",
            "step": step + 1,  # steps done after this one, as in the native metrics.jsonl
            "epoch": epoch,
            "phase": phase.name.lower(),
            "scored": rec["scored"],
            "selected": rec["selected"],
            "invalid": rec["invalid"],
            "meta_loss": rec.get("meta_loss"),
            "selection_digest": rec["digest"],
        }
        self.es_log.append(record)
        if self.args.process_index == 0:
            path = Path(self.args.output_dir) / "es_metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if self.es is not None and resume_from_checkpoint:
            raise NotImplementedError(
                "ESTrainer cannot resume yet: the ES scores and data position are not saved "
                "with Trainer checkpoints (use `es-llm train`, which resumes exactly)"
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)
