"""Batch geometry: how B, B_meta, micro-batches and ranks fit together.

DeepSpeed checks `train_batch_size = micro * gas * world` with a bare assertion; here every
mismatch is reported with the numbers and the config field to change, before any engine is
built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from es_llm.errors import InputError


class BatchConfigError(InputError):
    pass


@dataclass(frozen=True)
class BatchGeometry:
    world: int
    train_batch: int  # B: samples back-propagated per optimizer step (all ranks)
    micro: int  # samples per micro-batch per rank
    grad_accum: int
    meta_batch: int  # B_meta: samples scored per ES step (all ranks)

    @property
    def train_per_rank(self) -> int:
        return self.train_batch // self.world

    @property
    def meta_per_rank(self) -> int:
        return self.meta_batch // self.world


def resolve_geometry(
    ds_config: dict[str, Any], world: int, selection_ratio: float
) -> BatchGeometry:
    """Resolve DeepSpeed's three batch fields for `world` ranks and derive B_meta."""
    tb = ds_config.get("train_batch_size")
    mb = ds_config.get("train_micro_batch_size_per_gpu")
    ga = ds_config.get("gradient_accumulation_steps")
    for name, v in (
        ("train_batch_size", tb),
        ("train_micro_batch_size_per_gpu", mb),
        ("gradient_accumulation_steps", ga),
    ):
        if v is not None and v != "auto" and (not isinstance(v, int) or v < 1):
            raise BatchConfigError(f"ds_config '{name}' must be a positive integer, got {v!r}")
    tb = None if tb == "auto" else tb
    mb = None if mb == "auto" else mb
    ga = None if ga == "auto" else ga
    if tb is None and mb is None:
        raise BatchConfigError(
            "ds_config needs 'train_batch_size' or 'train_micro_batch_size_per_gpu'"
        )
    if tb is None:
        ga = ga or 1
        tb = mb * ga * world
    elif mb is None:
        ga = ga or 1
        if tb % (ga * world):
            raise BatchConfigError(
                f"train_batch_size {tb} is not divisible by gradient_accumulation_steps {ga} "
                f"x {world} ranks"
            )
        mb = tb // (ga * world)
    elif ga is None:
        if tb % (mb * world):
            raise BatchConfigError(
                f"train_batch_size {tb} is not divisible by train_micro_batch_size_per_gpu {mb} "
                f"x {world} ranks = {mb * world}; change train_batch_size, the micro-batch size "
                f"or the number of ranks"
            )
        ga = tb // (mb * world)
    elif tb != mb * ga * world:
        raise BatchConfigError(
            f"train_batch_size {tb} != train_micro_batch_size_per_gpu {mb} x "
            f"gradient_accumulation_steps {ga} x {world} ranks = {mb * ga * world}"
        )
    if not 0.0 < selection_ratio <= 1.0:
        raise BatchConfigError(f"selection_ratio must be in (0, 1], got {selection_ratio}")
    meta_exact = tb / selection_ratio
    meta = round(meta_exact)
    if not math.isclose(meta, meta_exact, rel_tol=0, abs_tol=1e-6):
        raise BatchConfigError(
            f"train_batch_size {tb} / selection_ratio {selection_ratio} = {meta_exact:.4f} is not "
            f"a whole number of samples; pick a selection_ratio such that B / ratio is an integer"
        )
    if meta % world:
        raise BatchConfigError(
            f"the meta-batch ({meta} = train_batch_size {tb} / selection_ratio {selection_ratio}) "
            f"does not split evenly across {world} ranks"
        )
    return BatchGeometry(world=world, train_batch=tb, micro=mb, grad_accum=ga, meta_batch=meta)
