"""Data layer: the packed corpus with stable global ids, and per-rank sharding/ordering.

No torch.distributed or deepspeed here: ranks and world sizes are plain integers. The names
below are imported on first use, so that ``es_llm.data.sources`` (used to check --data before
a run) does not pull in ``datasets`` and ``pyarrow``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from es_llm.data.corpus import Corpus, default_cache_dir, load_corpus
    from es_llm.data.sharding import RankSampler, shard_dataset, shard_range

_HOME = {
    "Corpus": "es_llm.data.corpus",
    "default_cache_dir": "es_llm.data.corpus",
    "load_corpus": "es_llm.data.corpus",
    "RankSampler": "es_llm.data.sharding",
    "shard_dataset": "es_llm.data.sharding",
    "shard_range": "es_llm.data.sharding",
}

__all__ = [
    "Corpus",
    "RankSampler",
    "default_cache_dir",
    "load_corpus",
    "shard_dataset",
    "shard_range",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
