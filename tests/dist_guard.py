"""A guard that records every torch.distributed collective not called from es_llm/dist.py.

`python tests/dist_guard.py REPORT -- <es-llm args>` installs it and runs `es-llm`; the
deepspeed launcher starts it once per rank (tests/test_dist_guard.py). A collective whose
direct caller is a file of the es_llm package other than es_llm/dist.py, or any file outside
torch, deepspeed, transformers and accelerate, is written to REPORT.<rank> (one line each).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch.distributed as tdist

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
    "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv", "monitored_barrier",
)  # fmt: skip
ALLOWED_PACKAGES = ("torch", "deepspeed", "transformers", "accelerate")


def allowed(filename: str) -> bool:
    path = Path(filename).resolve()
    if path.name == "dist.py" and path.parent.name == "es_llm":
        return True
    if "es_llm" in path.parts:
        return False
    return any(p in path.parts for p in ALLOWED_PACKAGES)


def install(report: str) -> None:
    def wrap(name: str, fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            caller = sys._getframe(1)
            if not allowed(caller.f_code.co_filename):
                rank = os.environ.get("RANK", "0")
                with open(f"{report}.{rank}", "a") as fh:
                    fh.write(f"{name} from {caller.f_code.co_filename}:{caller.f_lineno}\n")
            return fn(*args, **kwargs)

        return guarded

    for name in COLLECTIVES:
        if hasattr(tdist, name):
            setattr(tdist, name, wrap(name, getattr(tdist, name)))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's
    report, _sep, *rest = argv
    install(report)
    if rest[:1] == ["--self-test"]:  # a direct call from here must be reported
        tdist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + rest[1], rank=0,
                                 world_size=1)  # fmt: skip
        tdist.barrier()
        tdist.destroy_process_group()
        sys.exit(0)
    from es_llm.cli import main

    sys.exit(main(rest))
