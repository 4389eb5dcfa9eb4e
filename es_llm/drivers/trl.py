"""Evolved Sampling in TRL's `SFTTrainer`: `ESSFTTrainer`, a drop-in subclass.

Swap `trl.SFTTrainer` for `ESSFTTrainer` and point `SFTConfig(deepspeed=...)` at a DeepSpeed
config with an `evolved_sampling` section::

    from es_llm.drivers.trl import ESSFTTrainer
    trainer = ESSFTTrainer(model=model, args=SFTConfig(..., deepspeed="ds.json"),
                           train_dataset=records, processing_class=tokenizer)
    trainer.train()

TRL prepares the dataset as usual (chat template, tokenization, ``labels`` from its
completion/assistant masks, truncation to ``max_length``); the ES data path then pads those
rows once to the longest row (at most ``max_length``) and selects among them, exactly as
`es_llm.drivers.hf.ESTrainer` does. One record is one sample: TRL's ``packing`` and
``padding_free`` are refused with ES (they join records into one row). Without the section it
is a plain `SFTTrainer`. Needs the ``trl`` extra: ``pip install 'es-llm[trl]'``.
"""

from __future__ import annotations

from typing import Any

from es_llm.drivers.hf import ESTrainerMixin
from es_llm.errors import InputError

try:
    from trl import SFTTrainer
except ImportError as e:  # the optional extra is missing
    raise ImportError(
        "es_llm.drivers.trl needs TRL: pip install 'es-llm[trl]' (or pip install trl)"
    ) from e

__all__ = ["ESSFTTrainer"]


class ESSFTTrainer(ESTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` that trains with ES/ESWP when the DeepSpeed config says so.

    Takes `SFTTrainer`'s arguments plus `ESTrainer`'s keywords (`es_config`, `scorer`,
    `es_max_length`; the row length defaults to the longest prepared row, capped at
    `args.max_length`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.es is not None and (
            getattr(self.args, "packing", False) or getattr(self.args, "padding_free", False)
        ):
            raise InputError(
                "ESSFTTrainer samples whole records: set packing=False and padding_free=False "
                "in SFTConfig (ES selects among records, each one fixed-length row)"
            )
