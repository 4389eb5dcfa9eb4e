"""Child entry of `es-llm compare`: `python -m es_llm.tools.compare --worker DIR/<name>/run_spec.json`."""

from __future__ import annotations

import sys

from es_llm.tools.compare.runner import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
