"""What a sampling method is (`SamplingMethod`), its own config keys (`Options`) and the registry.

Why a class per method: a method's behaviour is more than its weight formula. The training
loop asks of it whether it runs the no-grad scoring forward, whether plain steps update the
scores, whether it prunes epochs, whether it draws or takes the top k; the config asks which
keys it owns. Each method answers all of that in its own module, so the rest of the code reads
traits and never tests a method's name.

Why no torch import here or in the method modules: the `evolved_sampling` config (and with
it `es-llm --help`) imports every method to learn its keys. The rules only call tensor methods
on the tensors they are given and import the torch-backed helpers when they first run.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from es_llm.errors import InputError

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = [
    "Options",
    "SamplingMethod",
    "UnknownMethodError",
    "Visit",
    "check_floor",
    "check_range",
    "ema_update",
    "get_method",
    "method_names",
    "option_owners",
    "register",
    "registered",
]


class UnknownMethodError(InputError):
    """A method name that no registered sampling method has."""


def check_range(
    name: str,
    value: float,
    lo: float | None,
    hi: float | None,
    lo_open: bool,
    hi_open: bool,
) -> float:
    """Raise a ValueError naming `name` and the interval unless `value` lies in it.

    NaN fails every comparison, so it is rejected too.
    """
    ok = isinstance(value, (int, float)) and not math.isnan(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "-inf" if lo is None else f"{lo:g}"
        right = "inf" if hi is None else f"{hi:g}"
        interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_floor(name: str, value: float) -> float:
    """A weight floor (x the meta-batch's mean weight): finite and in [0, inf)."""
    if isinstance(value, (int, float)) and math.isinf(value):
        raise ValueError(f"{name} must be finite and in [0, inf), got {value!r}")
    return check_range(name, value, 0.0, None, False, True)


def ema_update(scores: torch.Tensor, losses: torch.Tensor, beta2: float) -> torch.Tensor:
    """s_new = beta2 * s + (1 - beta2) * l (fp32 in, fp32 out): the score rule of most methods."""
    return beta2 * scores + (1.0 - beta2) * losses


@dataclass(frozen=True)
class Visit:
    """The samples a rule sees at once (a meta-batch, or a plain step's micro-batch).

    Every tensor is per sample, on one device. `scores` and `losses` are fp32; in a selection
    step an invalid sample's loss already holds its previous score. `state` holds the extra
    per-sample columns the method declares in `SamplingMethod.state` (e.g. a reference loss),
    gathered for the same samples. `valid` and `k` are set in a selection step only.
    """

    scores: torch.Tensor
    losses: torch.Tensor
    state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None
    k: int | None = None


class Options(BaseModel):
    """Keys of the `evolved_sampling` section that belong to one or more methods.

    A subclass declares its fields (with defaults) and pydantic validators, like any pydantic
    model; the config section is flat, so every method's keys sit beside the shared ones and
    each key name is taken once across all methods. A method lists the option models it reads
    in `SamplingMethod.options`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # A config that sets these keys (to other than their defaults) for a method that does not
    # list this model: True is an error naming the methods that own them; False accepts them
    # unused (for keys that configs and `compare --es` pass to every method).
    foreign_is_error: ClassVar[bool] = True

    @classmethod
    def in_use(cls, cfg: BaseModel) -> bool:
        """Whether `cfg` sets any of these keys to other than its default."""
        return any(getattr(cfg, k) != f.get_default() for k, f in cls.model_fields.items())

    @classmethod
    def foreign_error(cls, method: str, owners: tuple[str, ...]) -> str:
        """The message when method `method` is configured with these keys."""
        keys = list(cls.model_fields)
        whose = " and ".join(repr(o) for o in owners) or "no registered method"
        if len(keys) == 1:
            return f"{keys[0]} is an option of method {whose}; method {method!r} does not use it"
        return (
            f"{'/'.join(keys)} are options of method {whose}; method {method!r} does not use them"
        )

    @classmethod
    def shape_weights(
        cls, cfg: EvolvedSamplingConfig, weights: torch.Tensor, visit: Visit
    ) -> torch.Tensor:
        """Weights after these options act on a selection step's draw (default: unchanged)."""
        return weights


class SamplingMethod(ABC):
    """One sampling method: its traits, its options, its weight rule and its score rule.

    A subclass sets `name` and overrides `weights` (and `score_update` when the score is not
    the beta2 EMA of the losses), then registers itself with `@register`.
    """

    name: ClassVar[str]
    order: ClassVar[int] = 100  # position in METHODS (choices, --help), ties by name

    # --- traits the training loop reads ---
    # runs the no-grad scoring forward over a meta-batch of B / selection_ratio and selects B
    # (else every step trains on B drawn uniformly, and selection_ratio does not apply)
    scoring_forward: ClassVar[bool] = True
    # the training losses of plain steps (burn-in, anneal, no scoring forward) update scores
    plain_steps_update_scores: ClassVar[bool] = True
    # prunes below-mean-score samples at the start of each epoch (prune_ratio, delta, rescale)
    prunes_epochs: ClassVar[bool] = False
    # the weight rule still ranks samples when a sample's stored last training loss stands in
    # for a fresh one (scorer stale); False where the weight compares the two (lp)
    stale_weights: ClassVar[bool] = True
    # takes the k largest weights instead of drawing k with probability ~ w ** (1/tau)
    deterministic: ClassVar[bool] = False
    # names of the extra per-sample fp32 columns the rules read from `Visit.state`
    state: ClassVar[tuple[str, ...]] = ()
    # the option models whose keys this method reads
    options: ClassVar[tuple[type[Options], ...]] = ()

    @abstractmethod
    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        """fp32 sampling weight of each sample (before the options shape them)."""

    def score_update(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        """fp32 new score of each visited sample: the beta2 EMA of the losses by default."""
        return ema_update(visit.scores, visit.losses, cfg.beta2)

    def evaluate(
        self, cfg: EvolvedSamplingConfig, visit: Visit
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, s_new) of a selection step: the weights shaped by the options, the new scores."""
        missing = [c for c in self.state if c not in visit.state]
        if missing:
            raise ValueError(f"method {self.name!r} needs the per-sample state {missing}")
        w = self.weights(cfg, visit)
        for opts in self.options:
            w = opts.shape_weights(cfg, w, visit)
        return w, self.score_update(cfg, visit)


M = TypeVar("M", bound=type[SamplingMethod])

_REGISTRY: dict[str, SamplingMethod] = {}


def register(cls: M) -> M:
    """Class decorator: make `cls` the method of its `name` (each name once)."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__qualname__} must set name to an identifier, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"sampling method {name!r} is registered twice")
    for opts in cls.options:
        if not (isinstance(opts, type) and issubclass(opts, Options)):
            raise TypeError(f"{cls.__qualname__}.options must hold Options subclasses")
    _REGISTRY[name] = cls()  # an unimplemented abstract rule fails here, at import
    return cls


def registered() -> tuple[SamplingMethod, ...]:
    """Every registered method, in METHODS order."""
    return tuple(sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name)))


def method_names() -> tuple[str, ...]:
    """The registered names, in METHODS order."""
    return tuple(m.name for m in registered())


def get_method(name: Any) -> SamplingMethod:
    """The method registered as `name`; UnknownMethodError (an InputError) otherwise."""
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        raise UnknownMethodError(f"method must be one of {method_names()}, got {name!r}")
    return method


def option_owners(opts: type[Options]) -> tuple[str, ...]:
    """Names of the registered methods that list `opts`, in METHODS order."""
    return tuple(m.name for m in registered() if opts in m.options)
