"""The `evolved_sampling` section of a DeepSpeed config, validated.

Why strict: DeepSpeed silently ignores unknown keys, so a typo or a section nested in the
wrong place would quietly train without ES. Here every unknown key and every misplaced
section is an error that names the offending field and, for numbers, the allowed range.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from es_llm.errors import InputError
from es_llm.sampling.methods import (
    Options,
    SamplingMethod,
    get_method,
    method_names,
    option_owners,
    registered,
)
from es_llm.sampling.methods.base import check_range as _check_range

# The one list of method names, from the registry (es_llm.sampling.methods): choices, --help
# and validation all derive from it.
METHODS: tuple[str, ...] = tuple(m.name for m in registered())
Method = Literal[METHODS]  # type: ignore[valid-type]

SECTION = "evolved_sampling"

# Every method's own keys, each model once, in METHODS order: they join the section's keys.
_OPTIONS: tuple[type[Options], ...] = tuple(
    dict.fromkeys(opts for m in registered() for opts in m.options)
)

# The values of `scorer`: who supplies the losses a selection step weighs: the learner's own
# no-grad forward, the stored losses (no forward), or a small separate model (`proxy_model`).
SCORERS: tuple[str, ...] = ("learner", "stale", "proxy")
# What the proxy scorer learns from: the samples the learner trains in each step, or nothing
PROXY_LEARN: tuple[str, ...] = ("trained", "none")
STALE_EPSILON = 0.1  # scorer stale's default uniform share (its reachability floor)

__all__ = [
    "ESConfigError",
    "EvolvedSamplingConfig",
    "METHODS",
    "Method",
    "PROXY_LEARN",
    "SCORERS",
    "SECTION",
    "STALE_EPSILON",
    "es_config_from_ds_config",
]


class ESConfigError(InputError):
    """A bad `evolved_sampling` section (a ValueError, so callers may catch either)."""


class _SharedKeys(BaseModel):
    """The keys of every method; a method's own keys live in its module (`Options`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    method: str = "es"  # a registered name (checked below, so a method added later validates)
    scorer: str = "learner"  # SCORERS: a fresh no-grad forward, stored losses, or a proxy
    proxy_model: str | None = None  # scorer proxy: a preset, base:PRESET[,steps=N] or HF dir
    proxy_lr: float | None = None  # scorer proxy: its AdamW rate (None: the ds_config's lr)
    proxy_learn: str = "trained"  # PROXY_LEARN: what the proxy learns from, online
    selection_ratio: float = 0.5
    beta1: float = 0.2
    beta2: float = 0.8
    s_init: float | None = None
    tau: float = 1.0
    epsilon: float = 0.0
    importance_weighting: bool = False
    burn_in_steps: int | None = None
    burn_in_epochs: int | None = None
    anneal_fraction: float = 0.0
    seed: int | None = None
    scoring_micro_batch_size: int | None = None
    ignore_index: int = -100

    # --- per-field ranges (messages name the field and the interval) ---
    @field_validator("method")
    @classmethod
    def _v_method(cls, v: str) -> str:
        names = [m.name for m in registered()]
        if v not in names:
            choices = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
            raise ValueError(f"Input should be {choices}")
        return v

    @field_validator("scorer")
    @classmethod
    def _v_scorer(cls, v: str, info: Any) -> str:
        if v not in SCORERS:
            raise ValueError(f"unknown value {v!r}; one of {', '.join(map(repr, SCORERS))}")
        name = info.data.get("method")
        if v == "proxy" and name in method_names() and not get_method(name).scoring_forward:
            raise ValueError(
                f"scorer 'proxy' does not fit method {name!r}: it has no scoring forward for "
                "a proxy to replace (it trains plain batches); use scorer 'learner'"
            )
        if v == "stale" and name in method_names():
            m = get_method(name)
            if m.scoring_forward and not m.stale_weights:
                raise ValueError(
                    f"scorer 'stale' does not fit method {name!r}: its weight needs a fresh "
                    "loss beside the stored one (a stored last loss makes it constant); use "
                    "scorer 'learner'"
                )
        return v

    @field_validator("proxy_lr")
    @classmethod
    def _v_proxy_lr(cls, v: float | None) -> float | None:
        if v is not None and (math.isinf(v) or math.isnan(v)):
            raise ValueError(f"proxy_lr must be a finite number in (0, inf) or null, got {v!r}")
        return v if v is None else _check_range("proxy_lr", v, 0.0, None, True, True)

    @field_validator("proxy_learn")
    @classmethod
    def _v_proxy_learn(cls, v: str) -> str:
        if v not in PROXY_LEARN:
            raise ValueError(f"unknown value {v!r}; one of {', '.join(map(repr, PROXY_LEARN))}")
        return v

    @field_validator("selection_ratio")
    @classmethod
    def _v_selection_ratio(cls, v: float) -> float:
        return _check_range("selection_ratio", v, 0.0, 1.0, True, False)

    @field_validator("beta1")
    @classmethod
    def _v_beta1(cls, v: float) -> float:
        return _check_range("beta1", v, 0.0, 1.0, False, False)

    @field_validator("beta2")
    @classmethod
    def _v_beta2(cls, v: float) -> float:
        return _check_range("beta2", v, 0.0, 1.0, False, True)

    @field_validator("s_init")
    @classmethod
    def _v_s_init(cls, v: float | None) -> float | None:
        if v is None:
            return v
        if math.isinf(v):
            raise ValueError(f"s_init must be a finite number in (0, inf) or null, got {v!r}")
        return _check_range("s_init", v, 0.0, None, True, True)

    @field_validator("tau")
    @classmethod
    def _v_tau(cls, v: float) -> float:
        if math.isinf(v):
            raise ValueError(f"tau must be finite and in (0, inf), got {v!r}")
        return _check_range("tau", v, 0.0, None, True, True)

    @field_validator("epsilon")
    @classmethod
    def _v_epsilon(cls, v: float, info: Any) -> float:
        v = _check_range("epsilon", v, 0.0, 1.0, False, False)
        if v == 0 and _stale_selects(info.data.get("method"), info.data.get("scorer")):
            raise ValueError(
                "epsilon must be in (0, 1] with scorer 'stale': its uniform share is what "
                "reaches samples whose stored loss is small (default "
                f"{STALE_EPSILON} when unset)"
            )
        return v

    @field_validator("anneal_fraction")
    @classmethod
    def _v_anneal_fraction(cls, v: float) -> float:
        return _check_range("anneal_fraction", v, 0.0, 1.0, False, True)

    @field_validator("burn_in_steps", "burn_in_epochs")
    @classmethod
    def _v_burn_in(cls, v: int | None, info: Any) -> int | None:
        if v is not None and v < 0:
            raise ValueError(f"{info.field_name} must be an integer in [0, inf) or null, got {v!r}")
        return v

    @field_validator("scoring_micro_batch_size")
    @classmethod
    def _v_scoring_mbs(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(
                f"scoring_micro_batch_size must be an integer in [1, inf) or null, got {v!r}"
            )
        return v

    @field_validator("seed")
    @classmethod
    def _v_seed(cls, v: int | None) -> int | None:
        # Counter-based noise hashes the seed as an unsigned 64-bit integer.
        if v is not None and not 0 <= v < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64) or null, got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _stale_defaults(cls, data: Any) -> Any:
        """scorer stale's own defaults, where the section leaves them unset: one burn-in
        epoch (every sample's loss observed before it is weighed) and epsilon STALE_EPSILON
        (a uniform share that keeps every sample reachable). See docs/algorithm.md."""
        if not isinstance(data, dict) or not _stale_selects(
            data.get("method", "es"), data.get("scorer")
        ):
            return data
        out = dict(data)
        if out.get("burn_in_steps") is None and out.get("burn_in_epochs") is None:
            out["burn_in_epochs"] = 1
        out.setdefault("epsilon", STALE_EPSILON)
        return out

    @model_validator(mode="after")
    def _v_proxy_fields(self) -> EvolvedSamplingConfig:
        if self.scorer != "proxy":
            for name in ("proxy_model", "proxy_lr"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} is set but scorer is {self.scorer!r}: it belongs to scorer "
                        "'proxy' (set scorer: proxy, or remove it)"
                    )
        return self

    @model_validator(mode="after")
    def _v_burn_in_exclusive(self) -> EvolvedSamplingConfig:
        if self.burn_in_steps is not None and self.burn_in_epochs is not None:
            raise ValueError(
                "burn_in_steps and burn_in_epochs are mutually exclusive; set at most one "
                f"(got burn_in_steps={self.burn_in_steps}, burn_in_epochs={self.burn_in_epochs})"
            )
        return self


def _stale_selects(method: Any, scorer: Any) -> bool:
    """scorer stale with a method that selects from a meta-batch (else stale changes nothing)."""
    return scorer == "stale" and method in method_names() and get_method(method).scoring_forward


# The options' bases come first, reversed, so that pydantic (which collects fields along the
# reversed MRO) lists the shared keys first and then each method's keys in METHODS order.
class EvolvedSamplingConfig(*reversed(_OPTIONS), _SharedKeys):  # type: ignore[misc]
    """ES / ESWP hyper-parameters; defaults reproduce the paper (see the spec).

    One flat section: the shared keys and every registered method's own keys. Keys that
    belong to methods other than `method` are rejected or ignored as their `Options` says.
    """

    @model_validator(mode="after")
    def _v_method_options(self) -> EvolvedSamplingConfig:
        method = get_method(self.method)
        for opts in type(self).__mro__:
            if not (isinstance(opts, type) and issubclass(opts, Options)) or opts is Options:
                continue
            if opts in method.options or not opts.foreign_is_error or not opts.in_use(self):
                continue
            raise ValueError(opts.foreign_error(method.name, option_owners(opts)))
        return self

    # --- derived views used by the training loop ---
    @property
    def sampling_method(self) -> SamplingMethod:
        """The registered method named by `method`."""
        return get_method(self.method)

    @property
    def uses_scoring_forward(self) -> bool:
        """The method selects B of a meta-batch of B / selection_ratio (uniform and prune do
        not); with scorer learner a no-grad scoring forward supplies the losses it weighs."""
        return self.sampling_method.scoring_forward

    @property
    def stale(self) -> bool:
        """Selection steps weigh the stored score and last training loss, with no scoring
        forward (scorer stale with a selecting method; a plain method is the same either way)."""
        return self.scorer == "stale" and self.uses_scoring_forward

    @property
    def proxy(self) -> bool:
        """Selection steps are scored by the proxy model, which learns online."""
        return self.scorer == "proxy" and self.uses_scoring_forward

    @property
    def runs_scoring_forward(self) -> bool:
        """A selection step runs a no-grad scoring forward (scorer learner or proxy)."""
        return self.uses_scoring_forward and not self.stale

    @property
    def uses_pruning(self) -> bool:
        """The method prunes the data set at the start of each epoch (eswp, prune)."""
        return self.sampling_method.prunes_epochs

    @property
    def plain_steps_update_scores(self) -> bool:
        """Plain steps' training losses update the scores (all but uniform)."""
        return self.sampling_method.plain_steps_update_scores

    @property
    def effective_selection_ratio(self) -> float:
        """Methods without a scoring forward back-propagate the whole meta-batch (B_meta == B)."""
        return self.selection_ratio if self.uses_scoring_forward else 1.0

    def resolved_s_init(self, num_train_samples: int) -> float:
        """s_init, or the paper's 1/N when unset (N = global number of train samples)."""
        if self.s_init is not None:
            return float(self.s_init)
        if num_train_samples <= 0:
            raise ValueError(
                f"num_train_samples must be >= 1 to derive s_init=1/N, got {num_train_samples}"
            )
        return 1.0 / num_train_samples

    def resolved_seed(self, run_seed: int) -> int:
        """The ES seed, falling back to the run's --seed."""
        return int(run_seed if self.seed is None else self.seed)


def _walk(obj: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str, Any]]:
    """Yield (parent path, key, value) for every key of every nested dict/list."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield path, str(key), value
            yield from _walk(value, (*path, str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, (*path, f"[{i}]"))


def _norm(key: str) -> str:
    return "".join(ch for ch in key.lower() if ch.isalnum())


def _format_errors(err: ValidationError) -> str:
    fields = list(EvolvedSamplingConfig.model_fields)
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = f"{SECTION}.{loc}" if loc else SECTION
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and e["loc"]:
            guess = difflib.get_close_matches(str(e["loc"][-1]), fields, n=1)
            msg = f"unknown key (allowed: {', '.join(fields)})"
            if guess:
                msg += f"; did you mean {guess[0]!r}?"
        lines.append(f"{where}: {msg}")
    return "invalid DeepSpeed config:\n  " + "\n  ".join(lines)


def es_config_from_ds_config(ds_config: dict) -> EvolvedSamplingConfig | None:
    """Read and validate ds_config["evolved_sampling"].

    Returns None when the section is absent or has enabled=false (it is still validated, so a
    typo in a disabled section is reported). Raises ESConfigError when the section is nested
    anywhere but the top level (e.g. under "data_efficiency"/"data_sampling"), when a top-level
    key is a misspelling of it, or when a field is unknown or out of range.
    """
    if not isinstance(ds_config, dict):
        raise ESConfigError(f"DeepSpeed config must be a dict, got {type(ds_config).__name__}")

    for parent, key, _ in _walk(ds_config, ()):
        if not parent and key == SECTION:
            continue
        if _norm(key) == _norm(SECTION):
            where = ".".join((*parent, key))
            raise ESConfigError(
                f"found {where!r} in the DeepSpeed config, but the {SECTION!r} section must be a "
                f"top-level key spelled exactly {SECTION!r} (DeepSpeed would silently ignore it "
                "where it is)"
            )

    section = ds_config.get(SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ESConfigError(f"{SECTION} must be a JSON object, got {type(section).__name__}")
    try:
        cfg = EvolvedSamplingConfig.model_validate(section)
    except ValidationError as err:
        raise ESConfigError(_format_errors(err)) from err
    return cfg if cfg.enabled else None
