"""The proxy scorer: a small causal LM that scores the meta-batch in the learner's place.

With `scorer: proxy`, a selection step's no-grad scoring forward runs the proxy, not the
learner; the proxy then learns online from what the learner trains (``proxy_learn:
trained``), with an AdamW of its own at a constant rate (``proxy_lr``, default the
ds_config's). Every data-parallel rank holds the same proxy: each rank back-propagates the
mean loss of its own trained samples, the gradients (and the sample count) are summed over
the data-parallel group through the `Communicator` in one all-reduce, divided by the
group's count, and every rank takes the same optimizer step. Its weights and optimizer are
part of the data path's state, so a checkpoint resumes it exactly.

Cost rule: the proxy's forward FLOPs per token must be at most `MAX_FLOPS_RATIO` of the
learner's (`es_llm.flops`, the vocabulary's head included); a larger one is refused before
any engine starts. Its tokenizer must be the learner's (the same vocabulary, token for id).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from es_llm.drivers.losses import training_losses
from es_llm.drivers.scoring import ModelScorer
from es_llm.errors import InputError
from es_llm.flops import forward_flops_per_token

__all__ = [
    "DEFAULT_PROXY_CANDIDATES",
    "MAX_FLOPS_RATIO",
    "ProxyChoice",
    "ProxyScorer",
    "build_proxy_scorer",
    "check_proxy_tokenizer",
    "choose_proxy",
    "proxy_lr",
    "spec_config",
]

MAX_FLOPS_RATIO = 0.2  # the proxy costs at most 1/5 of the learner per token (Yin & Rush)
DEFAULT_PROXY_LR = 1e-3  # when neither proxy_lr nor the ds_config's optimizer names one
# Presets tried, largest first, when scorer proxy has no proxy_model: the first within budget
DEFAULT_PROXY_CANDIDATES = ("gpt2-tiny", "gpt2-nano")


def spec_config(spec: Any, *, vocab_size: int, seq_len: int) -> Any:
    """The transformers config of a `ModelSpec` (a preset on this vocabulary, or a directory's
    own config.json), without building the model."""
    from es_llm.model import model_config

    if spec.preset is not None:
        return model_config(spec.preset, vocab_size=vocab_size, seq_len=seq_len)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec.path, trust_remote_code=False).get_text_config()


@dataclass(frozen=True)
class ProxyChoice:
    """The proxy a run uses: what names it, its model spec, and its cost against the learner."""

    name: str  # proxy_model, or the default preset chosen
    spec: Any  # es_llm.model.ModelSpec
    flops_per_token: int
    learner_flops_per_token: int
    default: bool  # chosen because proxy_model was not set
    # a base: proxy's pre-training run (wall_clock_s, cpu_time_s, steps), shared by every run
    # that names the same base; None for a preset (no pre-training) or a plain directory
    pretrain: dict[str, Any] | None = None

    @property
    def flops_ratio(self) -> float:
        return self.flops_per_token / self.learner_flops_per_token

    def summary(self) -> dict[str, Any]:
        return {
            "proxy_model": self.name,
            "default": self.default,
            "rule": (
                "the largest preset of "
                f"{', '.join(DEFAULT_PROXY_CANDIDATES)} within 1/5 of the learner's FLOPs"
                if self.default
                else "proxy_model"
            ),
            "flops_per_token": self.flops_per_token,
            "learner_flops_per_token": self.learner_flops_per_token,
            "flops_ratio": self.flops_ratio,
            "pretrain": self.pretrain,
        }


def choose_proxy(
    proxy_model: str | None,
    learner_config: Any,
    *,
    vocab_size: int,
    seq_len: int,
    proxy_path: str | None = None,
) -> ProxyChoice:
    """The run's proxy and its FLOPs ratio; InputError (naming `proxy_model`) when it is
    more than `MAX_FLOPS_RATIO` of the learner or no default preset is small enough.

    `proxy_path`: the directory a ``base:`` proxy_model was resolved to (built once, cached).
    """
    from es_llm.model import resolve_model

    learner = forward_flops_per_token(learner_config, seq_len)
    if proxy_model is None:
        for name in DEFAULT_PROXY_CANDIDATES:
            spec = resolve_model(name)
            cost = forward_flops_per_token(
                spec_config(spec, vocab_size=vocab_size, seq_len=seq_len), seq_len
            )
            if cost <= MAX_FLOPS_RATIO * learner:
                return ProxyChoice(name, spec, cost, learner, default=True)
        raise InputError(
            f"evolved_sampling.proxy_model is not set and no default preset "
            f"({', '.join(DEFAULT_PROXY_CANDIDATES)}) costs at most 1/5 of the learner's "
            f"{learner / 1e6:.2f} MFLOPs per token: name a smaller proxy_model, or train a "
            "larger learner"
        )
    spec = resolve_model(proxy_path or proxy_model)
    cost = forward_flops_per_token(
        spec_config(spec, vocab_size=vocab_size, seq_len=seq_len), seq_len
    )
    if cost > MAX_FLOPS_RATIO * learner:
        raise InputError(
            f"evolved_sampling.proxy_model {proxy_model!r} costs {cost / 1e6:.2f} MFLOPs per "
            f"token, {cost / learner:.2f} of the learner's {learner / 1e6:.2f}: a proxy may "
            f"cost at most {MAX_FLOPS_RATIO:.2f} (1/5); choose a smaller one"
        )
    return ProxyChoice(proxy_model, spec, cost, learner, default=False)


def _vocab(tokenizer_file: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)


def check_proxy_tokenizer(
    proxy_model: str, proxy_dir: Path, learner_tokenizer: Path | dict[str, int]
) -> None:
    """A proxy directory's tokenizer maps every token to the learner's id (InputError, one
    line naming proxy_model, otherwise). `learner_tokenizer`: the run's tokenizer.json, or
    its vocabulary (token -> id, added tokens included)."""
    from es_llm.data.tokenizer import resolve_tokenizer_file

    try:
        proxy_file, _ = resolve_tokenizer_file(str(proxy_dir))
    except (InputError, OSError, ValueError) as e:
        raise InputError(
            f"evolved_sampling.proxy_model {proxy_model!r}: {proxy_dir} has no tokenizer to "
            f"compare with the learner's ({str(e).splitlines()[0] if str(e) else e!r}); save "
            "the proxy with the learner's tokenizer"
        ) from e
    mine = (
        dict(learner_tokenizer)
        if isinstance(learner_tokenizer, dict)
        else _vocab(Path(learner_tokenizer))
    )
    theirs = _vocab(proxy_file)
    if mine != theirs:
        differ = len(set(mine.items()) ^ set(theirs.items()))
        raise InputError(
            f"evolved_sampling.proxy_model {proxy_model!r}: its tokenizer is not the "
            f"learner's ({len(theirs)} vs {len(mine)} tokens, {differ} token/id pairs "
            "differ): a proxy must read the learner's token ids"
        )


def _no_dropout(model: nn.Module) -> nn.Module:
    """The same proxy on every rank and across resumes: no random dropout masks."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


class ProxyScorer:
    """The `Scorer` of scorer proxy: no-grad per-sample losses of `model`, plus `learn`.

    `comm` is the data-parallel communicator (`es_llm.dist.Communicator`): `learn` sums the
    gradients over it. `autocast` (optional) is the dtype of the learner's mixed precision
    (bf16/fp16 on an accelerator); the proxy's weights and optimizer stay fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        comm: Any,
        micro_batch: int,
        lr: float,
        learn: str = "trained",
        ignore_index: int = -100,
        autocast: torch.dtype | None = None,
        choice: ProxyChoice | None = None,
    ) -> None:
        self.model = _no_dropout(model)
        self.comm = comm
        self.micro_batch = int(micro_batch)
        self.learn_rule = learn
        self.ignore_index = ignore_index
        self.autocast = autocast
        self.choice = choice
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0
        )
        self.lr = float(lr)
        self.updates = 0
        self._score = ModelScorer(
            lambda: self.model, micro_batch=micro_batch, ignore_index=ignore_index
        )

    def _cast(self) -> Any:
        device = next(self.model.parameters()).device
        if self.autocast is None or device.type == "cpu":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast)

    def __call__(
        self, tokens: Tensor, ids: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        with self._cast():
            return self._score(tokens, ids, labels)

    def learn(self, tokens: Tensor, labels: Tensor | None, mask: Tensor) -> None:
        """One optimizer step on the mean loss of the rows `mask` keeps (bool [n]) over every
        data-parallel rank; every rank calls it in the same step (a collective)."""
        if self.learn_rule == "none":
            return
        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        n_local = torch.zeros((), dtype=torch.float32, device=tokens.device)
        total = None
        for i in range(0, tokens.size(0), self.micro_batch):
            mb = tokens[i : i + self.micro_batch]
            lab = labels[i : i + self.micro_batch] if labels is not None else None
            keep = mask[i : i + self.micro_batch].to(tokens.device)
            with self._cast():
                logits = model(input_ids=mb, use_cache=False).logits
            per_sample, count = training_losses(logits, mb, self.ignore_index, lab)
            keep = keep & (count > 0)
            loss = torch.where(keep, per_sample, torch.zeros_like(per_sample)).sum()
            loss.backward()
            n_local = n_local + keep.sum().to(torch.float32)
            total = loss.detach() if total is None else total + loss.detach()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [n_local.reshape(1)])
        flat = flat.to(self.comm.device)
        self.comm.all_reduce_sum_(flat)
        count = flat[-1].clamp(min=1.0)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = (flat[offset : offset + n] / count).view_as(p).to(p.device, p.dtype)
            offset += n
        self.optimizer.step()
        self.updates += 1

    def summary(self) -> dict[str, Any]:
        """What summary.json records of the proxy: its choice and cost ratio, its learning."""
        return {
            **(self.choice.summary() if self.choice is not None else {}),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "learn": self.learn_rule,
            "lr": self.lr,
            "updates": self.updates,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and plain containers (weights_only-safe)."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])

    def parameters(self) -> Iterable[nn.Parameter]:
        return self.model.parameters()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _pretrain_cost(model_dir: Path) -> dict[str, Any] | None:
    """A cached base's pre-training cost (its pretrain_summary.json), or None."""
    from es_llm.base_models import PRETRAIN_SUMMARY

    path = model_dir / PRETRAIN_SUMMARY
    if not path.is_file():
        return None
    import json

    s = json.loads(path.read_text())
    return {k: s.get(k) for k in ("wall_clock_s", "cpu_time_s", "steps")}


def proxy_lr(es: Any, ds_config: dict[str, Any] | None) -> float:
    """The proxy's constant AdamW rate: ``proxy_lr``, else the ds_config optimizer's ``lr``,
    else `DEFAULT_PROXY_LR`."""
    if es.proxy_lr is not None:
        return float(es.proxy_lr)
    lr = ((ds_config or {}).get("optimizer") or {}).get("params", {}).get("lr")
    return float(lr) if isinstance(lr, (int, float)) and lr > 0 else DEFAULT_PROXY_LR


def _autocast_dtype(ds_config: dict[str, Any] | None) -> torch.dtype | None:
    """The learner's mixed precision in the ds_config (the proxy scores under it on an
    accelerator; its weights stay fp32)."""
    cfg = ds_config or {}
    if (cfg.get("bf16") or {}).get("enabled") is True:
        return torch.bfloat16
    if (cfg.get("fp16") or {}).get("enabled") is True:
        return torch.float16
    return None


def build_proxy_scorer(
    es: Any,
    learner_config: Any,
    *,
    comm: Any,
    micro_batch: int,
    seq_len: int,
    device: torch.device | str,
    ds_config: dict[str, Any] | None = None,
    proxy_path: str | None = None,
    learner_vocab: Path | dict[str, int] | None = None,
    eod_id: int | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
) -> ProxyScorer:
    """The `ProxyScorer` of a run with ``scorer: proxy``: the chosen proxy (`choose_proxy`,
    refusing one over 1/5 of the learner's FLOPs), its tokenizer checked against the
    learner's (`learner_vocab`: a tokenizer.json or a vocabulary; None skips the check), its
    weights initialised from `seed` on every rank alike (the caller's RNG is left as it was),
    on `device`.

    `learner_config`: the learner's transformers config. `proxy_path`: the directory a
    ``base:`` proxy_model was built into (``es-llm train`` resolves it before the run; other
    callers pass a preset or a directory as proxy_model). `vocab_size`: the tokenizer's id
    bound, when it is smaller than the learner's (padded) vocabulary.
    """
    from es_llm.base_models import is_base_spec
    from es_llm.model import load_model

    if is_base_spec(es.proxy_model) and proxy_path is None:
        raise InputError(
            f"evolved_sampling.proxy_model {es.proxy_model!r} is a base: spec, which es-llm "
            "train builds before the run; here give a preset or the directory the base was "
            "built into (es_llm.base_models.ensure_base_model returns it)"
        )
    vocab_size = int(learner_config.vocab_size)
    choice = choose_proxy(
        es.proxy_model,
        learner_config,
        vocab_size=vocab_size,
        seq_len=seq_len,
        proxy_path=proxy_path,
    )
    if choice.spec.pretrained and learner_vocab is not None:
        check_proxy_tokenizer(choice.name, choice.spec.path, learner_vocab)
    if choice.spec.pretrained:
        choice = replace(choice, pretrain=_pretrain_cost(Path(choice.spec.path)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model(choice.spec, vocab_size=vocab_size, seq_len=seq_len, eod_id=eod_id)
    return ProxyScorer(
        model.to(device),
        comm=comm,
        micro_batch=micro_batch,
        lr=proxy_lr(es, ds_config),
        learn=es.proxy_learn,
        ignore_index=es.ignore_index,
        autocast=_autocast_dtype(ds_config),
        choice=choice,
    )
