"""Data layer: the packed corpus with stable global ids, and per-rank sharding/ordering.

No torch.distributed or deepspeed here: ranks and world sizes are plain integers.
"""

from es_llm.data.corpus import Corpus, default_cache_dir, load_corpus
from es_llm.data.sharding import RankSampler, shard_dataset, shard_range

__all__ = [
    "Corpus",
    "RankSampler",
    "default_cache_dir",
    "load_corpus",
    "shard_dataset",
    "shard_range",
]
