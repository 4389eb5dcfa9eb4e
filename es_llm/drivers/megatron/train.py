"""One whole ES training run on Megatron-core: `es-llm train --engine megatron`.

The run is the DeepSpeed driver's (`es_llm.drivers.deepspeed.loop`) on another engine: the
same options (`TrainOptions`), the same JSON config with its `evolved_sampling` section, the
same corpus (`es_llm.data.load_corpus`), the same `RunPlan` and `ESDataPath`, the same
metrics.jsonl / summary.json / loss_curve.png. What is Megatron's:

* processes form tensor-parallel (TP) groups of `--tensor-parallel-size` ranks and
  data-parallel (DP) groups across them (`parallel_state.initialize_model_parallel`); the
  batch of the config splits over the DP ranks only;
* every rank keeps its own ES data path over its DP group: TP peers draw, score (a no-grad
  forward on every TP rank: the vocab-parallel loss needs all of them) and select the same
  samples, which one all-reduce over the TP group checks each step (`check_tp_lockstep`);
* the model is a Megatron `GPTModel` (`model.build_gpt`), trained through
  `get_forward_backward_func` with Megatron's DDP and optimizer (`step.train_step`);
* the config's `optimizer.params` (lr, betas, eps, weight_decay), `gradient_clipping`,
  `bf16.enabled` and `scheduler` (WarmupLR, WarmupDecayLR, WarmupCosineLR; mapped onto
  Megatron's `OptimizerParamScheduler`) are honoured; optimizer step k trains at iteration
  k of the schedule, as in the DeepSpeed driver;
* checkpoints: ``OUT/checkpoints/global_step<N>/`` holds one ``megatron_tp<t>_model_states.pt``
  per TP rank (model, optimizer, LR schedule; written by DP rank 0), one ES state file per
  rank and the completion marker of `es_llm.drivers.deepspeed.checkpoint` (every file's size
  and sha256), so `--resume` verifies and continues exactly as the DeepSpeed driver does;
* export: the model becomes a Hugging Face directory ``OUT/model`` (`export.py`).

Pipeline parallelism is refused (`checks.parallel_sizes`). See docs/megatron.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from es_llm import dist
from es_llm.data import load_corpus
from es_llm.data.sharding import shard_range
from es_llm.drivers.deepspeed import checkpoint as ckpt
from es_llm.drivers.deepspeed import validation
from es_llm.drivers.deepspeed.dsconfig import es_config_for_run, load_ds_config
from es_llm.drivers.deepspeed.loop import TrainOptions
from es_llm.drivers.deepspeed.metrics import (
    MetricsWriter,
    plot_loss_curves,
    plot_title,
    write_json_atomic,
)
from es_llm.drivers.deepspeed.stopping import RunStopped, StopRequest
from es_llm.drivers.megatron.checks import (
    ParallelSizes,
    check_es_fields,
    check_model_fits,
    parallel_sizes,
    require_megatron,
)
from es_llm.drivers.megatron.model import transformer_config_fields
from es_llm.drivers.steplog import step_record
from es_llm.errors import InputError, NonFiniteError
from es_llm.model import (
    load_model,
    load_model_preset,
    model_config,
    resolve_model,
    tokenizer_for,
)
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.plan import RunPlan, plan_geometry

__all__ = ["MegatronSetup", "megatron_setup", "optimizer_settings", "train"]

SECTION = "megatron"  # the config's own section for this driver
SECTION_FIELDS = ("tensor_parallel_size", "pipeline_parallel_size")
SCHEDULERS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
MODEL_FILE = "megatron_tp{tp:02d}_model_states.pt"


@dataclass(frozen=True)
class MegatronSetup:
    """What the input checks establish before any process group exists."""

    ds_config: dict[str, Any]
    es: EvolvedSamplingConfig
    sizes: ParallelSizes
    preset: dict[str, Any] | None  # None: a pretrained directory
    pretrained: Path | None  # the pretrained GPT-2 / Llama directory (--model DIR)
    hf_config: Any  # the model's transformers config (the preset's for this run, or DIR's)
    vocab_size: int  # the model's vocabulary (the preset's, else --vocab-size)
    optimizer: dict[str, Any]  # build_gpt's optimizer keywords
    scheduler: dict[str, Any] | None  # the LR schedule's settings (None: constant)


def _section_sizes(ds_config: dict[str, Any], tp: int | None, pp: int | None) -> tuple[int, int]:
    """The flags, else the config's `megatron` section, else 1."""
    section = ds_config.get(SECTION) or {}
    if not isinstance(section, dict):
        raise InputError(f"the config's {SECTION!r} section must be a JSON object")
    unknown = sorted(set(section) - set(SECTION_FIELDS))
    if unknown:
        raise InputError(
            f"{SECTION}.{unknown[0]}: unknown field of the config's {SECTION!r} section "
            f"(known: {', '.join(SECTION_FIELDS)})"
        )
    for key in SECTION_FIELDS:
        if key in section and (not isinstance(section[key], int) or section[key] < 1):
            raise InputError(f"{SECTION}.{key} must be an integer >= 1, got {section[key]!r}")
    tp = tp if tp is not None else section.get("tensor_parallel_size", 1)
    pp = pp if pp is not None else section.get("pipeline_parallel_size", 1)
    return int(tp), int(pp)


def optimizer_settings(ds_config: dict[str, Any]) -> dict[str, Any]:
    """`build_gpt`'s optimizer keywords from the config's optimizer, clipping and bf16."""
    opt = ds_config.get("optimizer") or {}
    kind = str(opt.get("type", "AdamW"))
    if kind.lower() not in ("adam", "adamw"):
        raise InputError(
            f"optimizer.type {kind!r}: the Megatron-core driver trains with Megatron's Adam "
            "(decoupled weight decay): use Adam or AdamW"
        )
    params = opt.get("params") or {}
    bf16 = ds_config.get("bf16") or {}
    if (ds_config.get("fp16") or {}).get("enabled"):
        raise InputError("fp16.enabled: the Megatron-core driver trains in fp32 or bf16 only")
    return {
        "lr": float(params.get("lr", 1e-3)),
        "weight_decay": float(params.get("weight_decay", 0.0)),
        "betas": tuple(float(b) for b in params.get("betas", (0.9, 0.999))),
        "eps": float(params.get("eps", 1e-8)),
        "clip_grad": float(ds_config.get("gradient_clipping", 0.0) or 0.0),
        "bf16": bool(bf16.get("enabled", False)),
    }


def _scheduler_settings(ds_config: dict[str, Any]) -> dict[str, Any] | None:
    sched = ds_config.get("scheduler")
    if not sched:
        return None
    kind = sched.get("type")
    if kind not in SCHEDULERS:
        raise InputError(
            f"scheduler.type {kind!r}: the Megatron-core driver maps {', '.join(SCHEDULERS)} "
            "onto Megatron's OptimizerParamScheduler; use one of them or none (constant lr)"
        )
    return {"type": kind, **(sched.get("params") or {})}


def _model_vocab(preset: dict[str, Any], opts: TrainOptions) -> int:
    """The model's vocabulary, known before the corpus is read (the TP check needs it): the
    preset's, else the --tokenizer's id bound, else --vocab-size (what the corpus's BPE is
    trained to; a smaller corpus may give it fewer tokens, which the model then never sees)."""
    if "vocab_size" in preset:
        return int(preset["vocab_size"])
    spec = tokenizer_for(opts.model, opts.tokenizer)
    if spec is not None:
        from es_llm.data.tokenizer import load_tokenizer, token_id_bound

        return token_id_bound(load_tokenizer(spec)[0])
    return int(opts.vocab_size)


def megatron_setup(
    opts: TrainOptions, *, tp: int | None, pp: int | None, world_size: int
) -> MegatronSetup:
    """Every input check of a Megatron run, before any process group: one InputError each."""
    require_megatron()
    ds_config = load_ds_config(opts.config)
    es = es_config_for_run(ds_config, opts.method, opts.es_overrides, scorer=opts.scorer)
    check_es_fields(es)
    tp, pp = _section_sizes(ds_config, tp, pp)
    sizes = parallel_sizes(world_size, tp, pp)
    if opts.model.startswith("base:"):
        raise InputError(
            f"--model {opts.model}: the cached pre-trained bases are built by the DeepSpeed "
            "engine; pass a GPT-2 or Llama model directory instead (e.g. an es-llm run's "
            "OUT/model)"
        )
    spec = resolve_model(opts.model)
    if spec.path is not None:  # a pretrained GPT-2 / Llama directory: its config and size
        from transformers import AutoConfig

        preset: Any = None
        hf = AutoConfig.from_pretrained(spec.path, trust_remote_code=False)
        vocab = int(hf.vocab_size)
        if hf.model_type not in ("gpt2", "llama"):
            raise InputError(
                f"--model {opts.model}: a {hf.model_type!r} model; the Megatron-core driver "
                "builds GPT-2 and Llama models only (the DeepSpeed engine takes any causal LM)"
            )
    else:
        preset = load_model_preset(opts.model)
        vocab = _model_vocab(preset, opts)
        hf = model_config(preset, vocab_size=vocab, seq_len=opts.seq_len)
    transformer_config_fields(hf, vocab_size=vocab, seq_len=opts.seq_len)  # maps, or refuses
    gpt2 = hf.model_type == "gpt2"
    heads = int(hf.n_head if gpt2 else hf.num_attention_heads)
    kv_heads = None if gpt2 else int(hf.num_key_value_heads or heads)
    check_model_fits(
        heads=heads, vocab_size=vocab, tp=sizes.tp, preset=opts.model, kv_heads=kv_heads
    )
    plan_geometry(ds_config, es, sizes.dp)  # the batch splits over the data-parallel ranks
    return MegatronSetup(
        ds_config=ds_config,
        es=es,
        sizes=sizes,
        preset=preset,
        pretrained=spec.path,
        hf_config=hf,
        vocab_size=vocab,
        optimizer=optimizer_settings(ds_config),
        scheduler=_scheduler_settings(ds_config),
    )


def _lr_scheduler(
    optimizer: Any, settings: dict[str, Any] | None, total: int, lr: float, weight_decay: float
):
    """Megatron's OptimizerParamScheduler for the config's scheduler section (None: none).
    The weight decay stays constant (each parameter group scales it by its `wd_mult`: 0 for
    biases and norms)."""
    if settings is None:
        return None
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total = max(1, int(total))
    steps = settings.get("total_num_steps", "auto")
    decay = total if steps == "auto" else int(steps)
    warm = settings.get("warmup_num_steps", "auto")
    warmup = max(1, round(0.05 * total)) if warm == "auto" else int(warm)
    warmup = min(warmup, max(0, decay - 1))
    kind = settings["type"]
    min_ratio = float(settings.get("cos_min_ratio", 0.0)) if kind == "WarmupCosineLR" else 0.0
    if kind == "WarmupLR":
        init = float(settings.get("warmup_min_lr", 0.0))
        peak = float(settings.get("warmup_max_lr", lr))
    else:
        init = lr * float(settings.get("warmup_min_ratio", 0.0))
        peak = lr
    for group in optimizer.param_groups:  # Megatron's groups carry their own bounds
        group["max_lr"], group["min_lr"] = peak, peak * min_ratio
    return OptimizerParamScheduler(
        optimizer,
        init_lr=init,
        max_lr=peak,
        min_lr=peak * min_ratio,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=SCHEDULERS[kind],
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(decay, warmup + 1),
        wd_incr_style="constant",
    )


class MegatronRun:
    """A training run on Megatron-core: corpus, model, the ES data path, the step loop."""

    def __init__(self, opts: TrainOptions, setup: MegatronSetup) -> None:
        self.opts, self.setup_ = opts, setup
        self.es, self.method = setup.es, setup.es.method
        self.val_history: list[dict[str, Any]] = []
        self.train_clock = self.train_cpu = self.eval_clock = 0.0
        self.resumed_from: Path | None = None
        self._last_saved_step: int | None = None
        self.stop = StopRequest()
        self._val_shards: dict[int, tuple[Any, int]] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from megatron.core import parallel_state

        from es_llm.drivers.megatron.model import build_gpt
        from es_llm.drivers.megatron.step import es_data_path

        opts, s = self.opts, self.setup_
        dist.ensure_launcher_env()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            if s.sizes.tp > 1:  # before the CUDA context: Megatron's tensor-parallel layers
                # overlap their gradient all-reduce with the weight-gradient GEMM and rely on
                # one hardware queue to keep that order (Megatron-LM's launchers set it too)
                os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = dist.collective_timeout()
        torch.distributed.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=s.sizes.tp, pipeline_model_parallel_size=s.sizes.pp
        )
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        dist.share_cpu_threads()
        if self.is_main:  # build the cache once; the other ranks then hit it
            corpus = self._load_corpus(progress=opts.progress)
        dist.barrier()
        if not self.is_main:
            corpus = self._load_corpus(progress=False)
        self.corpus = corpus
        if corpus.vocab_size > s.vocab_size:
            raise InputError(
                f"the tokenizer's vocabulary ({corpus.vocab_size}) is larger than the model's "
                f"({s.vocab_size})"
            )
        self.plan = RunPlan.build(
            s.ds_config,
            s.es,
            dp_size=s.sizes.dp,
            num_samples=len(corpus.train),
            epochs=opts.epochs,
            seed=opts.seed,
            max_steps=opts.max_steps,
        )
        self.geo = self.plan.geo
        weights = None
        if s.pretrained is None:
            self.hf_config = model_config(
                s.preset, vocab_size=s.vocab_size, seq_len=corpus.seq_len, eod_id=corpus.eod_id
            )
        else:  # the weights the DeepSpeed driver would start from (checked finite there)
            self.hf_config = s.hf_config
            weights = load_model(
                resolve_model(str(s.pretrained)),
                vocab_size=corpus.vocab_size,
                seq_len=corpus.seq_len,
                eod_id=corpus.eod_id,
            ).state_dict()
        self.parts = build_gpt(
            self.hf_config,
            vocab_size=s.vocab_size,
            seq_len=corpus.seq_len,
            seed=opts.seed,
            preset_name=opts.model,
            hf_weights=weights,
            **s.optimizer,
        )
        del weights
        self.num_params = sum(p.numel() for p in self.parts.model.parameters())
        self.scheduler = _lr_scheduler(
            self.parts.optimizer,
            s.scheduler,
            self.plan.total_steps,
            s.optimizer["lr"],
            s.optimizer["weight_decay"],
        )
        self.data = es_data_path(self.parts.model, corpus.train, self.plan)
        self.device = self.data.device
        self.out = Path(opts.out)
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
            seq_len=o.seq_len,
            cache_dir=o.cache_dir,
            vocab_size=o.vocab_size,
            max_train_samples=o.max_train_samples,
            max_val_samples=o.max_val_samples,
            tokenizer=tokenizer_for(o.model, o.tokenizer),
            progress=progress,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "es": self.data.state_dict(),
            "fingerprint": self._fingerprint(),
            "val_history": self.val_history,
            "train_clock": self.train_clock,
            "eval_clock": self.eval_clock,
            "train_cpu": self.train_cpu,
        }

    def _fingerprint(self) -> dict[str, Any]:
        s = self.setup_.sizes
        return {
            "seq_len": self.corpus.seq_len,
            "vocab_size": self.corpus.vocab_size,
            "engine": "megatron",
            "model": self.opts.model,
            "model_vocab_size": self.setup_.vocab_size,
            "tensor_parallel_size": s.tp,
            "pipeline_parallel_size": s.pp,
        }

    def _model_state(self) -> dict[str, Any]:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        return {
            "model": self.parts.model.state_dict(),
            "optimizer": self.parts.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng_tracker": get_cuda_rng_tracker().get_states(),
        }

    def _save(self) -> Path:
        """Checkpoint this step (collective; the layout is in the module doc)."""
        from megatron.core import parallel_state

        self._check_finite(self.data.nonfinite_step())
        root = ckpt.checkpoint_root(self.out)
        step = self.data.step
        tag_dir = root / ckpt.tag_for_step(step)
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # left by a crashed attempt at this step
                (tag_dir / ckpt.MARKER).unlink(missing_ok=True)
                shutil.rmtree(tag_dir)
        dist.barrier()
        tag_dir.mkdir(parents=True, exist_ok=True)
        engine_files = []
        if self.dp_rank == 0:
            name = MODEL_FILE.format(tp=parallel_state.get_tensor_model_parallel_rank())
            path = tag_dir / name
            ckpt._write_atomic(path, lambda fh: torch.save(self._model_state(), fh))
            engine_files.append(ckpt.file_record(tag_dir, name))
        rec = ckpt.write_rank_state(tag_dir, self.rank, ckpt.rank_state(self.state_dict()))
        records = dist.all_gather_object(rec)
        hashed = [r for mine in dist.all_gather_object(engine_files) for r in mine]
        if self.is_main:
            ckpt.write_marker(
                tag_dir, step=step, world_size=self.world, files=records, engine_files=hashed
            )
            ckpt._write_text_atomic(root / ckpt.LATEST, tag_dir.name)
        dist.barrier()
        self._last_saved_step = step
        return tag_dir

    def _resume(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        root = ckpt.checkpoint_root(self.out)
        choice: tuple[str | None, str | None] = (None, None)
        if self.is_main:
            try:
                choice = (ckpt.find_complete_tag(root), None)
            except ckpt.CheckpointError as e:
                choice = (None, str(e))
        tag, error = dist.all_gather_object(choice)[0]
        if error is not None or tag is None:
            raise ckpt.CheckpointError(error or f"no checkpoint chosen in {root}")
        tag_dir = root / tag
        marker = ckpt.read_marker(tag_dir)
        state = ckpt.read_rank_state(tag_dir, self.rank, self.world, marker)
        source = str(tag_dir / ckpt.es_state_file(self.rank))
        run = state["run"]
        if run["fingerprint"] != self._fingerprint():
            raise ckpt.CheckpointError(
                f"{source} was written by a different run configuration (checkpoint "
                f"{run['fingerprint']!r}, now {self._fingerprint()!r}); resume with the same "
                "flags and config"
            )
        name = MODEL_FILE.format(tp=parallel_state.get_tensor_model_parallel_rank())
        if name not in marker["engine_files"]:
            raise ckpt.CheckpointError(f"{tag_dir / ckpt.MARKER} lists no {name}")
        try:
            saved = torch.load(tag_dir / name, map_location=self.device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same here
            raise ckpt.CheckpointError(f"{tag_dir / name} cannot be read: {e}") from e
        self.parts.model.load_state_dict(saved["model"])
        self.parts.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        get_cuda_rng_tracker().set_states(saved["rng_tracker"])
        self.data.load_state_dict(run["es"], source=source)
        self.val_history = list(run["val_history"])
        self.train_clock = float(run["train_clock"])
        self.eval_clock = float(run["eval_clock"])
        self.train_cpu = float(run["train_cpu"])
        ckpt.restore_rng(state)
        self.resumed_from = tag_dir
        self._last_saved_step = self.data.step

    # ------------------------------------------------------------------ non-finite
    def _check_finite(self, step: int | None, what: str = "training loss") -> None:
        if step is not None:
            raise NonFiniteError(
                f"the {what} of step {step} is not finite (NaN or inf) on at least one rank: "
                "the run is stopped and no model is exported"
            )

    # ------------------------------------------------------------------ eval
    def _val_rows(self, n_rows: int) -> tuple[Any, int]:
        """This DP rank's shard of the first `n_rows` validation rows (TP peers: the same)."""
        if n_rows not in self._val_shards:
            lo, hi = shard_range(n_rows, self.dp_rank, self.setup_.sizes.dp)
            rows = self.corpus.val.select(range(lo, hi))
            columns = [c for c in ("input_ids", "labels") if c in rows.column_names]
            self._val_shards[n_rows] = (rows.with_format("numpy", columns=columns), lo)
        return self._val_shards[n_rows]

    def evaluate(self, *, full: bool) -> tuple[float, float]:
        """(loss on what was evaluated, loss on the fixed subset), over the DP group."""
        from es_llm.drivers.megatron.step import token_loss_sums

        t0 = time.perf_counter()
        model = self.parts.model
        was_training = model.training
        model.eval()
        n_total = len(self.corpus.val)
        n_sub = validation.subset_size(n_total, self.opts.eval_subset) if n_total else 0
        rows, lo = self._val_rows(n_total if full else n_sub)
        in_subset = max(0, min(len(rows), n_sub - lo))
        acc = torch.zeros(4, dtype=torch.float64, device=self.device)
        mb = self.plan.scoring_micro_batch
        with torch.no_grad():
            for i in range(0, len(rows), mb):
                j = min(len(rows), i + mb)
                batch = rows[i:j]
                tokens = torch.from_numpy(np.asarray(batch["input_ids"], dtype=np.int64))
                labels = None
                if "labels" in batch:
                    labels = torch.from_numpy(np.asarray(batch["labels"], dtype=np.int64))
                    labels = labels.to(self.device)
                s, c = token_loss_sums(model, tokens.to(self.device), labels, self.es.ignore_index)
                k = max(0, min(j, in_subset) - i)
                acc += torch.stack(
                    [s.double().sum(), c.double().sum(), s[:k].double().sum(), c[:k].double().sum()]
                )
        model.train(was_training)
        total, count, sub_total, sub_count = dist.all_reduce_sum(acc.tolist(), group=self.dp_group)
        self.eval_clock += time.perf_counter() - t0
        loss = total / count if count > 0 else float("nan")
        return loss, (sub_total / sub_count if sub_count > 0 else float("nan"))

    def _record_eval(self, where: str, epoch: int, *, full: bool = False) -> float:
        n_total = len(self.corpus.val)
        n_sub = validation.subset_size(n_total, self.opts.eval_subset) if n_total else 0
        full = full or n_sub == n_total
        val, sub = self.evaluate(full=full)
        if (n_total and not np.isfinite(val)) or (n_sub and not np.isfinite(sub)):
            self._check_finite(self.data.step, f"validation loss ({where})")
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
        return val

    # ------------------------------------------------------------------ loop
    def _should_stop(self) -> bool:
        o, step = self.opts, self.data.step
        return (
            (o.max_steps is not None and step >= o.max_steps)
            or (o.max_wall_clock_s is not None and self.train_clock >= o.max_wall_clock_s)
            or (o.max_cpu_time_s is not None and self.train_cpu >= o.max_cpu_time_s)
            or (o.stop_after is not None and step >= o.stop_after)
        )

    def _lr(self) -> float:
        return float(self.parts.optimizer.param_groups[0]["lr"])

    def run(self) -> dict[str, Any]:
        from es_llm.drivers.megatron.step import check_tp_lockstep, train_step

        opts, data, micro = self.opts, self.data, self.geo.micro
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
        eval_at = validation.eval_steps(
            data.total_steps, points=opts.eval_points, every=opts.eval_every
        )
        stop = signalled = trained = False
        epoch = data.epoch
        while not stop:
            t0, c0 = time.perf_counter(), time.process_time()
            draw = data.next_step()
            if draw is None:
                break
            if draw.epoch != epoch:
                self.train_clock += time.perf_counter() - t0
                self.train_cpu += time.process_time() - c0
                if not self.val_history or self.val_history[-1]["step"] != data.step:
                    self._record_eval("epoch_end", epoch)
                epoch = draw.epoch
                t0, c0 = time.perf_counter(), time.process_time()
            if self.scheduler is not None:
                self.scheduler.step(1)  # optimizer step k trains at iteration k
            lr = self._lr()
            a = data.assign(draw)
            trained = True
            losses = train_step(self.parts, a, self.plan, data.timers)
            for i in range(0, a.ids.numel(), micro):
                data.observe_training_losses(a, a.ids[i : i + micro], losses[i : i + micro])
            rec = data.finish_step(a)
            self._check_finite(rec.get("nonfinite_loss_step"))
            signalled = check_tp_lockstep(
                draw.step, a.ids, bool(rec.get("stop_requested")), self.tp_group
            )
            now = time.perf_counter()
            self.train_clock += now - t0
            self.train_cpu += time.process_time() - c0
            if self.is_main:
                self.metrics.write(
                    {
                        **step_record(rec),
                        "lr": lr,
                        "wall_clock_s": self.train_clock,
                        "cpu_time_s": self.train_cpu,
                        "step_s": now - t0,
                    }
                )
            stop = signalled or self._should_stop()
            if data.step in eval_at and not stop:
                self._record_eval("interval", epoch)
            periodic = opts.save_every and data.step % opts.save_every == 0
            due = periodic or (signalled and opts.save_on_stop) or (opts.save_every and stop)
            if due and self._last_saved_step != data.step:
                self._save()
        finished = not stop
        self._check_finite(data.nonfinite_step())
        if signalled:
            self._record_eval("signal", epoch)
        elif trained or self.resumed_from is None:
            self._record_eval("stop" if stop else "end", epoch, full=True)
        if opts.save_every and self._last_saved_step != data.step and not signalled:
            self._save()
        summary = self._finish(stopped=signalled, finished=finished)
        if signalled:
            tag = self._last_saved_step == data.step
            raise RunStopped(
                f"stopped by {self.stop.signal_name or 'a signal on another rank'} after step "
                f"{data.step} of {data.total_steps}; summary in {self.out}/; "
                + (
                    f"to continue, run the same command with --resume {self.out}"
                    if tag
                    else "no checkpoint was written (--no-save-on-stop)"
                ),
                self.stop.exit_code,
            )
        return summary

    def _finish(self, *, stopped: bool, finished: bool) -> dict[str, Any]:
        data = self.data
        timers = data.timers.state_dict()
        steps = max(1, data.step)
        last = self.val_history[-1] if self.val_history else None
        s = self.setup_.sizes
        summary: dict[str, Any] = {
            "engine": "megatron",
            "method": self.method,
            "world_size": self.world,
            "tensor_parallel_size": s.tp,
            "pipeline_parallel_size": s.pp,
            "data_parallel_size": s.dp,
            "wall_clock_s": self.train_clock,
            "eval_wall_clock_s": self.eval_clock,
            "cpu_time_s": self.train_cpu,
            "steps": data.step,
            "epochs": data.epoch + 1,
            "bp_samples": data.totals["bp_samples"],
            "scored_samples": data.totals["scored_samples"],
            "invalid_samples": data.totals["invalid_samples"],
            "pruned_sample_epochs": data.totals["pruned"],
            "final_val_loss": last["val_loss"] if last else float("nan"),
            "final_val": None
            if last is None
            else {k: last[k] for k in ("step", "where", "set", "sequences")},
            "val_history": [
                {k: r.get(k) for k in ("step", "epoch", "val_loss", "set", "val_subset_loss")}
                for r in self.val_history
            ],
            "time_breakdown_s": timers,
            "time_breakdown_per_step_s": {k: v / steps for k, v in timers.items()},
            "host_syncs_per_step": data.host_syncs / steps,
            "moved_samples": data.moved_samples,
            "train_samples": data.num_samples,
            "val_samples": len(self.corpus.val),
            "seq_len": self.corpus.seq_len,
            "vocab_size": self.corpus.vocab_size,
            "model": self.opts.model,
            "model_vocab_size": self.setup_.vocab_size,
            "model_parameters_per_tp_rank": self.num_params,
            "batch": {
                "train_batch_size": self.geo.train_batch,
                "meta_batch_size": self.geo.meta_batch,
                "micro_batch_size": self.geo.micro,
                "gradient_accumulation_steps": self.geo.grad_accum,
            },
            "evolved_sampling": self.es.model_dump(),
            "seed": self.opts.seed,
            "planned_steps": data.total_steps,
            "finished": finished,
            "stopped": {"signal": self.stop.signal_name, "step": data.step} if stopped else None,
            "burn_in_steps": data.burn_in_steps,
            # the ranks the ES data path's collectives span (this rank's DP group)
            "es_group_ranks": torch.distributed.get_process_group_ranks(data.comm.group),
            "export": None,
        }
        summary["export"] = self._export()
        if self.is_main:
            self.metrics.close()
            write_json_atomic(self.out / "summary.json", summary)
            plot_loss_curves(
                self.out / "metrics.jsonl",
                self.out / "loss_curve.png",
                plot_title(
                    self.method,
                    self.opts.model,
                    self.opts.data,
                    train=len(self.corpus.train),
                    val=len(self.corpus.val),
                    seq_len=self.corpus.seq_len,
                    world=self.world,
                ),
            )
        dist.barrier()
        return summary

    def _export(self) -> dict[str, Any]:
        """OUT/model, a transformers directory; what was exported, for the summary."""
        from es_llm.drivers.megatron.export import export_hf

        path = export_hf(
            self.parts.model,
            self.hf_config,
            self.out,
            self._export_tokenizer,
            tp_group=self.tp_group,
        )
        kind = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
        return {"model_dir": str(path), "format": f"transformers {kind[self.hf_config.model_type]}"}

    def _export_tokenizer(self) -> Any:
        from es_llm.data.tokenizer import hf_tokenizer

        return hf_tokenizer(
            tokenizer_for(self.opts.model, self.opts.tokenizer),
            self.corpus.tokenizer_path,
            self.corpus.eod_id,
            model_max_length=self.corpus.seq_len,
        )


def train(
    opts: TrainOptions, *, tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run one Megatron-core training job end to end; every rank returns the summary.

    The sizes default to the config's `megatron` section, else 1. Every input check runs
    before the process group is created (`megatron_setup`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    setup = megatron_setup(
        opts, tp=tensor_parallel_size, pp=pipeline_parallel_size, world_size=world
    )
    run = MegatronRun(opts, setup)
    with StopRequest(announce=int(os.environ.get("RANK", "0")) == 0) as run.stop:
        try:
            run.setup()
            return run.run()
        finally:
            _destroy()


def _destroy() -> None:
    """Megatron's groups, then the process group (es_llm.dist.destroy)."""
    if dist.is_initialized():
        from megatron.core import parallel_state

        dist.barrier()
        parallel_state.destroy_model_parallel()
    dist.destroy()
