"""Write the trained model as a Hugging Face model directory a user can load.

`export_model` leaves ``OUT/model/``: config.json, generation_config.json, safetensors
weights and the tokenizer files, so ``AutoModelForCausalLM.from_pretrained(OUT/model)`` and
``AutoTokenizer.from_pretrained(OUT/model)`` load what the run trained (and
``es-llm train --model OUT/model`` continues from it).

Under ZeRO-3 each rank holds a slice of every parameter: every rank calls this, DeepSpeed's
consolidated state dict gathers the parameters one module at a time onto rank 0's CPU, and
only rank 0 writes. Without ZeRO-3 the module holds the full weights on every rank and rank 0
writes them alone. The weights are those the module computes with (bf16 under bf16 training).
The directory appears whole or not at all: it is written beside ``OUT/model`` and renamed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from es_llm import dist
from es_llm.errors import NonFiniteError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MODEL_DIR = "model"


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Writing model shards" bar: noise at the end of a run's log."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def full_state_dict(engine: Any) -> dict[str, Any] | None:
    """The whole model's state dict on rank 0 (CPU tensors under ZeRO-3), None elsewhere.

    Collective under ZeRO-3: every rank must call it.
    """
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.rank() == 0 else None


def check_finite_weights(state: dict[str, Any] | None, final: Path) -> None:
    """Refuse to export NaN/inf weights (rank 0 holds `state`; every rank calls it and every
    rank raises, so none waits at a barrier for a directory that is never written)."""
    bad = [] if state is None else [k for k, v in state.items() if _nonfinite_tensor(v)]
    if dist.all_reduce_sum([float(len(bad))])[0] > 0:
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        where = f" ({names})" if bad else ""
        raise NonFiniteError(
            f"the trained weights hold NaN or inf{where}: no model exported to {final}"
        )


def _nonfinite_tensor(v: Any) -> bool:
    return torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())


def export_model(engine: Any, out: Path, tokenizer: Callable[[], PreTrainedTokenizerBase]) -> Path:
    """Write ``out/model`` from a DeepSpeed engine; every rank calls it, rank 0 writes.

    ``tokenizer`` builds the tokenizer to save beside the weights (called on rank 0 only).
    Returns the directory (on every rank, written once all ranks return).
    """
    final = Path(out) / MODEL_DIR
    state = full_state_dict(engine)
    check_finite_weights(state, final)
    if state is not None:
        write_model_dir(
            final, lambda tmp: engine.module.save_pretrained(tmp, state_dict=state), tokenizer
        )
    dist.barrier()  # no rank reports the run done before the directory is there
    return final


def write_model_dir(
    final: Path, save: Callable[[Path], None], tokenizer: Callable[[], Any]
) -> None:
    """Write a model directory whole or not at all (one rank calls it): ``save(tmp)`` the
    weights and the tokenizer into a folder beside ``final``, then rename it over ``final``
    (a resumed run replaces the model of its earlier part)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        with _no_progress_bars():
            save(tmp)
        tokenizer().save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
