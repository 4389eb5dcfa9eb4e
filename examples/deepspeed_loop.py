"""Evolved Sampling in your own DeepSpeed training loop.

One factory builds the ES data path from the engine, the dataset and the DeepSpeed config;
four calls around forward/backward/step do the rest. Trains a preset model on a slice of the
embedded corpus (the interpreter's standard library) and prints one JSON line per step:

    python examples/deepspeed_loop.py --config cpu_tiny --steps 10
    deepspeed --num_gpus 2 examples/deepspeed_loop.py --config zero1_bf16 --model gpt2-124m
"""

import argparse
import json

import deepspeed
import torch

from es_llm import dist
from es_llm.data import load_corpus
from es_llm.drivers.deepspeed.dsconfig import load_ds_config
from es_llm.drivers.deepspeed.seam import engine_config, es_data_path
from es_llm.drivers.losses import weighted_step_loss
from es_llm.model import load_model, resolve_model
from es_llm.sampling.plan import RunPlan

p = argparse.ArgumentParser()
p.add_argument("--config", default="cpu_tiny")  # a DeepSpeed config with "evolved_sampling"
p.add_argument("--model", default="gpt2-tiny")
p.add_argument("--seq-len", type=int, default=32)
p.add_argument("--vocab-size", type=int, default=512)
p.add_argument("--max-train-samples", type=int, default=256)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--steps", type=int, default=None)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
args = p.parse_args()

dist.ensure_launcher_env()  # a plain `python` start is one rank
deepspeed.init_distributed()
torch.manual_seed(args.seed)
ds_config = load_ds_config(args.config)
corpus = load_corpus(
    seq_len=args.seq_len,
    vocab_size=args.vocab_size,
    max_train_samples=args.max_train_samples,
    max_val_samples=1,
    progress=False,
)
model = load_model(  # a preset with random weights, or a local Hugging Face model directory
    resolve_model(args.model),
    vocab_size=corpus.vocab_size,
    seq_len=corpus.seq_len,
    eod_id=corpus.eod_id,
)

# the run's shape (batch geometry, planned steps, burn-in) sizes the engine and its LR schedule
plan = RunPlan.build(
    ds_config,
    dp_size=dist.world_size(),
    num_samples=len(corpus.train),
    epochs=args.epochs,
    seed=args.seed,
    max_steps=args.steps,
)
engine, *_ = deepspeed.initialize(
    model=model, model_parameters=model.parameters(), config=engine_config(ds_config, plan)
)
data = es_data_path(engine, corpus.train, plan)

micro = plan.geo.micro
while (draw := data.next_step()) is not None:  # 1. this rank's samples of the step
    a = data.assign(draw)  # 2. score, select globally, assign (or the plain batch)
    for i in range(0, a.ids.numel(), micro):
        mb = a.tokens[i : i + micro]
        labels = a.labels[i : i + micro] if a.labels is not None else None
        weights = a.loss_weights[i : i + micro]
        logits = engine(input_ids=mb).logits
        loss, per_sample = weighted_step_loss(logits, mb, weights, plan.es.ignore_index, labels)
        engine.backward(loss)
        engine.step()
        data.observe_training_losses(a, a.ids[i : i + micro], per_sample)  # 3.
    rec = data.finish_step(a)  # 4. the step's record: every rank has the same
    if dist.rank() == 0:
        print(json.dumps({k: rec[k] for k in ("step", "train_loss", "digest")}), flush=True)
dist.destroy()
