"""Evolved Sampling inside a Hugging Face `Trainer`: `ESTrainer`, a drop-in subclass.

Use it where you would use `transformers.Trainer`, with `TrainingArguments(deepspeed=...)`
pointing at a DeepSpeed config that carries an `evolved_sampling` section::

    trainer = ESTrainer(model=model, args=TrainingArguments(..., deepspeed="ds.json"),
                        train_dataset=packed)   # columns: input_ids (equal length T)
    trainer.train()

Fine-tuning sets of varying length (`input_ids` with `labels` and/or `attention_mask`, as a
collator would pad them) are padded once to fixed-length rows (`es_llm.data.padded`): the
scoring pass needs one shape. The length is `es_max_length` when given (longer rows keep
their start), else the longest row, capped at `args.max_length` (TRL's `SFTConfig`). `ESTrainerMixin` is the same behaviour for another
`Trainer` subclass, e.g. TRL's `SFTTrainer` (`es_llm.drivers.trl.ESSFTTrainer`).

Without the section (or with `enabled: false`) it is a plain `Trainer`.

The ES data path is `es_llm.sampling.datapath.ESDataPath`, the same component the native loop
(`es-llm train`) drives; this class only maps its steps onto the Trainer's:

* `get_train_dataloader` returns this rank's ES stream: per optimizer step it calls
  `next_step()` (when the first of the step's items is requested, so nothing is drawn ahead)
  and yields `gradient_accumulation_steps` placeholder items.
* `get_batch_samples`, where the Trainer holds all items of one optimizer step before any
  forward, calls `assign()` (score, all-gather records, select, assign locality-first) and
  returns this rank's `B / W` samples as `gradient_accumulation_steps` micro-batches.
* `compute_loss` computes the per-sample losses times the ES loss weights, averaged over the
  micro-batch (with the Trainer's `1/gas` and DeepSpeed's `scale_wrt_gas=False` this is the
  native loop's loss), and hands the losses to `observe_training_losses`.
* At the end of each optimizer step (`on_step_end`) `finish_step()` closes the step; its
  record goes to `OUTPUT_DIR/es_metrics.jsonl` (the native `selection_digest`).

The planned step count is the native loop's (the run's `RunPlan`, or `max_steps`); the
Trainer's per-epoch length is set so that its total is that count, and the stream ends there.

Checkpoints: every Trainer checkpoint folder gets one file per rank, `es_state_rank<r>.pt`
(written atomically before the Trainer's own files), holding the data path's `state_dict()`.
`train(resume_from_checkpoint=...)` loads it, and the run selects from then on exactly what an
uninterrupted run selects. The data position is the ES state's, so the Trainer's own
fast-forward of the dataloader is turned off (`ignore_data_skip`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from es_llm import dist
from es_llm.drivers.deepspeed import checkpoint as ckpt
from es_llm.drivers.losses import weighted_step_loss
from es_llm.drivers.scoring import ModelScorer, Scorer
from es_llm.drivers.steplog import step_record
from es_llm.errors import InputError
from es_llm.sampling.config import SECTION, EvolvedSamplingConfig, es_config_from_ds_config
from es_llm.sampling.datapath import ESDataPath, StepAssignment, StepDraw
from es_llm.sampling.plan import RunPlan

__all__ = ["ESTrainer", "ESTrainerMixin"]


class _ESStream(IterableDataset):
    """One rank's ES stream: a placeholder item per micro-batch of each drawn step.

    Iterating continues where the last iteration stopped (the Trainer re-creates its iterator
    every Trainer epoch; the ES epochs are the data path's). The step's draw is kept in
    `current` for `get_batch_samples`.
    """

    def __init__(self, data: ESDataPath, length: int) -> None:
        self.data = data
        self.length = length
        self.current: StepDraw | None = None

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            draw = self.data.next_step()
            if draw is None:
                return
            self.current = draw
            for _ in range(self.data.geo.grad_accum):
                yield {"es_step": torch.tensor(draw.step)}


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


class _FinishStep(TrainerCallback):
    """Closes the ES step after the Trainer's optimizer step (before any checkpoint save)."""

    def __init__(self, trainer: ESTrainerMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._finish_es_step()


class ESTrainerMixin:
    """ES/ESWP for a `transformers.Trainer` (sub)class, when the DeepSpeed config says so.

    Put it first among the bases: ``class MyES(ESTrainerMixin, MyTrainer)``. The keyword
    arguments are `ESTrainer`'s.
    """

    def __init__(
        self,
        *args: Any,
        es_config: EvolvedSamplingConfig | None = None,
        scorer: Scorer | None = None,
        es_max_length: int | None = None,
        **kwargs: Any,
    ):
        from es_llm.cuda_env import fix_torch_cuda_arch_list

        fix_torch_cuda_arch_list()  # before DeepSpeed JIT-builds any op (FusedAdam)
        super().__init__(*args, **kwargs)
        ds_config = _strip_es_section(self.args)
        self.es: EvolvedSamplingConfig | None = es_config
        if self.es is None and ds_config is not None:
            self.es = es_config_from_ds_config(ds_config)
        if self.es is not None and self.es.sampling_method.state:
            raise InputError(
                f"method {self.es.method!r} needs the per-sample state "
                f"{list(self.es.sampling_method.state)} (a reference model's loss), which "
                f"ESTrainer does not build: use `es-llm train --method {self.es.method}`"
            )
        if self.es is not None and ds_config is None:
            raise InputError(
                "ESTrainer needs TrainingArguments(deepspeed=...): ES runs through DeepSpeed"
            )
        self._es_ds_config = ds_config
        self._scorer = scorer
        self._es_max_length = es_max_length
        self.es_padding: dict[str, Any] = {}  # what es_llm.data.padded.fixed_length did
        self.es_data: ESDataPath | None = None
        self._stream: _ESStream | None = None
        self._assignment: StepAssignment | None = None
        self._resume_dir: Path | None = None
        self.es_log: list[dict[str, Any]] = []
        if self.es is not None:
            self.add_callback(_FinishStep(self))

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        if self.es is None:
            return super().get_train_dataloader()
        if self._stream is None:
            self._stream = self._build_stream()
        if self._resume_dir is not None:
            self._load_es_state(self._resume_dir)
            self._resume_dir = None
        # batch_size=None: the stream yields ready items. No workers and no accelerate
        # sharding: the stream already is this rank's shard and it runs collectives.
        return DataLoader(self._stream, batch_size=None, num_workers=0)

    def _build_stream(self) -> _ESStream:
        es, ds_config = self.es, self._es_ds_config
        if es is None or ds_config is None:
            raise RuntimeError("_build_stream needs the ES config")
        ds = self.train_dataset
        if ds is None or not hasattr(ds, "with_format") or "input_ids" not in ds.column_names:
            raise InputError(
                "ESTrainer needs a datasets.Dataset train_dataset with an 'input_ids' column"
            )
        ds = self._es_rows(ds)
        comm = dist.Communicator()
        epochs = max(1, math.ceil(self.args.num_train_epochs))
        plan = RunPlan.build(
            ds_config,
            es,
            dp_size=comm.size,
            num_samples=len(ds),
            epochs=epochs,
            seed=self.args.seed,
            max_steps=self.args.max_steps if self.args.max_steps > 0 else None,
        )
        geo = plan.geo
        if geo.micro != self.args.per_device_train_batch_size or (
            geo.grad_accum != self.args.gradient_accumulation_steps
        ):
            raise InputError(
                f"DeepSpeed config batch fields (micro {geo.micro}, gas {geo.grad_accum}) differ "
                f"from TrainingArguments ({self.args.per_device_train_batch_size}, "
                f'{self.args.gradient_accumulation_steps}); use "auto" in the config'
            )
        scorer = self._scorer
        if scorer is None and es.proxy:  # scorer proxy: a small model learning online
            scorer = self._proxy_scorer(plan, comm, ds, ds_config)
        scorer = scorer or ModelScorer(
            lambda: self.model_wrapped,
            micro_batch=plan.scoring_micro_batch,
            ignore_index=es.ignore_index,
        )
        self.es_data = ESDataPath(
            plan,
            ds,
            comm=comm,
            device=self.args.device,
            scorer=scorer,
            timer_event=dist.accelerator_event,
        )
        # Trainer epochs only count steps: make their total the planned count
        per_trainer_epoch = math.ceil(plan.total_steps / epochs)
        return _ESStream(self.es_data, length=per_trainer_epoch * geo.grad_accum)

    def _proxy_scorer(self, plan: RunPlan, comm: Any, ds: Any, ds_config: dict[str, Any]) -> Any:
        """scorer proxy's `ProxyScorer`: proxy_model a preset or a local directory (a
        ``base:`` spec is built by `es-llm train`; pass the directory it was built into),
        its tokenizer checked against the Trainer's `processing_class` when that has a
        vocabulary."""
        from es_llm.drivers.proxy import build_proxy_scorer

        get_vocab = getattr(self.processing_class, "get_vocab", None)
        config = getattr(getattr(self.model, "config", None), "get_text_config", None)
        return build_proxy_scorer(
            plan.es,
            config() if config is not None else self.model.config,
            comm=comm,
            micro_batch=plan.scoring_micro_batch,
            seq_len=len(ds[0]["input_ids"]),
            device=self.args.device,
            ds_config=ds_config,
            learner_vocab=get_vocab() if callable(get_vocab) else None,
            seed=self.args.seed,
        )

    def _es_rows(self, ds: Any) -> Any:
        """The train set as fixed-length rows with labels (a fixed-length set as it is)."""
        from es_llm.data.padded import fixed_length

        tok = getattr(self, "processing_class", None)
        pad = getattr(tok, "pad_token_id", None)
        pad = getattr(tok, "eos_token_id", None) if pad is None else pad
        ds, self.es_padding = fixed_length(
            ds,
            length=self._es_max_length,
            max_length=getattr(self.args, "max_length", None),
            pad_id=0 if pad is None else int(pad),
            ignore_index=self.es.ignore_index if self.es is not None else -100,
        )
        return ds

    # ------------------------------------------------------------------ one step
    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        """All items of one optimizer step -> `assign()` -> this rank's micro-batches."""
        if self.es is None or self.es_data is None or self._stream is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        pieces = []
        for _ in range(num_batches):
            try:
                pieces.append(next(epoch_iterator))
            except StopIteration:
                break
        if not pieces:
            self.control.should_training_stop = True  # the planned steps are done
            return [], None
        draw = self._stream.current
        steps = {int(p["es_step"]) for p in pieces}
        if draw is None or steps != {draw.step} or len(pieces) != self.es_data.geo.grad_accum:
            raise RuntimeError(
                f"ES step items out of line with gradient accumulation ({len(pieces)} items, "
                f"steps {sorted(steps)}); the Trainer must pull "
                f"{self.es_data.geo.grad_accum} per step"
            )
        a = self.es_data.assign(draw)
        self._assignment = a
        micro = self.es_data.geo.micro
        batches = [
            {"input_ids": a.tokens[i : i + micro], "es_micro": i}
            for i in range(0, a.tokens.size(0), micro)
        ]
        if a.labels is not None:
            for b in batches:
                b["es_labels"] = a.labels[b["es_micro"] : b["es_micro"] + micro]
        return batches, None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Weighted mean of per-sample losses (the native loop's loss); plain steps update s."""
        if self.es is None or "es_micro" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        a, data = self._assignment, self.es_data
        if a is None or data is None:
            raise RuntimeError("compute_loss got an ES micro-batch outside an ES step")
        input_ids = inputs["input_ids"]
        sl = slice(inputs["es_micro"], inputs["es_micro"] + input_ids.size(0))
        outputs = model(input_ids=input_ids)
        loss, per_sample = weighted_step_loss(
            outputs.logits, input_ids, a.loss_weights[sl], self.es.ignore_index,
            inputs.get("es_labels"),
        )  # fmt: skip
        data.observe_training_losses(a, a.ids[sl], per_sample)
        return (loss, outputs) if return_outputs else loss

    def _finish_es_step(self) -> None:
        a, data = self._assignment, self.es_data
        if a is None or data is None:
            return
        self._assignment = None
        rec = data.finish_step(a)
        record = step_record(rec)
        self.es_log.append(record)
        if self.args.process_index == 0:
            path = Path(self.args.output_dir) / "es_metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The ES state of every rank first (atomic files), then the Trainer's own files."""
        if self.es is not None and self.es_data is not None:
            folder = Path(self._get_output_dir(trial=trial)) / (
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            folder.mkdir(parents=True, exist_ok=True)
            state = ckpt.rank_state({"es": self.es_data.state_dict()})
            ckpt.write_rank_state(folder, dist.rank(), state)
            dist.barrier()
        super()._save_checkpoint(model, trial)

    def _load_es_state(self, folder: Path) -> None:
        if self.es_data is None:
            raise RuntimeError("the ES data path must exist before its state is loaded")
        path = folder / ckpt.es_state_file(dist.rank())
        state = ckpt.load_rank_file(path, dist.rank(), dist.world_size())
        self.es_data.load_state_dict(state["run"]["es"], source=str(path))
        step = self.es_data.step
        trainer_state = folder / "trainer_state.json"
        if trainer_state.is_file():
            global_step = int(json.loads(trainer_state.read_text()).get("global_step", step))
            if global_step != step:
                raise ckpt.CheckpointError(
                    f"{path} is at ES step {step} but {trainer_state} at global step "
                    f"{global_step}; the checkpoint folder is inconsistent"
                )
        if self.args.process_index == 0:
            ckpt.rewind_metrics(Path(self.args.output_dir) / "es_metrics.jsonl", step)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if self.es is not None and resume_from_checkpoint:
            if resume_from_checkpoint is True:
                last = get_last_checkpoint(self.args.output_dir)
                if last is None:
                    raise InputError(
                        f"no checkpoint in {self.args.output_dir} to resume from "
                        f"(resume_from_checkpoint=True)"
                    )
                resume_from_checkpoint = last
            folder = Path(os.fspath(resume_from_checkpoint))
            if not (folder / ckpt.es_state_file(dist.rank())).is_file():
                raise ckpt.CheckpointError(
                    f"{folder} has no {ckpt.es_state_file(dist.rank())}: it was not written by "
                    f"an ESTrainer, so the ES scores and data position cannot be restored"
                )
            self._resume_dir = folder
            self.args.ignore_data_skip = True  # the ES state holds the data position
            if self._stream is not None:  # a second train() call: the stream exists already
                self._load_es_state(folder)
                self._resume_dir = None
        return super().train(resume_from_checkpoint, *args, **kwargs)


class ESTrainer(ESTrainerMixin, Trainer):
    """`transformers.Trainer` that trains with ES/ESWP when the DeepSpeed config says so.

    `es_config` overrides the config's section (e.g. for sweeps). `train_dataset` is a
    `datasets.Dataset` with an `input_ids` column: equal-length packed sequences, or rows of
    varying length with `labels`/`attention_mask` (padded once, see the module doc); the
    global sample id is the row index. `scorer` (optional) replaces the scoring forward:
    `scorer(tokens, ids) -> (loss, valid)` (see `es_llm.drivers.scoring.Scorer`).
    """
