"""Every collective of es-llm, on the device its backend needs.

Why one module: NCCL accepts only CUDA tensors and gloo (here) only CPU ones, so a collective
built on the wrong device fails at run time on the other backend. Every function here takes or
builds its tensors on `device()` (DeepSpeed's accelerator device for NCCL, the CPU for gloo) and
checks what it is given with `check_device`, which names the function, the device it got and
the one the backend needs. Nothing outside this module calls torch.distributed's collectives
(tests/test_dist_guard.py fails if something does).

Everything also works without an initialised process group (world size 1), so the training
loop has one code path for 1 and W ranks. Ids travel as int64 and are never cast to float
(InfoBatch's bug): fp32 values travel as their bit patterns inside int64 records.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

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


# ---------------------------------------------------------------- devices
def accelerator_device() -> torch.device:
    """The device DeepSpeed's accelerator computes on (`cuda:<local rank>`, or `cpu`)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def accelerator_event() -> Any:
    """A timing event of DeepSpeed's accelerator (for `StepTimers` on a GPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().Event(enable_timing=True)


def device() -> torch.device:
    """The device the process group's collectives need: CPU for gloo, else the accelerator's.

    Without a process group nothing is communicated, and the accelerator's device is returned
    so that callers build their buffers where the step's tensors already are.
    """
    if is_initialized() and dist.get_backend() == "gloo":
        return torch.device("cpu")
    return accelerator_device()


class CollectiveDeviceError(RuntimeError):
    """A tensor handed to a collective lives on a device the backend cannot use."""


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def check_device(what: str, *tensors: torch.Tensor) -> None:
    """Raise if any tensor is not on the collectives' device (even without a process group:
    code that passes on one rank must not break on W)."""
    need = device()
    for t in tensors:
        if not _same_device(t.device, need):
            backend = dist.get_backend() if is_initialized() else "none (1 rank)"
            raise CollectiveDeviceError(
                f"es_llm.dist.{what}: tensor on {t.device}, but collectives of backend "
                f"{backend} need {need}; move it with .to(es_llm.dist.device())"
            )


# ---------------------------------------------------------------- collectives
# Bytes this rank put into / got out of the tensor collectives of this module (host integers
# from tensor shapes: counting costs no sync). Reported per step in summary.json.
traffic = {"collectives": 0, "bytes_sent": 0, "bytes_received": 0}


def _count(t: torch.Tensor, received_factor: int) -> None:
    if not is_initialized():
        return
    n = t.numel() * t.element_size()
    traffic["collectives"] += 1
    traffic["bytes_sent"] += n
    traffic["bytes_received"] += n * received_factor


def barrier() -> None:
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[accelerator_device().index or 0])
        else:
            dist.barrier()


def destroy() -> None:
    """Tear the process group down; without it torch aborts at interpreter exit."""
    if is_initialized():
        barrier()
        dist.destroy_process_group()


def _group_size(group: Any) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def all_reduce_min_int(value: int, group: Any = None) -> int:
    """MIN of one host integer over ranks (setup and epoch starts only: it syncs the host)."""
    if not is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def all_reduce_sum(values: list[float], group: Any = None) -> list[float]:
    """Sum a few host scalars over ranks in float64 (score sums over 10^8 samples need it).

    Epoch starts and evaluation only: it syncs the host.
    """
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [float(v) for v in t.tolist()]


def all_reduce_(t: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """In-place all-reduce of a device tensor (no host sync); op is sum, min or max."""
    check_device("all_reduce_", t)
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"all_reduce_ op must be one of {sorted(ops)}, got {op!r}")
    if is_initialized():
        _count(t, 1)
        dist.all_reduce(t, op=ops[op], group=group)
    return t


def all_gather_cat(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order (no host sync)."""
    check_device("all_gather_cat", t)
    if not is_initialized():
        return t
    t = t.contiguous()
    size = _group_size(group)
    _count(t, size - 1)
    out = torch.empty((size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # new name
    gather(out, t, group=group)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (checkpoint bookkeeping; pickles, syncs the host)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def lockstep_diverged(
    digest: torch.Tensor, flag: torch.Tensor | None = None, group: Any = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """0-dim bool tensor: did any rank compute a different 0-dim int64 `digest`? No host sync.

    Every rank all-reduces (max digest, max -digest); the ranks agree iff both equal its own.
    The caller reads the flag at its one host sync of the step and raises there.

    With `flag` (a non-negative int64 tensor on the same device) the same all-reduce also
    carries it: returns `(diverged, the largest flag of any rank)`, e.g. a stop request that
    every rank must honour at the same step.
    """
    check_device("lockstep_diverged", digest)
    d = digest.reshape(1).to(torch.int64)
    parts = [d, -d]
    if flag is not None:
        check_device("lockstep_diverged", flag)
        parts.append(flag.reshape(1).to(torch.int64))
    both = torch.cat(parts)
    all_reduce_(both, "max", group)
    diverged = (both[0] != d[0]) | (-both[1] != d[0])
    if flag is None:
        return diverged
    return diverged, both[2]


class Communicator:
    """`es_llm.sampling.comm.Communicator` over torch.distributed: one data-parallel group.

    `group=None` is the whole world (or one process without a process group); pass the
    data-parallel group of a model-parallel job (`torch.distributed.new_group`) and every
    collective of the ES data path runs over that group only. `rank` and `size` are this
    process's place in the group.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        if is_initialized():
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)
            if self.rank < 0:
                raise ValueError("this process is not a member of the communicator's group")
        else:
            if group is not None:
                raise ValueError("a process group needs torch.distributed to be initialised")
            self.rank, self.size = 0, 1
        self.device = device()

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(t, self.group)

    def lockstep_flags(
        self, digest: torch.Tensor, flag: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        diverged, any_flag = lockstep_diverged(digest, flag, self.group)
        return diverged, any_flag

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.group)

    def all_reduce_min_int(self, value: int) -> int:
        return all_reduce_min_int(value, self.group)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the group in place, on the device its backend needs, without a host
        sync (the proxy scorer's gradients); returns `t`."""
        if self.size == 1:
            return t
        _count(t, 1)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size}, device={self.device})"
