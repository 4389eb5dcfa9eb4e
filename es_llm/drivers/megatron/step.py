"""One ES step on a Megatron-core model: scoring, the weighted train step, lock-step checks.

Token layout: es-llm's rows are `input_ids` (and optional `labels`, -100 where not trained)
of length T, and position t predicts labels[t + 1]. Megatron's `GPTModel` takes inputs and
already-shifted labels, so a row becomes inputs `tokens[:, :-1]`, labels `target[:, 1:]`
(unlabelled places set to token 0 and masked out) and a mask. With labels `GPTModel` returns
per-token losses [b, T-1]; with tensor parallelism they come from the vocab-parallel cross
entropy and are equal on every TP rank. A sample's loss is their mean over its labelled
tokens, exactly `es_llm.drivers.losses.training_losses`.

The train step's loss is `weighted_step_loss`'s: per micro-batch the mean of ES weight x
per-sample loss; the schedule divides it by the number of micro-batches and Megatron's DDP
averages the gradients over the data-parallel group, as DeepSpeed does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from es_llm import dist
from es_llm.drivers.megatron.model import MegatronParts
from es_llm.sampling.datapath import ESDataPath, StepAssignment
from es_llm.sampling.plan import RunPlan

__all__ = [
    "MegatronScorer",
    "TensorParallelDivergedError",
    "check_tp_lockstep",
    "es_data_path",
    "ids_digest",
    "megatron_batch",
    "token_loss_sums",
    "train_step",
]


def megatron_batch(
    tokens: torch.Tensor, labels: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [b, T-1], position ids, shifted labels, label mask bool) of es-llm rows."""
    target = (tokens if labels is None else labels)[:, 1:]
    inputs = tokens[:, :-1].contiguous()
    mask = target != ignore_index
    shifted = torch.where(mask, target, torch.zeros_like(target)).contiguous()
    positions = torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs).contiguous()
    return inputs, positions, shifted, mask


def per_sample_mean(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fp32 [b]: mean of the labelled tokens' losses per row (0 for a row without any)."""
    m = mask.to(torch.float32)
    return (token_losses.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


@torch.no_grad()
def token_loss_sums(
    model: Any, tokens: torch.Tensor, labels: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 sum of the labelled tokens' losses [b], their count [b]) of one no-grad forward
    of es-llm rows (the caller sets eval mode)."""
    inputs, pos, target, mask = megatron_batch(tokens, labels, ignore_index)
    out = model(inputs, pos, None, labels=target)
    return (out.float() * mask).sum(dim=1), mask.sum(dim=1)


class MegatronScorer:
    """The no-grad scoring forward (`es_llm.drivers.scoring.Scorer`) of a Megatron model.

    Every tensor-parallel rank runs it on the same rows (its data path drew them), so the
    vocab-parallel cross entropy's collectives line up. Eval mode during the forward (no
    dropout), the previous mode after it.
    """

    def __init__(self, model: Any, *, micro_batch: int, ignore_index: int = -100) -> None:
        self.model, self.micro_batch, self.ignore_index = model, int(micro_batch), ignore_index

    @torch.no_grad()
    def __call__(
        self, tokens: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            sums, counts = [], []
            for i in range(0, tokens.size(0), self.micro_batch):
                lab = labels[i : i + self.micro_batch] if labels is not None else None
                s, c = token_loss_sums(
                    self.model, tokens[i : i + self.micro_batch], lab, self.ignore_index
                )
                sums.append(s)
                counts.append(c)
        finally:
            self.model.train(was_training)
        total, count = torch.cat(sums), torch.cat(counts)
        loss = total / count.clamp(min=1)
        return loss, (count > 0) & torch.isfinite(loss)


def train_step(
    parts: MegatronParts, a: StepAssignment, plan: RunPlan, timers: Any = None
) -> torch.Tensor:
    """Train the step's assignment through `get_forward_backward_func` and one optimizer
    step; returns the per-sample training losses fp32 [B/W] (detached, in the assignment's
    order), for the data path's `observe_training_losses`. `timers` (the data path's
    `StepTimers`) times the forward/backward and the optimizer step apart."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    span = timers.span if timers is not None else (lambda _name: contextlib.nullcontext())

    micro, ignore = plan.geo.micro, plan.es.ignore_index
    n = a.ids.numel()
    batches = []
    for i in range(0, n, micro):
        lab = a.labels[i : i + micro] if a.labels is not None else None
        batches.append(
            (*megatron_batch(a.tokens[i : i + micro], lab, ignore), a.loss_weights[i : i + micro])
        )
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator: Iterator[Any], model: Any) -> tuple[torch.Tensor, Any]:
        inputs, pos, target, mask, weights = next(data_iterator)
        out = model(inputs, pos, None, labels=target)

        def loss_func(token_losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            per = per_sample_mean(token_losses, mask)
            collected.append(per.detach())
            loss = (per * weights.to(per.device)).mean()
            return loss, {"loss": per.detach().mean()}

        return out, loss_func

    with span("train_fwd_bwd_s"):
        parts.model.zero_grad_buffer()
        parts.optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[parts.model],
            num_microbatches=len(batches),
            seq_length=a.tokens.size(1) - 1,
            micro_batch_size=micro,
            forward_only=False,
        )
    with span("optimizer_s"):  # the DP gradient all-reduce ran at the end of the schedule
        parts.optimizer.step()
    return torch.cat(collected)


_DIGEST_MULT = 0x5DEECE66D  # odd: every position changes the digest


def ids_digest(step: int, ids: torch.Tensor) -> torch.Tensor:
    """0-dim int64 digest of a step's ids in order (wrapping int64 arithmetic, no host sync)."""
    ids = ids.to(torch.int64).reshape(-1)
    pos = torch.arange(1, ids.numel() + 1, dtype=torch.int64, device=ids.device)
    return ((ids + 1) * (pos * _DIGEST_MULT + 1)).sum() + int(step) * 0x9E3779B1


class TensorParallelDivergedError(RuntimeError):
    """Tensor-parallel peers were about to train different samples in the same step: their
    ES data paths went out of lock-step (different seeds, configs or data)."""


def check_tp_lockstep(step: int, ids: torch.Tensor, stop: bool, tp_group: Any) -> bool:
    """Raise unless every rank of `tp_group` trained exactly `ids` at `step`; return whether
    any of them stops after this step (a signal can reach tensor-parallel peers, which sit in
    different data-parallel groups, on either side of a step boundary: they agree here). One
    all-reduce over the tensor-parallel group, read at one host sync."""
    if not dist.is_initialized() or torch.distributed.get_world_size(tp_group) == 1:
        return stop
    dev = dist.device()
    flag = torch.full((1,), int(stop), dtype=torch.int64, device=dev)
    diverged, any_stop = dist.lockstep_diverged(ids_digest(step, ids.to(dev)), flag, group=tp_group)
    both = torch.stack([diverged.to(torch.int64).reshape(()), any_stop.reshape(())]).tolist()
    if both[0]:
        raise TensorParallelDivergedError(
            f"rank {dist.rank()}: step {step + 1}: tensor-parallel peers trained different "
            "samples; every rank of a tensor-parallel group must use the same seed, config "
            "and data"
        )
    return bool(both[1])


def es_data_path(
    model: Any, train_dataset: Any, plan: RunPlan, *, scorer: Any = None, group: Any = None
) -> ESDataPath:
    """The ES data path of this rank over Megatron's data-parallel group.

    `model` is the (DDP-wrapped) Megatron GPT model whose no-grad forward scores a step's
    meta-batch (`MegatronScorer`); `scorer` replaces it. `group` defaults to
    `parallel_state.get_data_parallel_group()`: the data path's collectives (record gathers,
    lock-step checks) span the DP peers only, and each tensor-parallel rank keeps its own
    copy, equal to its TP peers' by construction (same seed, same DP rank, same data).
    """
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group()
    comm = dist.Communicator(group)
    if scorer is None:
        scorer = MegatronScorer(
            model, micro_batch=plan.scoring_micro_batch, ignore_index=plan.es.ignore_index
        )
    device = next(model.parameters()).device
    return ESDataPath(plan, train_dataset, comm=comm, device=device, scorer=scorer)
