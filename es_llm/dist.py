"""Data-parallel collectives used by the ES data path.

Everything here works without an initialised process group too (world size 1), so the
training loop has one code path for 1 and W ranks. Ids travel as int64 and losses as fp32
in separate tensors: an id is never cast to float (InfoBatch's bug).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from es_llm.errors import InputError


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_launcher_env() -> None:
    """Fill in the rendezvous variables for a plain `python`/`es-llm` start (one rank).

    The `deepspeed` launcher sets RANK/WORLD_SIZE/MASTER_*; without them DeepSpeed falls back
    to MPI discovery, which fails on machines without mpi4py.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


TIMEOUT_ENV = "ES_LLM_DIST_TIMEOUT_S"


def collective_timeout() -> timedelta | None:
    """Collective timeout from $ES_LLM_DIST_TIMEOUT_S (seconds); None keeps torch's default.

    Why: when a rank dies, the survivors block in their next collective. On one node the
    deepspeed launcher kills them at once; across nodes (each launcher sees only its own ranks)
    a short timeout makes them fail instead of hanging until torch's default (30 min).
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        seconds = float(raw)
    except ValueError as e:
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from e
    if seconds <= 0:
        raise InputError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return timedelta(seconds=seconds)


def share_cpu_threads() -> None:
    """On CPU, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    Without it every rank starts one intra-op thread per core, and W ranks on a few cores
    spend their time contending (2 ranks on 2 cores ran about 6x slower here).
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(1, local)))


def destroy() -> None:
    """Tear the process group down; without it torch aborts at interpreter exit."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_min_int(value: int) -> int:
    if not is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few scalars over ranks in float64 (score sums over 10^8 samples need it)."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order."""
    if not is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


@dataclass
class GatheredMetaBatch:
    """The global meta-batch as every rank sees it after the all-gather (rank-major order)."""

    ids: torch.Tensor  # int64 [M]
    losses: torch.Tensor  # fp32 [M]
    scores: torch.Tensor  # fp32 [M] previous scores s(t-1)
    valid: torch.Tensor  # bool [M]
    tokens: torch.Tensor  # int64 [M, T]


def gather_meta_batch(
    ids: torch.Tensor,
    losses: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    tokens: torch.Tensor,
) -> GatheredMetaBatch:
    if ids.dtype != torch.int64:
        raise TypeError(f"sample ids must be int64, got {ids.dtype}")
    return GatheredMetaBatch(
        ids=all_gather_cat(ids),
        losses=all_gather_cat(losses.float()),
        scores=all_gather_cat(scores.float()),
        valid=all_gather_cat(valid.to(torch.uint8)).bool(),
        tokens=all_gather_cat(tokens.to(torch.int64)),
    )


def check_lockstep(digest: str) -> None:
    """Fail loudly if ranks selected different samples (they must compute the same set)."""
    if not is_initialized():
        return
    value = int(digest[:15], 16)
    t = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != value or int(-t[1]) != value:
        raise RuntimeError(
            f"rank {rank()}: selection diverged across data-parallel ranks "
            f"(local digest {digest[:15]}); check that every rank uses the same seed and config"
        )
