"""Child entry of `es-llm compare`: `python -m es_llm.compare --worker DIR/<name>/run_spec.json`."""

from __future__ import annotations

import sys

from es_llm.compare.runner import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
