"""The ES training loop over a DeepSpeed engine.

One optimizer step of ES, on every data-parallel rank:

1. draw this rank's `B_meta / W` samples of the epoch order (its own shard, pruned by the
   ESWP plan when pruning is on);
2. score them with a no-grad forward (`scoring_losses`, the kernel dispatcher);
3. all-gather ids, losses, previous scores, validity, loss weights and tokens;
4. compute the identical global selection on every rank (`select_step`), update the scores
   this rank owns;
5. rank r back-propagates its slice `B / W` of the selection in micro-batches and steps the
   engine (gradient accumulation is DeepSpeed's).

Burn-in, annealing, `uniform` and `prune` steps skip 2-4 and train a plain batch of `B`; the
per-sample losses of that training forward update the scores for free.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from es_llm import dist
from es_llm.config import EvolvedSamplingConfig
from es_llm.core.policies import method_weights
from es_llm.core.pruning import EpochPlan, anneal_epoch
from es_llm.core.schedule import Phase, phase_for_step, resolve_burn_in_steps
from es_llm.core.scores import ScoreTable
from es_llm.core.selector import selection_digest
from es_llm.data import load_corpus
from es_llm.data.sharding import RankSampler, shard_range
from es_llm.errors import InputError
from es_llm.eswp import lockstep_available, plan_epoch_global
from es_llm.model import build_model, count_parameters, load_model_preset
from es_llm.train import checkpoint as ckpt
from es_llm.train.dsconfig import deepspeed_config, es_config_for_run, load_ds_config
from es_llm.train.geometry import BatchGeometry, resolve_geometry
from es_llm.train.global_selection import select_global
from es_llm.train.metrics import MetricsWriter, plot_loss_curves, write_json_atomic
from es_llm.train.scoring import scoring_losses

TIMERS = ("score_fwd_s", "select_s", "train_fwd_bwd_s", "optimizer_s")


@dataclass
class TrainOptions:
    """Everything `es-llm train` takes; see `es_llm.cli` for the flags."""

    out: Path
    config: str = "cpu_tiny"
    model: str = "gpt2-tiny"
    data: str | None = None
    val_data: str | None = None  # a separate clean validation source (--val-data)
    tokenizer: str | None = None
    cache_dir: str | None = None
    method: str | None = None
    es_overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int = 2
    max_steps: int | None = None
    seed: int = 0
    seq_len: int = 128
    vocab_size: int = 4096
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    eval_every: int | None = None
    progress: bool = True
    max_wall_clock_s: float | None = None
    save_every: int | None = None  # checkpoint every N steps (and at a stop / the end)
    resume: bool = False  # continue the run in `out` from its newest complete checkpoint
    stop_after: int | None = None  # stop after step N without changing the planned schedule
    max_cpu_time_s: float | None = None  # the same budget in process CPU time (shared machines)


class TrainingError(InputError):
    """A run cannot start or continue; the message says why and what to change."""


def _sample_losses(logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int):
    """Per-sequence mean token cross-entropy (with grad) of a causal LM; 0 where no token."""
    labels = input_ids[:, 1:]
    lg = logits[:, :-1, :].float()
    tok = F.cross_entropy(
        lg.reshape(-1, lg.size(-1)), labels.reshape(-1), reduction="none", ignore_index=ignore_index
    ).view(labels.shape)
    count = (labels != ignore_index).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1), count


class ESRun:
    """A training run: corpus shard, engine, ES state, and the step loop."""

    def __init__(self, opts: TrainOptions) -> None:
        self.opts = opts
        self.timers = dict.fromkeys(TIMERS, 0.0)
        self.totals = {"bp_samples": 0, "scored_samples": 0, "invalid_samples": 0, "pruned": 0}
        self.val_history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.train_clock = 0.0  # training wall-clock, evaluation excluded
        self.train_cpu = 0.0  # process CPU time of the same spans (robust to a busy machine)
        self.eval_clock = 0.0
        self.resumed_from: Path | None = None
        self._last_saved_step: int | None = None
        self._plan_restored = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed

        opts = self.opts
        # validate the configs before any process group exists: bad input fails fast
        ds_config = load_ds_config(opts.config)
        self.es: EvolvedSamplingConfig = es_config_for_run(ds_config, opts.method, opts.es_overrides)
        self.method = self.es.method
        dist.ensure_launcher_env()
        self.geo: BatchGeometry = resolve_geometry(
            ds_config, int(os.environ["WORLD_SIZE"]), self.es.effective_selection_ratio
        )
        timeout = dist.collective_timeout()
        deepspeed.init_distributed(
            dist_backend=None, verbose=False, **({"timeout": timeout} if timeout else {})
        )
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        dist.share_cpu_threads()
        self.seed = self.es.resolved_seed(opts.seed)
        torch.manual_seed(opts.seed)  # model init only; ES randomness is counter-based

        if self.is_main:  # build the cache once; the other ranks then hit it
            corpus = self._load_corpus(progress=opts.progress)
        dist_barrier()
        if not self.is_main:
            corpus = self._load_corpus(progress=False)
        self.corpus = corpus
        n = len(corpus.train)
        if n == 0:
            raise TrainingError("the training split is empty")
        lo, hi = shard_range(n, self.rank, self.world)
        self.lo, self.hi, self.num_samples = lo, hi, n
        self.shard = corpus.train.select(range(lo, hi)).with_format("numpy", columns=["input_ids"])
        vlo, vhi = shard_range(len(corpus.val), self.rank, self.world)
        self.val_shard = corpus.val.select(range(vlo, vhi)).with_format("numpy", columns=["input_ids"])
        min_local = dist.all_reduce_min_int(hi - lo)
        need = self.geo.meta_per_rank if self.es.uses_scoring_forward else self.geo.train_per_rank
        if min_local < need:
            raise TrainingError(
                f"{n} training sequences give rank shards of {min_local}, fewer than one "
                f"{'meta-' if self.es.uses_scoring_forward else ''}batch of {need} per rank: "
                f"use more data, a shorter --seq-len or a smaller batch"
            )

        self.table = ScoreTable(hi - lo, offset=lo, s_init=self.es.resolved_s_init(n))
        self.sampler = RankSampler(hi - lo, offset=lo, seed=self.seed, rank=self.rank)
        self.plan: EpochPlan | None = None

        self.total_steps = self._estimate_total_steps(min_local)
        if opts.max_steps is not None:
            self.total_steps = min(self.total_steps, opts.max_steps)
        steps_per_epoch = max(1, min_local // need)
        self.burn_in_steps = (
            resolve_burn_in_steps(self.es, self.total_steps, steps_per_epoch)
            if self.es.uses_scoring_forward
            else 0
        )
        self.steps_per_epoch = steps_per_epoch

        preset = load_model_preset(opts.model)
        model = build_model(preset, vocab_size=corpus.vocab_size, seq_len=corpus.seq_len)
        self.num_params = count_parameters(model)
        self.ds_config = deepspeed_config(ds_config, self.geo, self.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=self.ds_config
        )
        self.scoring_mbs = self.es.scoring_micro_batch_size or 2 * self.geo.micro
        self.out = Path(opts.out)
        if opts.resume:
            self.resumed_from = ckpt.load_checkpoint(self, self.out)
            self._last_saved_step = self.step
            self._plan_restored = self.plan is not None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is not None:
                ckpt.rewind_metrics(self.out / "metrics.jsonl", self.step)
            self.metrics = MetricsWriter(
                self.out / "metrics.jsonl", append=self.resumed_from is not None
            )
            if self.resumed_from is not None:
                self.metrics.write(
                    {"type": "resume", "step": self.step, "checkpoint": str(self.resumed_from)}
                )

    def _load_corpus(self, progress: bool):
        o = self.opts
        return load_corpus(
            o.data,
            val_data=o.val_data,
            seq_len=o.seq_len,
            cache_dir=o.cache_dir,
            vocab_size=o.vocab_size,
            max_train_samples=o.max_train_samples,
            max_val_samples=o.max_val_samples,
            tokenizer=o.tokenizer,
            progress=progress,
        )

    def _estimate_total_steps(self, min_local: int) -> int:
        """Planned optimizer steps, for the LR schedule and the burn-in/anneal boundaries.

        Selection steps consume B_meta, plain ones B; burn-in is short, so epochs are
        counted at the selection rate. Pruned epochs count the expected kept share (half of
        the samples below the mean, each pruned with prune_ratio).
        """
        per_rank = self.geo.meta_per_rank if self.es.uses_scoring_forward else self.geo.train_per_rank
        total = 0
        a_epoch = anneal_epoch(self.es.delta, self.opts.epochs)
        for e in range(self.opts.epochs):
            kept = min_local
            if self.es.uses_pruning and 0 < e < a_epoch:
                kept = int(min_local * (1 - 0.5 * self.es.prune_ratio))
            total += kept // per_rank
        return max(1, total)

    # ------------------------------------------------------------------ data
    def _tokens(self, local_idx: torch.Tensor) -> torch.Tensor:
        rows = self.shard[local_idx.tolist()]["input_ids"]
        return torch.from_numpy(np.asarray(rows, dtype=np.int64))

    def _plan_epoch(self, epoch: int) -> None:
        if not self.es.uses_pruning:
            self.plan = None
            return
        self.plan = plan_epoch_global(
            self.table, self.es, epoch=epoch, epochs=self.opts.epochs, seed=self.seed
        )

    def _save(self) -> None:
        ckpt.save_checkpoint(self, ckpt.checkpoint_root(self.out))
        self._last_saved_step = self.step

    # ------------------------------------------------------------------ steps
    def _phase(self) -> Phase:
        if not self.es.uses_scoring_forward:
            return Phase.ANNEAL  # plain batches of B (uniform, prune)
        return phase_for_step(self.step, self.total_steps, self.es, self.steps_per_epoch)

    def _score(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.engine.module
        was_training = module.training
        module.eval()
        sums, counts = [], []
        with torch.no_grad():
            for chunk in tokens.split(self.scoring_mbs):
                s, c = scoring_losses(
                    module, chunk.to(self.engine.device), ignore_index=self.es.ignore_index
                )
                sums.append(s.float().cpu())
                counts.append(c.float().cpu())
        module.train(was_training)
        loss_sum, count = torch.cat(sums), torch.cat(counts)
        loss = loss_sum / count.clamp(min=1)
        valid = (count > 0) & torch.isfinite(loss)
        return loss, valid

    def _train_batch(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Forward/backward this rank's B/W samples in micro-batches; engine steps inside."""
        losses = []
        micro = self.geo.micro
        for i in range(0, tokens.size(0), micro):
            mb = tokens[i : i + micro].to(self.engine.device)
            w = weights[i : i + micro].to(self.engine.device)
            t0 = time.perf_counter()
            out = self.engine(input_ids=mb)
            per_sample, _ = _sample_losses(out.logits, mb, self.es.ignore_index)
            loss = (per_sample * w).mean()
            self.engine.backward(loss)
            t1 = time.perf_counter()
            self.engine.step()
            t2 = time.perf_counter()
            self.timers["train_fwd_bwd_s"] += t1 - t0
            self.timers["optimizer_s"] += t2 - t1
            losses.append(per_sample.detach().float().cpu())
        return torch.cat(losses)

    def _local_weights(self, local_idx: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            return torch.ones(local_idx.numel())
        return self.plan.loss_weights(local_idx).float()

    def _plain_step(self, local_idx: torch.Tensor) -> dict[str, Any]:
        """Uniform / prune / burn-in / anneal: train B, update scores from the training loss."""
        ids = local_idx + self.lo
        tokens = self._tokens(local_idx)
        losses = self._train_batch(tokens, self._local_weights(local_idx))
        if self.method != "uniform":
            valid = torch.isfinite(losses)
            _, s_new = method_weights(
                "ema", self.table.gather(ids), losses, self.es.beta1, self.es.beta2
            )
            self.table.update(ids, s_new, valid)
        all_ids = dist.all_gather_cat(ids)
        all_losses = dist.all_gather_cat(losses)
        n = all_ids.numel()
        self.totals["bp_samples"] += n
        return {
            "train_loss": float(all_losses.mean()),
            "scored": 0,
            "selected": n,
            "invalid": 0,
            "digest": selection_digest(all_ids),
        }

    def _es_step(self, local_idx: torch.Tensor) -> dict[str, Any]:
        ids = local_idx + self.lo
        tokens = self._tokens(local_idx)
        t0 = time.perf_counter()
        loss, valid = self._score(tokens)
        t1 = time.perf_counter()
        gs = select_global(
            self.es,
            self.table,
            step=self.step,
            seed=self.seed,
            ids=ids,
            losses=loss,
            valid=valid,
            tokens=tokens,
            prune_weights=self._local_weights(local_idx),
            k=self.geo.train_batch,
        )
        t2 = time.perf_counter()
        mine, weights = gs.rank_slice(self.rank, self.geo.train_per_rank)
        g, sel = gs.gathered, gs.selection
        self._train_batch(g.tokens[mine], weights)
        self.timers["score_fwd_s"] += t1 - t0
        self.timers["select_s"] += t2 - t1  # all-gather + selection + score update
        n_invalid = int((~g.valid).sum())
        self.totals["bp_samples"] += self.geo.train_batch
        self.totals["scored_samples"] += g.ids.numel()
        self.totals["invalid_samples"] += n_invalid
        sel_losses = g.losses[sel.positions]
        finite = torch.isfinite(sel_losses) & g.valid[sel.positions]
        meta_finite = torch.isfinite(g.losses) & g.valid
        return {
            "train_loss": float(sel_losses[finite].mean()) if finite.any() else float("nan"),
            "scored": g.ids.numel(),
            "selected": self.geo.train_batch,
            "invalid": n_invalid,
            "meta_loss": float(g.losses[meta_finite].mean()) if meta_finite.any() else float("nan"),
            "digest": gs.digest,
        }

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> float:
        t0 = time.perf_counter()
        total, count = 0.0, 0.0
        module = self.engine.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            n = len(self.val_shard)
            for i in range(0, n, self.scoring_mbs):
                rows = self.val_shard[i : min(n, i + self.scoring_mbs)]["input_ids"]
                tokens = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.engine.device)
                s, c = scoring_losses(module, tokens, ignore_index=self.es.ignore_index)
                total += float(s.double().sum())
                count += float(c.double().sum())
        module.train(was_training)
        total, count = dist.all_reduce_sum([total, count])
        self.eval_clock += time.perf_counter() - t0
        return total / count if count > 0 else float("nan")

    def _record_eval(self, where: str) -> float:
        val = self.evaluate()
        rec = {
            "type": "eval",
            "step": self.step,
            "epoch": self.epoch,
            "where": where,
            "val_loss": val,
            "wall_clock_s": self.train_clock,
            "cpu_time_s": self.train_cpu,
            "bp_samples": self.totals["bp_samples"],
        }
        self.val_history.append(rec)
        if self.is_main:
            self.metrics.write(rec)
        return val

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        opts = self.opts
        bar = tqdm(
            total=self.total_steps,
            desc=f"{self.method} x{self.world}",
            disable=not (self.is_main and opts.progress),
            dynamic_ncols=True,
        )
        if self.resumed_from is None:
            self._record_eval("start")
        stop = False
        last = time.perf_counter()
        # a resumed run continues in the sampler's epoch (past the last one when it had finished)
        for epoch in range(self.sampler.epoch, opts.epochs):
            self.epoch = epoch
            self.sampler.set_epoch(epoch)
            # mid-epoch resume: the saved plan, not one from the scores updated since
            restored = self._plan_restored and self.plan is not None and self.plan.epoch == epoch
            self._plan_restored = False
            if not restored:
                self._plan_epoch(epoch)
            keep = self.plan.keep if self.plan is not None else None
            order = self.sampler.order(keep)
            available = lockstep_available(self.sampler, self.plan)
            if self.plan is not None and not restored:
                pruned = int((~self.plan.keep).sum())
                self.totals["pruned"] += int(dist.all_reduce_sum([float(pruned)])[0])
            while not stop:
                phase = self._phase()
                selecting = phase == Phase.SELECT
                need = self.geo.meta_per_rank if selecting else self.geo.train_per_rank
                pos = self.sampler.position
                if pos + need > available:
                    break
                local_idx = order[pos : pos + need]
                t0, c0 = time.perf_counter(), time.process_time()
                rec = self._es_step(local_idx) if selecting else self._plain_step(local_idx)
                self.sampler.advance(need)
                dist.check_lockstep(rec["digest"])
                now = time.perf_counter()
                self.train_clock += now - t0
                self.train_cpu += time.process_time() - c0
                self.step += 1
                lr = self.engine.get_lr()[0] if self.engine.lr_scheduler is not None else None
                record = {
                    "type": "step",
                    "step": self.step,
                    "epoch": epoch,
                    "phase": phase.name.lower(),
                    "train_loss": rec["train_loss"],
                    "lr": lr,
                    "scored": rec["scored"],
                    "selected": rec["selected"],
                    "invalid": rec["invalid"],
                    "meta_loss": rec.get("meta_loss"),
                    "wall_clock_s": self.train_clock,
                    "cpu_time_s": self.train_cpu,
                    "step_s": now - t0,
                    "selection_digest": rec["digest"],
                }
                if self.is_main:
                    self.metrics.write(record)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['train_loss']:.3f}",
                        samples_s=f"{rec['selected'] / max(now - last, 1e-9):.0f}",
                    )
                last = now
                if opts.eval_every and self.step % opts.eval_every == 0:
                    self._record_eval("interval")
                if (opts.max_steps is not None and self.step >= opts.max_steps) or (
                    opts.max_wall_clock_s is not None and self.train_clock >= opts.max_wall_clock_s
                ) or (opts.max_cpu_time_s is not None and self.train_cpu >= opts.max_cpu_time_s):
                    stop = True
                if opts.stop_after is not None and self.step >= opts.stop_after:
                    stop = True
                if opts.save_every and (stop or self.step % opts.save_every == 0):
                    self._save()
            self._record_eval("stop" if stop else "epoch_end")
            if stop:
                break
            self.sampler.set_epoch(epoch + 1)
        bar.close()
        if opts.save_every and self._last_saved_step != self.step:
            self._save()  # the finished state: resuming it runs no more steps
        final = self.val_history[-1]["val_loss"]
        return self._finish(final)

    def _finish(self, final_val: float) -> dict[str, Any]:
        steps = max(1, self.step)
        summary: dict[str, Any] = {
            "method": self.method,
            "world_size": self.world,
            "zero_stage": int(self.engine.zero_optimization_stage()),
            "wall_clock_s": self.train_clock,
            "eval_wall_clock_s": self.eval_clock,
            "cpu_time_s": self.train_cpu,
            "steps": self.step,
            "epochs": self.epoch + 1,
            "bp_samples": self.totals["bp_samples"],
            "scored_samples": self.totals["scored_samples"],
            "invalid_samples": self.totals["invalid_samples"],
            "pruned_sample_epochs": self.totals["pruned"],
            "final_val_loss": final_val,
            "val_history": [
                {k: r[k] for k in ("step", "epoch", "val_loss", "wall_clock_s", "cpu_time_s")}
                for r in self.val_history
            ],
            "time_breakdown_s": dict(self.timers),
            "time_breakdown_per_step_s": {k: v / steps for k, v in self.timers.items()},
            "train_samples": self.num_samples,
            "val_samples": len(self.corpus.val),
            "data_composition": self.corpus.composition,
            "seq_len": self.corpus.seq_len,
            "vocab_size": self.corpus.vocab_size,
            "model": self.opts.model,
            "model_parameters": self.num_params,
            "batch": {
                "train_batch_size": self.geo.train_batch,
                "meta_batch_size": self.geo.meta_batch,
                "micro_batch_size": self.geo.micro,
                "gradient_accumulation_steps": self.geo.grad_accum,
            },
            "evolved_sampling": self.es.model_dump(),
            "seed": self.opts.seed,
            "planned_steps": self.total_steps,
            "burn_in_steps": self.burn_in_steps,
        }
        if self.is_main:
            self.metrics.close()
            write_json_atomic(self.out / "summary.json", summary)
            plot_loss_curves(
                self.out / "metrics.jsonl", self.out / "loss_curve.png", f"es-llm {self.method}"
            )
        return summary


def dist_barrier() -> None:
    if dist.is_initialized():
        torch.distributed.barrier()


def train(opts: TrainOptions) -> dict[str, Any]:
    """Run one training job end to end and return its summary (every rank returns it)."""
    run = ESRun(opts)
    try:
        run.setup()
        return run.run()
    finally:
        dist.destroy()
