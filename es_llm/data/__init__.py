"""Data layer: the packed corpus with stable global ids, and per-rank sharding/ordering.

No torch.distributed or deepspeed here: ranks and world sizes are plain integers.
"""

from es_llm.data.corpus import Corpus, default_cache_dir, load_corpus

__all__ = ["Corpus", "default_cache_dir", "load_corpus"]
