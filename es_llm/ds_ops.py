"""Say so before DeepSpeed compiles its CPU communication op, which takes a minute or two,
and say nothing when it comes from the cache.

On a CPU accelerator, ``deepspeed.init_distributed`` builds the shared-memory op
``deepspeed_shm_comm`` with torch's C++ extension loader the first time it runs on a machine
and caches it in torch's extension folder; meanwhile nothing is printed. Every later start
loads it from the cache and still prints "DeepSpeed ... deepspeed_shm_comm_op built
successfully" on stdout, once per rank: `quiet_cached_op` drops that one line when nothing was
built (unless --verbose). GPU runs (NCCL) do not build it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

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


def _built_line(line: str) -> bool:
    return line.startswith("DeepSpeed ") and line.rstrip().endswith(
        f"{SHM_OP}_op built successfully"
    )


class LineFilter:
    """A text stream that passes every line to ``stream`` except those ``drop`` matches.

    Whole lines are judged (print writes a line's text and its end separately); ``flush``
    passes on a pending partial line, so nothing is held back.
    """

    def __init__(self, stream: TextIO, drop: Callable[[str], bool]) -> None:
        self._stream = stream
        self._drop = drop
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if not self._drop(line):
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


@contextmanager
def quiet_cached_op(verbose: bool = False) -> Iterator[None]:
    """Within the block, drop DeepSpeed's "...shm_comm_op built successfully" stdout line when
    the op is already cached (nothing is built); with ``verbose`` or a real build, keep it."""
    if verbose or shm_op_build_pending():
        yield
        return
    real = sys.stdout
    sys.stdout = LineFilter(real, _built_line)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = real
