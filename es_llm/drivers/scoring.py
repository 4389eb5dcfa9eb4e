"""The no-grad scoring forward: per-sample losses of a Hugging Face causal LM.

ES scores every sample of every meta-batch, so this is the hot path. When the model exposes
its final hidden states and output embedding, the loss is computed by the fused linear
kernel and the ``[B, T, V]`` logits never exist; otherwise a plain forward feeds
``per_sample_loss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from es_llm.kernels import fused_linear_per_sample_loss, per_sample_loss

# Config attributes that mean the logits are more than ``lm_head(hidden)`` (Gemma soft-capping,
# Cohere/Granite scaling, ...): such models take the plain forward.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
    "mup_width_multiplier",
)


def _unwrap(module: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DeepSpeed engine / DDP wrapper."""
    while not hasattr(module, "get_output_embeddings") and isinstance(
        getattr(module, "module", None), nn.Module
    ):
        module = module.module
    return module


def _fused_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(base_model, lm_head)`` when ``logits == lm_head(base_model(...)[0])``, else None."""
    get_out = getattr(model, "get_output_embeddings", None)
    base = getattr(model, "base_model", None)
    if get_out is None or not isinstance(base, nn.Module) or base is model:
        return None
    head = get_out()
    if not isinstance(head, nn.Linear):
        return None
    config = getattr(model, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, False):
            return None
    return base, head


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for reading; a no-op for ordinary ones."""
    partitioned = [
        p for p in params if p is not None and (hasattr(p, "ds_id") or hasattr(p, "ds_status"))
    ]
    if not partitioned:
        yield
        return
    import deepspeed  # lazy: only ZeRO-3 runs reach this

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def scoring_losses(
    module: nn.Module,
    input_ids: Tensor,
    *,
    ignore_index: int = -100,
    labels: Tensor | None = None,
    use_fused_linear: bool = True,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sequence ``(loss_sum fp32 [B], count fp32 [B])`` of ``module`` on ``input_ids [B, T]``.

    ``labels`` default to ``input_ids``; position ``t`` predicts ``labels[:, t + 1]`` (the
    causal shift happens here). Runs under ``torch.no_grad()`` and leaves the module's
    train/eval mode alone. Mean loss per sequence = ``loss_sum / count`` where ``count > 0``.
    """
    model = _unwrap(module)
    if labels is None:
        labels = input_ids
    if labels.shape != input_ids.shape or input_ids.dim() != 2:
        raise ValueError("input_ids and labels must both be [B, T]")
    target = labels[:, 1:]
    kwargs: dict = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    with torch.no_grad():
        parts = _fused_parts(model) if use_fused_linear else None
        if parts is not None:
            base, head = parts
            hidden = base(**kwargs)[0][:, :-1]
            with _gathered([head.weight, head.bias]):
                return fused_linear_per_sample_loss(
                    hidden, head.weight, target, ignore_index=ignore_index, bias=head.bias
                )
        # The engine (not the bare model) is called so ZeRO-3 hooks and autocast apply.
        logits = module(**kwargs).logits[:, :-1]
        return per_sample_loss(logits, target, ignore_index=ignore_index)


class Scorer(Protocol):
    """What the ES data path calls to score a meta-batch: ``(tokens [n, T], ids [n])`` ->
    ``(mean loss fp32 [n], valid bool [n])`` on the tokens' device, without a host sync.

    When the training set has a ``labels`` column the data path calls
    ``scorer(tokens, ids, labels)`` (int64 [n, T], -100 on tokens that are not trained): the
    loss is then the mean over the tokens whose label is not ignored, and a sample without
    any such token is invalid. Data without labels is scored with two arguments, so a scorer
    that knows nothing of labels keeps working there.

    The seam for tests and for other scoring models: `ESDataPath(..., scorer=...)`.
    """

    def __call__(
        self, tokens: Tensor, ids: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


class ModelScorer:
    """The default scorer: `scoring_losses` of the training model, in chunks, in eval mode.

    `module` is a callable returning the module to run (the engine's, or the Trainer's
    wrapped model once it exists).
    """

    def __init__(
        self,
        module: Callable[[], nn.Module],
        *,
        micro_batch: int,
        ignore_index: int = -100,
        use_fused_linear: bool = True,
    ) -> None:
        self.module = module
        self.micro_batch = int(micro_batch)
        self.ignore_index = ignore_index
        self.use_fused_linear = use_fused_linear

    def __call__(
        self, tokens: Tensor, ids: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        module = self.module()
        was_training = module.training
        module.eval()
        sums, counts = [], []
        chunks = tokens.split(self.micro_batch)
        lab_chunks = labels.split(self.micro_batch) if labels is not None else [None] * len(chunks)
        try:
            for chunk, lab in zip(chunks, lab_chunks, strict=True):
                s, c = scoring_losses(
                    module,
                    chunk,
                    ignore_index=self.ignore_index,
                    labels=lab,
                    use_fused_linear=self.use_fused_linear,
                )
                sums.append(s.float())
                counts.append(c.float())
        finally:
            module.train(was_training)
        loss_sum, count = torch.cat(sums), torch.cat(counts)
        loss = loss_sum / count.clamp(min=1)
        return loss, (count > 0) & torch.isfinite(loss)
