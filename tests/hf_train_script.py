"""Train the tiny GPT-2 with `es_llm.drivers.hf.ESTrainer` (run by tests/test_hf_trainer.py).

Started with `torchrun --nproc_per_node N`; mirrors `es-llm train` (same corpus, same seed
before the model is built, same DeepSpeed config) so the per-step selection digests of
OUT/es_metrics.jsonl can be compared with the native OUT/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from es_llm.data import load_corpus
from es_llm.drivers.hf import ESTrainer
from es_llm.model import build_model, load_model_preset


class _StopAfter(TrainerCallback):
    """Stop once the Trainer has finished optimizer step N (a save at N happens first)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


def _sft_config(**kw):
    from trl import SFTConfig

    # SFTConfig's own defaults that TrainingArguments does not have: off, as natively
    return SFTConfig(**kw, bf16=False, gradient_checkpointing=False, max_length=None)


def _unpadded(ds):
    """The rows as a collator would get them: no padding, labels, attention_mask of ones."""
    import datasets
    import numpy as np

    rows = {"input_ids": [], "labels": [], "attention_mask": []}
    for r in ds.with_format("numpy"):
        n = int(np.flatnonzero(r["labels"] != -100)[-1]) + 1
        rows["input_ids"].append(r["input_ids"][:n].tolist())
        rows["labels"].append(r["labels"][:n].tolist())
        rows["attention_mask"].append([1] * n)
    return datasets.Dataset.from_dict(rows)


def _hf_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    from es_llm.data.tokenizer import EOD_TOKEN

    return PreTrainedTokenizerFast(tokenizer_file=path, eos_token=EOD_TOKEN, pad_token=EOD_TOKEN)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--max-train-samples", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--stop-after", type=int, default=0, help="stop after step N (observed)")
    p.add_argument("--resume", default=None, help="a checkpoint folder, or 'last'")
    p.add_argument("--data", default=None, help="as es-llm train --data (default: stdlib)")
    p.add_argument(
        "--trl",
        action="store_true",
        help="train with es_llm.drivers.trl.ESSFTTrainer on the rows without their padding "
        "(input_ids/labels/attention_mask of varying length, as TRL users have them)",
    )
    a = p.parse_args()

    original = Path(a.config).read_text()
    torch.manual_seed(a.seed)  # as the native loop: model init from the run seed
    corpus = load_corpus(
        a.data,
        seq_len=a.seq_len,
        cache_dir=os.environ.get("ES_LLM_CACHE"),
        vocab_size=a.vocab_size,
        max_train_samples=a.max_train_samples,
        max_val_samples=32,
        progress=False,
    )
    model = build_model(
        load_model_preset("gpt2-tiny"), vocab_size=corpus.vocab_size, seq_len=corpus.seq_len
    )
    args = (_sft_config if a.trl else TrainingArguments)(
        output_dir=a.out,
        deepspeed=a.config,
        per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=a.gas,
        max_steps=a.max_steps,
        num_train_epochs=a.epochs,
        lr_scheduler_type="constant",  # the config has no scheduler: constant, as natively
        learning_rate=0.002,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.1,
        max_grad_norm=1.0,
        seed=a.seed,
        logging_steps=1,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    if a.trl:
        from es_llm.drivers.trl import ESSFTTrainer

        trainer = ESSFTTrainer(
            model=model,
            args=args,
            train_dataset=_unpadded(corpus.train),
            processing_class=_hf_tokenizer(corpus.tokenizer_path),
            es_max_length=corpus.seq_len,  # the native rows' length
        )
    else:
        trainer = ESTrainer(model=model, args=args, train_dataset=corpus.train)
    if trainer.es is None:
        raise SystemExit("the config has no evolved_sampling section")
    if a.stop_after:
        trainer.add_callback(_StopAfter(a.stop_after))
    resume = True if a.resume == "last" else a.resume
    result = trainer.train(resume_from_checkpoint=resume)
    if a.trl:  # the varying-length rows were padded back to the native rows' length
        assert trainer.es_padding["padded"] and trainer.es_padding["length"] == a.seq_len
    assert Path(a.config).read_text() == original, "the user's DeepSpeed config file was modified"
    if args.process_index == 0:
        summary = {
            "global_step": result.global_step,
            "train_loss": result.training_loss,
            "steps": len(trainer.es_log),
            "world_size": args.world_size,
        }
        with open(os.path.join(a.out, "summary.json"), "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
    # every rank reaches the end before any tears its gloo group down: a rank that exits with
    # its group alive, or destroys it while a peer still uses it, can abort at interpreter
    # exit ("terminate called without an active exception") after the training succeeded
    from es_llm import dist

    dist.destroy()
