"""Say so before DeepSpeed compiles its CPU communication op, which takes a minute or two.

On a CPU accelerator, ``deepspeed.init_distributed`` builds the shared-memory op
``deepspeed_shm_comm`` with torch's C++ extension loader the first time it runs on a machine
and caches it in torch's extension folder; meanwhile nothing is printed. GPU runs (NCCL) do
not build it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"


def _cpu_accelerator() -> bool:
    name = os.environ.get("DS_ACCELERATOR")
    if name:
        return name == "cpu"
    import torch

    return not torch.cuda.is_available()


def extension_dir(name: str) -> Path:
    """The folder torch's extension loader builds ``name`` in (CPU build of torch)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / name
    from torch.utils.cpp_extension import get_default_build_root

    flags = getattr(sys, "abiflags", "")
    folder = f"py{sys.version_info.major}{sys.version_info.minor}{flags}_cpu"
    return Path(get_default_build_root()) / folder / name


def shm_op_build_pending() -> bool:
    """Whether starting DeepSpeed here will compile the CPU communication op first."""
    if not _cpu_accelerator():
        return False
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    if installed_ops.get(SHM_OP, False):
        return False  # shipped pre-built with this DeepSpeed install
    return not (extension_dir(SHM_OP) / f"{SHM_OP}.so").is_file()


def announce_deepspeed_op_build() -> bool:
    """Print one line (local rank 0 only) when the op is about to be built; True if printed."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or not shm_op_build_pending():
        return False
    print(
        "es-llm: building DeepSpeed's CPU communication op once (about 90 s; cached in "
        f"{extension_dir(SHM_OP).parent})",
        file=sys.stderr,
        flush=True,
    )
    return True
