"""Evolved Sampling in your own Megatron-core training loop.

Your loop keeps its model, optimizer and `get_forward_backward_func`; ES changes which rows
reach your `forward_step` and how they are weighted. Per optimizer step:

    draw = data.next_step()          # this rank's meta-batch (or plain batch) of the step
    a = data.assign(draw)            # score (no-grad forward), select over the DP group
    ...your train step on a.tokens, weighting each sample's loss by a.loss_weights...
    data.observe_training_losses(a, ids, per_sample_losses)   # per micro-batch
    rec = data.finish_step(a)        # the step's record, equal on every rank
    check_tp_lockstep(...)           # TP peers trained the same rows (one all-reduce)

Trains a GPT-2 preset on a slice of the embedded corpus and prints one JSON line per step
(rank 0). On GPUs:

    torchrun --nproc_per_node 2 examples/megatron_loop.py --tensor-parallel-size 2

(tests/test_megatron_driver.py runs it on CPU through tests/megatron_launch.py, which applies
a test-only shim for megatron-core's hard-coded CUDA calls.)
"""

import argparse
import json
import os

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from es_llm import dist
from es_llm.data import load_corpus
from es_llm.drivers.deepspeed.dsconfig import load_ds_config
from es_llm.drivers.megatron.model import build_gpt
from es_llm.drivers.megatron.step import check_tp_lockstep, es_data_path, megatron_batch
from es_llm.drivers.megatron.train import optimizer_settings
from es_llm.model import load_model_preset
from es_llm.sampling.plan import RunPlan

p = argparse.ArgumentParser()
p.add_argument("--config", default="cpu_tiny")  # a JSON config with "evolved_sampling"
p.add_argument("--model", default="gpt2-tiny")
p.add_argument("--tensor-parallel-size", type=int, default=1)
p.add_argument("--seq-len", type=int, default=32)
p.add_argument("--vocab-size", type=int, default=512)
p.add_argument("--max-train-samples", type=int, default=256)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--steps", type=int, default=None)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

dist.ensure_launcher_env()  # a plain `python` start is one rank
if torch.cuda.is_available():
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel_size)

ds_config = load_ds_config(args.config)
corpus = load_corpus(
    seq_len=args.seq_len,
    vocab_size=args.vocab_size,
    max_train_samples=args.max_train_samples,
    max_val_samples=1,
    progress=False,
)
parts = build_gpt(  # or your own DDP-wrapped GPTModel and Megatron optimizer
    load_model_preset(args.model),
    vocab_size=args.vocab_size,
    seq_len=corpus.seq_len,
    seed=args.seed,
    **optimizer_settings(ds_config),
)
model, optimizer = parts.model, parts.optimizer

# the run's shape over the DATA-parallel ranks: TP peers share their samples
plan = RunPlan.build(
    ds_config,
    dp_size=parallel_state.get_data_parallel_world_size(),
    num_samples=len(corpus.train),
    epochs=args.epochs,
    seed=args.seed,
    max_steps=args.steps,
)
data = es_data_path(model, corpus.train, plan)  # collectives over the DP group only
micro, ignore = plan.geo.micro, plan.es.ignore_index


def my_train_step(a) -> torch.Tensor:
    """Your train step: the hook is the data iterator and the loss function. Returns the
    per-sample training losses (detached) in the order of `a.ids`."""
    batches = []
    for i in range(0, a.ids.numel(), micro):
        labels = a.labels[i : i + micro] if a.labels is not None else None
        batches.append((*megatron_batch(a.tokens[i : i + micro], labels, ignore),
                        a.loss_weights[i : i + micro]))  # fmt: skip
    per_sample: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        inputs, positions, target, mask, weights = next(data_iterator)
        token_losses = model(inputs, positions, None, labels=target)

        def loss_func(out: torch.Tensor):
            m = mask.float()
            per = (out.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
            per_sample.append(per.detach())
            return (per * weights).mean(), {}  # the ES weight of each sample

        return token_losses, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=a.tokens.size(1) - 1,
        micro_batch_size=micro,
        forward_only=False,
    )
    optimizer.step()
    return torch.cat(per_sample)


while (draw := data.next_step()) is not None:  # 1. this rank's samples of the step
    a = data.assign(draw)  # 2. score, select over the DP group, assign
    losses = my_train_step(a)
    for i in range(0, a.ids.numel(), micro):  # 3. plain steps update the scores from these
        data.observe_training_losses(a, a.ids[i : i + micro], losses[i : i + micro])
    rec = data.finish_step(a)  # 4. the step's record: every rank has the same
    check_tp_lockstep(draw.step, a.ids, False, parallel_state.get_tensor_model_parallel_group())
    if dist.rank() == 0:
        print(json.dumps({k: rec[k] for k in ("step", "train_loss", "digest")}), flush=True)
parallel_state.destroy_model_parallel()
dist.destroy()
