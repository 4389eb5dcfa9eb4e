"""What the Megatron-core driver refuses, checked before any process group is created.

Why a module of its own without Megatron imports: every check here reads only the run's
settings (parallel sizes, the model preset, the ES section), so a bad run stops with one line
(`InputError`) before `torch.distributed` or Megatron's parallel state is touched, and the
checks run where megatron-core is not installed (the first check says so).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from es_llm.errors import InputError
from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = [
    "MEGATRON_VERSION",
    "SCORERS",
    "ParallelSizes",
    "check_es_fields",
    "check_model_fits",
    "parallel_sizes",
    "require_megatron",
]

MEGATRON_VERSION = "0.16.1"  # the version the `megatron` extra pins and the tests run


def require_megatron() -> None:
    """Raise a one-line InputError when megatron-core is not importable."""
    if importlib.util.find_spec("megatron") is None or (
        importlib.util.find_spec("megatron.core") is None
    ):
        raise InputError(
            "the Megatron-core driver needs megatron-core, which is not installed: "
            'pip install -c constraints.txt -e ".[megatron]"'
        )


@dataclass(frozen=True)
class ParallelSizes:
    """The run's tensor (tp), pipeline (pp) and data (dp) parallel sizes; tp x pp x dp = world."""

    tp: int
    pp: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def parallel_sizes(world_size: int, tp: int = 1, pp: int = 1) -> ParallelSizes:
    """The data-parallel size of `world_size` processes at tensor size `tp` and pipeline size
    `pp`, or a one-line InputError naming the flag that does not fit."""
    for name, v in (("--tensor-parallel-size", tp), ("--pipeline-parallel-size", pp)):
        if int(v) < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    if pp != 1:
        raise InputError(
            f"--pipeline-parallel-size {pp}: the Megatron-core driver supports pipeline size 1 "
            "only; per-sample losses exist on the last stage alone and are not yet broadcast "
            "over the pipeline group, so earlier stages could not keep their ES state"
        )
    if world_size % (tp * pp) != 0:
        raise InputError(
            f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp} = {tp * pp} does not "
            f"divide the world size {world_size}: tp x pp x dp must equal the number of "
            "processes"
        )
    return ParallelSizes(tp=int(tp), pp=int(pp), dp=world_size // (tp * pp))


def check_model_fits(
    *, heads: int, vocab_size: int, tp: int, preset: str = "the model", kv_heads: int | None = None
) -> None:
    """Megatron splits attention heads, key/value head groups and the vocabulary over the
    tensor-parallel ranks."""
    if heads % tp:
        raise InputError(
            f"--tensor-parallel-size {tp} does not divide the {heads} attention heads of "
            f"{preset}: choose a tensor size that divides them"
        )
    if kv_heads is not None and kv_heads % tp:
        raise InputError(
            f"--tensor-parallel-size {tp} does not divide the {kv_heads} key/value heads "
            f"(num_key_value_heads) of {preset}: choose a tensor size that divides them"
        )
    if vocab_size % tp:
        raise InputError(
            f"--tensor-parallel-size {tp} does not divide {preset}'s vocabulary of {vocab_size}: "
            "set the preset's vocab_size (or --vocab-size) to a multiple of it"
        )


# what supplies a selection step's losses, among those this driver computes: its own model's
# no-grad forward (learner) or the stored last training losses (stale)
SCORERS = ("learner", "stale")


def check_es_fields(es: EvolvedSamplingConfig) -> None:
    """Refuse the `evolved_sampling` settings this driver cannot honour yet."""
    scorer = getattr(es, "scorer", "learner")
    if scorer not in SCORERS:
        raise InputError(
            f"evolved_sampling.scorer {scorer!r}: the Megatron-core driver scores with "
            f"{' or '.join(SCORERS)} only (a separate scoring model is not built on "
            "Megatron yet): use one of them, or the DeepSpeed engine"
        )
    cols = tuple(es.sampling_method.state)
    if cols:
        raise InputError(
            f"evolved_sampling.method {es.method!r} needs the per-sample state {list(cols)} "
            "(a reference model's losses), which the Megatron-core driver does not compute "
            "yet: use another method, or the DeepSpeed engine"
        )
