"""TEST ONLY: run megatron-core 0.16.1 on the CPU (gloo) by patching its hard-coded CUDA calls.

Why: the Megatron-core driver is written for GPUs and runs unpatched there; the tests run it
on this CPU-only machine with real gloo processes. megatron-core builds some tensors with
`device="cuda"` or `torch.cuda.current_device()` (the default causal mask, the schedule's
token counter, the optimizer's and clip_grads' scalars) and keeps a CUDA RNG tracker for
tensor-parallel dropout. `apply()` makes those land on the CPU, in this process only:

* tensor factories (`torch.zeros`, `ones`, `empty`, `full`, `tensor`, `arange`) and
  `Tensor.cuda` map a CUDA device to the CPU;
* `torch.cuda.current_device()` is the CPU device;
* gradient clipping scales the gradients without asserting they are CUDA tensors;
* the CUDA RNG tracker keeps its names but forks nothing (dropout uses the CPU generator),
  and `model_parallel_cuda_manual_seed` seeds only that.

Never imported by the es_llm package (tests/test_megatron_driver.py checks it): a launcher
script in tests/ calls `apply()` and then the driver, exactly as a user would call it.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_applied = False


def _cpu(device):
    if device is None:
        return None
    if isinstance(device, int) or (
        isinstance(device, str | torch.device) and torch.device(device).type == "cuda"
    ):
        return torch.device("cpu")
    return device


def _factory(fn):
    @functools.wraps(fn)
    def make(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return fn(*args, **kwargs)

    return make


def apply() -> None:
    """Patch this process so megatron-core 0.16.1 runs on the CPU (idempotent)."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("tests/megatron_shim.py is for CPU-only test processes")
    _applied = True
    for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand"):
        setattr(torch, name, _factory(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]

    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    tracker_cls = mrandom.CudaRNGStatesTracker

    def add(self, name, seed):
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.get_rng_state()

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        yield

    tracker_cls.add = add
    tracker_cls.fork = fork

    def manual_seed(seed, *args, **kwargs):
        mrandom.initialize_rng_tracker()
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.reset()
        tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718)

    mrandom.model_parallel_cuda_manual_seed = manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = manual_seed

    # clip_grads asserts that every gradient is a torch.cuda.FloatTensor: the same scaling
    # without the assert
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    def clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for param in parameters:
                grad = getattr(param, attr, None)
                if grad is not None:
                    grad.detach().mul_(coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_by_total_norm
    moptimizer.clip_grad_by_total_norm_fp32 = clip_by_total_norm
