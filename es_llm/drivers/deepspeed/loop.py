"""The ES training loop over a DeepSpeed engine.

One optimizer step, on every data-parallel rank, driven through `ESDataPath`
(`es_llm/sampling/datapath.py`, shared with the HF Trainer):

1. `next_step()`: this rank's `B_meta / W` samples of the epoch order (its own shard, pruned
   by the ESWP plan when pruning is on), or `B / W` in burn-in / anneal / uniform / prune;
2. `assign()`: in a SELECT step, score them with a no-grad forward, all-gather the per-sample
   records, select globally, update the owned scores and assign the chosen samples to ranks
   locality-first; otherwise the draw itself is the batch;
3. this loop back-propagates the rank's `B / W` samples in micro-batches and steps the engine
   (gradient accumulation is DeepSpeed's); in plain steps the per-sample training losses
   update the scores (`observe_training_losses`);
4. `finish_step()`: the step's record (digest, losses, counts) for metrics.jsonl.

The run's shape (batch geometry, planned steps, burn-in, scoring micro-batch) is its
`RunPlan` (`es_llm/sampling/plan.py`), built once in `setup`. The run stops at the planned
step count, at `--max-steps`, at a budget, at `--stop-after`, or at SIGINT/SIGTERM (a
checkpoint of the step it stopped at is written unless `--no-save-on-stop`). Evaluation
follows `validation.py`: a fixed validation subset about ten times over the run, the whole
split at the end.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from es_llm import dist
from es_llm.base_models import base_for_run, is_base_spec
from es_llm.data import load_corpus
from es_llm.data.documents import DEFAULT_VAL_SHARE
from es_llm.data.sharding import shard_range
from es_llm.drivers.deepspeed import checkpoint as ckpt
from es_llm.drivers.deepspeed import validation
from es_llm.drivers.deepspeed.dsconfig import deepspeed_config, es_config_for_run, load_ds_config
from es_llm.drivers.deepspeed.export import export_model
from es_llm.drivers.deepspeed.metrics import (
    MetricsWriter,
    plot_loss_curves,
    plot_title,
    write_json_atomic,
)
from es_llm.drivers.deepspeed.monitor import MonitorHooks, route_output
from es_llm.drivers.deepspeed.seam import es_data_path
from es_llm.drivers.deepspeed.stopping import RunStopped, StopRequest
from es_llm.drivers.losses import weighted_step_loss
from es_llm.drivers.reference import reference_for_run, spec_from_options
from es_llm.drivers.scoring import scoring_losses
from es_llm.drivers.steplog import step_record
from es_llm.errors import InputError, NonFiniteError
from es_llm.model import count_parameters, load_model, resolve_model, tokenizer_for
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.datapath import StepAssignment
from es_llm.sampling.geometry import BatchGeometry
from es_llm.sampling.methods.excess import REF_LOSS
from es_llm.sampling.plan import RunPlan, plan_geometry
from es_llm.sampling.timing import TIMERS

__all__ = ["TIMERS", "ESRun", "TrainOptions", "TrainingError", "train"]


@dataclass
class TrainOptions:
    """Everything `es-llm train` takes; see `es_llm.cli` for the flags."""

    out: Path
    config: str = "cpu_tiny"
    model: str = "gpt2-tiny"
    data: str | None = None
    val_data: str | None = None  # a separate clean validation source (--val-data)
    val_share: float = 0.05  # share of split groups held out (--val-share; data.documents)
    tokenizer: str | None = None
    cache_dir: str | None = None
    method: str | None = None
    scorer: str | None = None  # --scorer: evolved_sampling.scorer
    proxy_model: str | None = None  # --proxy-model: evolved_sampling.proxy_model
    proxy_path: str | None = None  # the directory a base: proxy_model was built into
    es_overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int = 2
    max_steps: int | None = None
    seed: int = 0
    seq_len: int = 128
    vocab_size: int = 4096
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    eval_every: int | None = None  # evaluate the validation subset every N steps
    eval_points: int = validation.DEFAULT_POINTS  # else at about this many spread steps
    eval_subset: int = validation.DEFAULT_SUBSET  # sequences in the fixed validation subset
    progress: bool = True
    max_wall_clock_s: float | None = None
    save_every: int | None = None  # checkpoint every N steps (and at a stop / the end)
    resume: bool = False  # continue the run in `out` from its newest complete checkpoint
    stop_after: int | None = None  # stop after step N without changing the planned schedule
    max_cpu_time_s: float | None = None  # the same budget in process CPU time (shared machines)
    save_on_stop: bool = True  # SIGINT/SIGTERM writes a checkpoint of the step it stopped at
    reference_data: str | None = None  # clean source of the reference model (methods excess*)
    reference_model: str = "gpt2-tiny"  # its preset, or a pretrained HF model directory
    reference_steps: int | None = None
    reference_epochs: int | None = None


class TrainingError(InputError):
    """A run cannot start or continue; the message says why and what to change."""


class ESRun:
    """A training run: corpus, engine, the ES data path, and the step loop.

    `wrap_scorer` (optional) receives the default model scorer and returns the scorer the
    data path uses: the seam for tests and custom scoring.
    """

    def __init__(self, opts: TrainOptions, wrap_scorer: Any = None) -> None:
        self.opts = opts
        self.wrap_scorer = wrap_scorer
        self.val_history: list[dict[str, Any]] = []
        self.train_clock = 0.0  # training wall-clock, evaluation excluded
        self.train_cpu = 0.0  # process CPU time of the same spans (robust to a busy machine)
        self.eval_clock = 0.0
        self.resumed_from: Path | None = None
        self._last_saved_step: int | None = None
        self._saved_steps: list[int] = []  # checkpoints this run wrote or resumed from
        self.stop = StopRequest()  # `train()` installs the signal handlers
        self._val_shards: dict[int, tuple[Any, int]] = {}  # rows evaluated -> this rank's shard
        self._timer_totals: dict[str, float] = {}  # ES timers at the previous step's record

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed

        opts = self.opts
        # validate the configs before any process group exists: bad input fails fast
        ds_config = load_ds_config(opts.config)
        self.es: EvolvedSamplingConfig = es_config_for_run(
            ds_config,
            opts.method,
            opts.es_overrides,
            scorer=opts.scorer,
            proxy_model=opts.proxy_model,
        )
        self.method = self.es.method
        self.uses_reference = REF_LOSS in self.es.sampling_method.state
        if self.uses_reference:  # a missing reference fails before any process starts
            spec_from_options(opts).check()
        dist.ensure_launcher_env()
        plan_geometry(ds_config, self.es, int(os.environ["WORLD_SIZE"]))  # fails before init
        if self.es.proxy and is_base_spec(self.es.proxy_model) and opts.proxy_path is None:
            # its cached base, built once (a child run, as --model base: is) before any
            # process group; it shares the learner's tokenizer when the learner is a base of
            # the same vocabulary and seq_len (the scorer's set-up checks it)
            rank0 = int(os.environ.get("RANK", "0")) == 0
            opts.proxy_path = str(
                base_for_run(self.es.proxy_model, opts, progress=opts.progress and rank0)
            )
        timeout = dist.collective_timeout()
        deepspeed.init_distributed(
            dist_backend=None, verbose=False, **({"timeout": timeout} if timeout else {})
        )
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        dist.share_cpu_threads()
        torch.manual_seed(opts.seed)  # model init only; ES randomness is counter-based

        if self.is_main:  # build the cache once; the other ranks then hit it
            corpus = self._load_corpus(progress=opts.progress)
        dist.barrier()
        if not self.is_main:
            corpus = self._load_corpus(progress=False)
        self.corpus = corpus
        self.device = dist.accelerator_device()
        self.plan = RunPlan.build(
            ds_config,
            self.es,
            dp_size=self.world,
            num_samples=len(corpus.train),
            epochs=opts.epochs,
            seed=opts.seed,
            max_steps=opts.max_steps,
        )
        self.geo: BatchGeometry = self.plan.geo
        ref_loss = None
        self.reference: dict[str, Any] | None = None
        # before the model is built: one of the two at a time. A resumed run restores l_ref
        # and the reference's report from its checkpoint (_resume) and pays neither again.
        if self.uses_reference and not opts.resume:
            lo, hi = shard_range(len(corpus.train), self.rank, self.world)
            ref_loss, self.reference = reference_for_run(
                opts,
                corpus,
                ds_config,
                lo=lo,
                hi=hi,
                micro_batch=self.plan.scoring_micro_batch,
                device=self.device,
                ignore_index=self.es.ignore_index,
            )

        model = load_model(
            resolve_model(opts.model),
            vocab_size=corpus.vocab_size,
            seq_len=corpus.seq_len,
            eod_id=corpus.eod_id,
        )
        self.num_params = count_parameters(model)
        self.ds_config = route_output(
            deepspeed_config(ds_config, self.geo, self.plan.total_steps), Path(opts.out)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=self.ds_config
        )
        self.scoring_mbs = self.plan.scoring_micro_batch
        self.data = es_data_path(
            self.engine,
            corpus.train,
            self.plan,
            wrap_scorer=self.wrap_scorer,
            ds_config=ds_config,
            proxy_path=opts.proxy_path,
            learner_vocab=corpus.tokenizer_path,
            vocab_size=corpus.vocab_size,
            eod_id=corpus.eod_id,
        )
        if ref_loss is not None:
            self.data.store.set_column(REF_LOSS, ref_loss)
        self.out = Path(opts.out)
        self.monitor = MonitorHooks(self.engine, self.is_main)
        if opts.resume:
            self._resume()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is not None:
                ckpt.rewind_metrics(self.out / "metrics.jsonl", self.data.step)
            self.metrics = MetricsWriter(
                self.out / "metrics.jsonl", append=self.resumed_from is not None
            )
            if self.resumed_from is not None:
                self.metrics.write(
                    {"type": "resume", "step": self.data.step, "checkpoint": str(self.resumed_from)}
                )

    def _load_corpus(self, progress: bool):
        o = self.opts
        return load_corpus(
            o.data,
            val_data=o.val_data,
            val_share=o.val_share,
            seq_len=o.seq_len,
            cache_dir=o.cache_dir,
            vocab_size=o.vocab_size,
            max_train_samples=o.max_train_samples,
            max_val_samples=o.max_val_samples,
            tokenizer=tokenizer_for(o.model, o.tokenizer),
            progress=progress,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's run state: the data path's plus what only the loop keeps."""
        return {
            "es": self.data.state_dict(),
            "fingerprint": self._fingerprint(),
            "val_history": self.val_history,
            "train_clock": self.train_clock,
            "eval_clock": self.eval_clock,
            "train_cpu": self.train_cpu,
            "reference": self.reference,
        }

    def _fingerprint(self) -> dict[str, Any]:
        """What the corpus must share with a checkpoint's run (a different --val-share is a
        different split, whatever the sample counts)."""
        return {
            "seq_len": self.corpus.seq_len,
            "vocab_size": self.corpus.vocab_size,
            "val_share": self.opts.val_share,
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        now = self._fingerprint()
        # a checkpoint from before --val-share held out the default share
        saved = {"val_share": DEFAULT_VAL_SHARE, **state["fingerprint"]}
        if saved != now:
            raise ckpt.CheckpointError(
                f"{source} was written by a different run configuration (checkpoint "
                f"{saved!r}, now {now!r}); resume with the same flags and config"
            )
        self.data.load_state_dict(state["es"], source=source)
        self.val_history = list(state["val_history"])
        self.train_clock = float(state["train_clock"])
        self.eval_clock = float(state["eval_clock"])
        self.train_cpu = float(state["train_cpu"])
        if self.uses_reference:  # l_ref itself came back with the data path's score store
            saved = state.get("reference")
            self.reference = None if saved is None else {**saved, "restored": True}

    def _save(self) -> Path:
        # the last SELECT step's training losses are checked here: never checkpoint NaN
        self._check_training_finite(self.data.nonfinite_step())
        tag_dir = ckpt.save_checkpoint(
            self.engine,
            ckpt.checkpoint_root(self.out),
            step=self.data.step,
            state=ckpt.rank_state(self.state_dict()),
        )
        self._last_saved_step = self.data.step
        self._saved_steps.append(self.data.step)
        return tag_dir

    def _resume(self) -> None:
        tag_dir, state = ckpt.load_checkpoint(self.engine, self.out)
        self.load_state_dict(state["run"], str(tag_dir / ckpt.es_state_file(self.rank)))
        ckpt.restore_rng(state)
        self.resumed_from = tag_dir
        self._last_saved_step = self.data.step
        self._saved_steps.append(self.data.step)

    # ------------------------------------------------------------------ non-finite losses
    def _nonfinite(self, what: str, step: int) -> NonFiniteError:
        """The one-line error of a NaN/inf `what` at `step`, naming the last good checkpoint
        (the newest one written before that step)."""
        good = [s for s in self._saved_steps if s < step]
        if good:
            tag = ckpt.checkpoint_root(self.out) / ckpt.tag_for_step(max(good))
            last = f"the last good checkpoint is {tag} (--resume {self.out} continues from it)"
        else:
            last = "no checkpoint was written before it (--save-every N writes them)"
        return NonFiniteError(
            f"the {what} of step {step} is not finite (NaN or inf) on at least one rank: the "
            f"run is stopped and no model is exported; {last}. A learning rate that is too "
            f"high, or corrupt input, are the usual causes"
        )

    def _check_training_finite(self, step: int | None) -> None:
        if step is not None:
            raise self._nonfinite("training loss", step)

    # ------------------------------------------------------------------ one step
    def _train(self, a: StepAssignment) -> None:
        """Forward/backward this rank's B/W samples in micro-batches; the engine steps inside."""
        timers = self.data.timers
        micro = self.geo.micro
        for i in range(0, a.tokens.size(0), micro):
            mb = a.tokens[i : i + micro]
            labels = a.labels[i : i + micro] if a.labels is not None else None
            with timers.span("train_fwd_bwd_s"):
                out = self.engine(input_ids=mb)
                loss, per_sample = weighted_step_loss(
                    out.logits, mb, a.loss_weights[i : i + micro], self.es.ignore_index, labels
                )
                self.engine.backward(loss)
            with timers.span("optimizer_s"):
                self.engine.step()
            self.data.observe_training_losses(a, a.ids[i : i + micro], per_sample)

    # ------------------------------------------------------------------ eval
    def _val_rows(self, n_rows: int) -> tuple[Any, int]:
        """This rank's shard of the first `n_rows` validation sequences, and its global start."""
        cache = self._val_shards
        if n_rows not in cache:
            lo, hi = shard_range(n_rows, self.rank, self.world)
            rows = self.corpus.val.select(range(lo, hi))
            columns = [c for c in ("input_ids", "labels") if c in rows.column_names]
            cache[n_rows] = (rows.with_format("numpy", columns=columns), lo)
        return cache[n_rows]

    def evaluate(self, where: str = "eval", *, full: bool = False) -> tuple[float, float]:
        """(loss on what was evaluated, loss on the fixed subset): the whole validation split
        when `full` (its first rows are the subset), else the subset only."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        module = self.engine.module
        was_training = module.training
        module.eval()
        n_total = len(self.corpus.val)
        n_sub = validation.subset_size(n_total, self.opts.eval_subset) if n_total else 0
        rows, lo = self._val_rows(n_total if full else n_sub)
        in_subset = max(0, min(len(rows), n_sub - lo))  # this shard's rows that are the subset
        # (sum, count) over everything evaluated, then over the subset rows
        acc = torch.zeros(4, dtype=torch.float64, device=self.device)
        n = len(rows)
        bar = tqdm(
            range(0, n, self.scoring_mbs),
            desc=f"validation ({where}, {n_total if full else n_sub} sequences)",
            unit="batch",
            leave=False,
            disable=not (self.is_main and self.opts.progress),
            dynamic_ncols=True,
        )
        with torch.no_grad():
            for i in bar:
                j = min(n, i + self.scoring_mbs)
                batch = rows[i:j]
                tokens = torch.from_numpy(np.asarray(batch["input_ids"], dtype=np.int64))
                labels = None
                if "labels" in batch:  # instruction data: the loss over completion tokens
                    labels = torch.from_numpy(np.asarray(batch["labels"], dtype=np.int64))
                    labels = labels.to(self.device)
                s, c = scoring_losses(
                    module,
                    tokens.to(self.device),
                    ignore_index=self.es.ignore_index,
                    labels=labels,
                )
                k = max(0, min(j, in_subset) - i)  # leading rows of this batch in the subset
                acc += torch.stack(
                    [s.double().sum(), c.double().sum(), s[:k].double().sum(), c[:k].double().sum()]
                )
        module.train(was_training)
        total, count, sub_total, sub_count = dist.all_reduce_sum(acc.tolist())
        self.eval_clock += time.perf_counter() - t0
        loss = total / count if count > 0 else float("nan")
        return loss, (sub_total / sub_count if sub_count > 0 else float("nan"))

    def _record_eval(self, where: str, epoch: int, *, full: bool = False) -> float:
        n_total = len(self.corpus.val)
        n_sub = validation.subset_size(n_total, self.opts.eval_subset) if n_total else 0
        full = full or n_sub == n_total  # a subset that is the whole split is the full set
        val, sub = self.evaluate(where, full=full)
        if (n_total and not np.isfinite(val)) or (n_sub and not np.isfinite(sub)):
            raise self._nonfinite(f"validation loss ({where})", self.data.step)
        rec = {
            "type": "eval",
            "step": self.data.step,
            "epoch": epoch,
            "where": where,
            "set": "full" if full else "subset",
            "sequences": n_total if full else n_sub,
            "val_loss": val,
            "val_subset_loss": sub,
            "subset_sequences": n_sub,
            "wall_clock_s": self.train_clock,
            "cpu_time_s": self.train_cpu,
            "bp_samples": self.data.totals["bp_samples"],
        }
        self.val_history.append(rec)
        if self.is_main:
            self.metrics.write(rec)
        self.monitor.evaluation(rec)
        return val

    def _should_stop(self) -> bool:
        o, step = self.opts, self.data.step
        return (
            (o.max_steps is not None and step >= o.max_steps)
            or (o.max_wall_clock_s is not None and self.train_clock >= o.max_wall_clock_s)
            or (o.max_cpu_time_s is not None and self.train_cpu >= o.max_cpu_time_s)
            or (o.stop_after is not None and step >= o.stop_after)
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        opts, data = self.opts, self.data
        data.stop_requested = lambda: self.stop.requested
        if self.resumed_from is None:
            self._record_eval("start", data.epoch)
        elif self.is_main:
            print(
                f"es-llm: resumed from {self.resumed_from} at step {data.step} of "
                f"{data.total_steps}, epoch {data.epoch + 1} of {opts.epochs}",
                file=sys.stderr,
                flush=True,
            )
        self._timer_totals = dict(data.timers.totals)  # per-step timer shares: see _log_step
        eval_at = validation.eval_steps(
            data.total_steps, points=opts.eval_points, every=opts.eval_every
        )
        # created after the start-up evaluation: the bar counts optimizer steps only
        bar = tqdm(
            total=data.total_steps,
            initial=data.step,
            desc=f"{self.method} x{self.world}",
            unit="step",
            disable=not (self.is_main and opts.progress),
            dynamic_ncols=True,
        )
        stop = False
        signalled = False
        trained = False
        epoch = data.epoch
        last = time.perf_counter()
        while not stop:
            t0, c0 = time.perf_counter(), time.process_time()
            draw = data.next_step()
            if draw is None:
                break
            if draw.epoch != epoch:  # the previous epoch is over: evaluate it (once a step)
                self.train_clock += time.perf_counter() - t0
                self.train_cpu += time.process_time() - c0
                if not self.val_history or self.val_history[-1]["step"] != data.step:
                    self._record_eval("epoch_end", epoch)
                bar.unpause()  # the evaluation is not step time
                epoch = draw.epoch
                t0, c0 = time.perf_counter(), time.process_time()
            lr = self._lr()  # the rate this step trains at (the engine steps the schedule)
            a = data.assign(draw)
            trained = True
            self._train(a)
            rec = data.finish_step(a)
            self._check_training_finite(rec.get("nonfinite_loss_step"))
            now = time.perf_counter()
            self.train_clock += now - t0
            self.train_cpu += time.process_time() - c0
            self._log_step(rec, now - t0, lr)
            if self.is_main:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{rec['train_loss']:.3f}",
                    samples_s=f"{rec['selected'] / max(now - last, 1e-9):.0f}",
                )
            last = now
            # a signal on any rank: every rank saw the same agreed flag in this step
            signalled = bool(rec.get("stop_requested"))
            stop = signalled or self._should_stop()
            if data.step in eval_at and not stop:
                self._record_eval("interval", epoch)
                bar.unpause()
            # a signal saves by --save-on-stop (the default) alone; other stops by --save-every
            periodic = opts.save_every and data.step % opts.save_every == 0
            if (
                periodic
                or (signalled and opts.save_on_stop)
                or (opts.save_every and stop and not signalled)
            ):
                self._save()
        finished = not stop  # every planned epoch ran
        self._check_training_finite(data.nonfinite_step())  # the last step, if it selected
        if signalled:
            # the launcher gives the ranks seconds: the checkpoint is written already, and
            # the evaluation is the fixed subset only
            self._record_eval("signal", epoch)
        elif trained or self.resumed_from is None:
            self._record_eval("stop" if stop else "end", epoch, full=True)
        if finished:
            bar.total = max(data.step, bar.n)  # pruned epochs: the true count, known only now
        bar.refresh()  # stopped: the bar keeps the planned total ("6/102")
        bar.close()
        if opts.save_every and self._last_saved_step != data.step and not signalled:
            self._save()  # the finished state: resuming it runs no more steps
        summary = self._finish(stopped=signalled, finished=finished)
        if signalled:
            raise RunStopped(self._stop_message(), self.stop.exit_code)
        return summary

    def _checkpoint_saved(self) -> Path | None:
        """The checkpoint of the step the run ended at, when one was written."""
        if self._last_saved_step != self.data.step:
            return None
        return ckpt.checkpoint_root(self.out) / ckpt.tag_for_step(self.data.step)

    def _stop_message(self) -> str:
        name = self.stop.signal_name or "a signal on another rank"
        head = (
            f"stopped by {name} after step {self.data.step} of {self.data.total_steps}; "
            f"summary and plot in {self.out}/"
        )
        tag = self._checkpoint_saved()
        if tag is not None:
            return f"{head}; checkpoint {tag}; to continue, run the same command with --resume {self.out}"
        return f"{head}; no checkpoint was written (--no-save-on-stop)"

    def _lr(self) -> float | None:
        """The optimizer's current learning rate (a host float: no device sync)."""
        if self.engine.lr_scheduler is None:
            return None
        return float(self.engine.get_lr()[0])

    def _log_step(self, rec: dict[str, Any], step_s: float, lr: float | None) -> None:
        # the ES timers' totals so far (device spans count once resolved at a later host
        # sync: reading them never waits for the device); the step's share is the difference
        totals = dict(self.data.timers.totals)
        before, self._timer_totals = self._timer_totals, totals
        if not self.is_main:
            return
        record = {
            **step_record(rec),
            "lr": lr,
            "wall_clock_s": self.train_clock,
            "cpu_time_s": self.train_cpu,
            "step_s": step_s,
            **{k: v - before.get(k, 0.0) for k, v in totals.items()},
        }
        self.metrics.write(record)
        self.monitor.step(record)

    def _final_validation(self) -> tuple[float, dict[str, Any] | None]:
        """The summary's final validation loss and what it is: the last evaluation (the whole
        split at the end, the fixed subset at a signalled stop), with its step and set."""
        if not self.val_history:
            return float("nan"), None
        last = self.val_history[-1]
        return last["val_loss"], {
            "step": last["step"],
            "where": last["where"],
            "set": last["set"],
            "sequences": last["sequences"],
        }

    def _finish(self, *, stopped: bool = False, finished: bool = False) -> dict[str, Any]:
        data = self.data
        timers = data.timers.state_dict()
        steps = max(1, data.step)
        final_val, final_of = self._final_validation()
        checkpoint = self._checkpoint_saved()
        summary: dict[str, Any] = {
            "method": self.method,
            "world_size": self.world,
            "zero_stage": int(self.engine.zero_optimization_stage()),
            "wall_clock_s": self.train_clock,
            "eval_wall_clock_s": self.eval_clock,
            "cpu_time_s": self.train_cpu,
            "steps": data.step,
            "epochs": data.epoch + 1,
            "bp_samples": data.totals["bp_samples"],
            "scored_samples": data.totals["scored_samples"],
            "invalid_samples": data.totals["invalid_samples"],
            "pruned_sample_epochs": data.totals["pruned"],
            "final_val_loss": final_val,
            "final_val": final_of,
            "val_history": [
                {
                    k: r.get(k)
                    for k in (
                        "step",
                        "epoch",
                        "val_loss",
                        "set",
                        "val_subset_loss",
                        "wall_clock_s",
                        "cpu_time_s",
                    )
                }
                for r in self.val_history
            ],
            "time_breakdown_s": timers,
            "time_breakdown_per_step_s": {k: v / steps for k, v in timers.items()},
            "host_syncs_per_step": data.host_syncs / steps,
            "moved_samples": data.moved_samples,
            "collective_bytes_sent_per_step": dist.traffic["bytes_sent"] / steps,
            "collective_bytes_received_per_step": dist.traffic["bytes_received"] / steps,
            "train_samples": data.num_samples,
            "val_samples": len(self.corpus.val),
            "val_subset_samples": validation.subset_size(
                max(1, len(self.corpus.val)), self.opts.eval_subset
            ),
            "data_composition": self.corpus.composition,
            # undecodable input bytes read as U+FFFD (None: a corpus cached before counting)
            "data_replacements": self.corpus.stats.get("replaced_characters"),
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
            "planned_steps": data.total_steps,
            # every planned epoch ran: `--resume` of this run is refused (nothing is left)
            "finished": finished,
            "stopped": (
                {
                    "signal": self.stop.signal_name,
                    "step": data.step,
                    "checkpoint": None if checkpoint is None else str(checkpoint),
                }
                if stopped
                else None
            ),
            "burn_in_steps": data.burn_in_steps,
            "reference": self.reference,
            # scorer proxy: which proxy (the default is named), its FLOPs ratio, its learning
            "proxy": data.scorer.summary() if self.es.proxy else None,
        }
        if self.is_main:
            self.metrics.close()
            write_json_atomic(self.out / "summary.json", summary)
            plot_loss_curves(
                self.out / "metrics.jsonl", self.out / "loss_curve.png", self._plot_title()
            )
        export_model(self.engine, self.out, self._export_tokenizer)
        return summary

    def _export_tokenizer(self) -> Any:
        """The run's tokenizer as a `transformers` one, saved beside the exported weights."""
        from es_llm.data.tokenizer import hf_tokenizer

        return hf_tokenizer(
            tokenizer_for(self.opts.model, self.opts.tokenizer),
            self.corpus.tokenizer_path,
            self.corpus.eod_id,
            model_max_length=getattr(self.engine.module.config, "max_position_embeddings", None),
        )

    def _plot_title(self) -> str:
        return plot_title(
            self.method,
            self.opts.model,
            self.opts.data,
            train=len(self.corpus.train),
            val=len(self.corpus.val),
            seq_len=self.corpus.seq_len,
            world=self.world,
        )


def train(opts: TrainOptions, *, wrap_scorer: Any = None) -> dict[str, Any]:
    """Run one training job end to end and return its summary (every rank returns it).

    `wrap_scorer(default_scorer) -> scorer` replaces the scoring forward (see `ESRun`).
    """
    run = ESRun(opts, wrap_scorer=wrap_scorer)
    # from the start: a signal during set-up or the first evaluation stops after one step
    with StopRequest(announce=int(os.environ.get("RANK", "0")) == 0) as run.stop:
        try:
            run.setup()
            return run.run()
        finally:
            dist.destroy()
