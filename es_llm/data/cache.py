"""Build-once cache entries: a content key, one lock per entry, build aside, rename in.

Every artifact es-llm caches (a packed corpus, an instruction corpus, a trained BPE's entry, a
pre-trained ``base:`` model) is a folder named by the digest of everything that decides its
contents. Many ranks and concurrent runs may ask for the same entry at once: one builds it
under the entry's lock in a temporary folder beside it and renames it into place, the others
wait on the lock and then find it complete. An entry is complete when its marker file exists,
so a crash mid-build leaves only a temporary folder (removed) or a half entry without the
marker (replaced by the next build).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "build_once",
    "cache_digest",
    "datasets_progress",
    "file_lock",
    "lock_path",
]


def cache_digest(obj) -> str:
    """sha256 of `obj` as canonical JSON: cache entries are named by its first hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock so concurrent ranks build a cache entry only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the temp-dir + rename still keeps entries whole
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_path(cache: Path, name: str) -> Path:
    """Where the lock of one cache entry lives: all of them in ``CACHE/locks/``. The lock files
    are kept: deleting one while another process waits on it would let a third process lock a
    new file and build concurrently."""
    return cache / "locks" / f"{name}.lock"


def build_once(
    entry: Path,
    *,
    marker: str,
    lock: Path,
    build: Callable[[Path], Path],
    announce: Callable[[], None] | None = None,
) -> bool:
    """Make ``entry`` exist, complete (``entry/marker``), building it at most once.

    ``build(tmp)`` fills the empty temporary folder ``tmp`` (beside ``entry``) and returns the
    folder to move into place: ``tmp`` itself or one inside it. ``announce`` runs just before
    a build, so a first run says why it waits. Returns whether this call built the entry.
    """
    if (entry / marker).is_file():
        return False
    with file_lock(lock):
        if (entry / marker).is_file():  # another process built it while this one waited
            return False
        if announce is not None:
            announce()
        entry.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".build-{entry.name}-{uuid.uuid4().hex[:8]}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=entry.parent))
        try:
            built = build(tmp)
            if not (built / marker).is_file():
                raise RuntimeError(f"cache build for {entry} wrote no {marker}")
            if entry.exists():  # a half entry (no marker) from an older crash
                shutil.rmtree(entry, ignore_errors=True)
            try:
                os.rename(built, entry)
            except OSError:
                if not (entry / marker).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


@contextmanager
def datasets_progress(enabled: bool) -> Iterator[None]:
    """Silence the ``datasets`` progress bars for a quiet build, restoring the global setting."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    if not enabled and was:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and was:
            datasets.enable_progress_bars()
