"""Make `TORCH_CUDA_ARCH_LIST` readable by DeepSpeed's op builder before any op is built.

CUDA images often set arch-specific variants such as `9.0a` (sm_90a, Hopper) or `10.0f`.
PyTorch accepts them, but DeepSpeed 0.19's JIT builder (FusedAdam, the optimizer of the
shipped GPU configs) sorts the list with `int(minor)` and stops with
`invalid literal for int() with base 10: '0a'`. It accepts `X.Y` and `X.Y+PTX` entries,
separated by `;` or spaces.

`normalize_arch_list` drops the letter suffix (`9.0a` -> `9.0`, `8.0;9.0a+PTX` ->
`8.0;9.0+PTX`); plain `X.Y` code runs on the same cards, it only forgoes the arch-specific
instructions, which DeepSpeed's kernels do not use. A list DeepSpeed already accepts is left
exactly as it is. `fix_torch_cuda_arch_list` applies this to the environment of this process
(inherited by everything it starts) and says so in one line on stderr.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from typing import TextIO

VAR = "TORCH_CUDA_ARCH_LIST"

# what DeepSpeed's builder parses: integer major, integer minor, optional "+PTX"
_ACCEPTED = re.compile(r"^\d+\.\d+(\+PTX)?$")
# what we can turn into that: a letter suffix on the minor (9.0a, 10.0f, 12.0a+PTX)
_FIXABLE = re.compile(r"^(\d+)\.(\d+)[A-Za-z]+(\+PTX)?$")


def _tokens(value: str) -> list[str]:
    return [t for t in re.split(r"[;\s]+", value.strip()) if t]


def is_accepted(value: str) -> bool:
    """True when every entry of the list is `X.Y` or `X.Y+PTX` (what DeepSpeed parses)."""
    return all(_ACCEPTED.match(t) for t in _tokens(value))


def normalize_arch_list(value: str) -> str:
    """The list with letter suffixes dropped; `value` itself when nothing needs changing.

    Entries that are neither accepted nor fixable (e.g. `Hopper`) are kept as they are: this
    function only removes the suffixes DeepSpeed trips on and never guesses.
    """
    tokens = _tokens(value)
    if not tokens or all(_ACCEPTED.match(t) for t in tokens):
        return value
    out: list[str] = []
    for t in tokens:
        m = _FIXABLE.match(t)
        fixed = f"{m.group(1)}.{m.group(2)}{m.group(3) or ''}" if m else t
        if fixed not in out:
            out.append(fixed)
    return ";".join(out)


def fix_torch_cuda_arch_list(
    environ: MutableMapping[str, str] | None = None, stream: TextIO | None = None
) -> str | None:
    """Normalise `TORCH_CUDA_ARCH_LIST` in `environ` (default: os.environ) in place.

    Returns the new value when it changed (and prints one line to `stream`, default stderr),
    None otherwise. Safe to call more than once: the second call finds an accepted list.
    """
    env = os.environ if environ is None else environ
    old = env.get(VAR)
    if old is None:
        return None
    new = normalize_arch_list(old)
    out = sys.stderr if stream is None else stream
    if new == old:
        return None
    env[VAR] = new
    note = "" if is_accepted(new) else " (some entries remain that DeepSpeed cannot parse)"
    print(
        f"es-llm: {VAR}={old!r} -> {new!r}: DeepSpeed's op builder cannot parse arch "
        f"suffixes such as 'a'{note}",
        file=out,
    )
    return new
