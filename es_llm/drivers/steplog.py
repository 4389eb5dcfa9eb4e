"""The logged record of one ES step, the same in every driver.

`ESDataPath.finish_step` returns host numbers; this maps them onto the metrics record that
`es-llm train` writes to metrics.jsonl and `ESTrainer` to es_metrics.jsonl (drivers add their
own clock and learning-rate fields).
"""

from __future__ import annotations

from typing import Any

__all__ = ["step_record"]


def step_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The metrics record of a finished step (`rec` from `ESDataPath.finish_step`)."""
    return {
        "type": "step",
        "step": rec["step"],  # steps done after this one
        "epoch": rec["epoch"],
        "phase": rec["phase"].name.lower(),
        "train_loss": rec["train_loss"],
        "scored": rec["scored"],
        "selected": rec["selected"],
        "invalid": rec["invalid"],
        "meta_loss": rec.get("meta_loss"),
        "selection_digest": rec["digest"],
    }
