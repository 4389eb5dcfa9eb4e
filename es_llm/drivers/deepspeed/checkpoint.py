"""ES state saved with DeepSpeed checkpoints, and exact resume (spec section 5).

Layout of ``OUT/checkpoints/`` (the ``save_dir`` of ``engine.save_checkpoint``)::

    latest                      tag of the newest *complete* checkpoint (DeepSpeed's format)
    global_step12/
        mp_rank_00_model_states.pt ...   DeepSpeed's own files (weights, optimizer, LR scheduler)
        es_state_rank0.pt ...            one file per rank: ESRun.state_dict() (the ES data
                                         path's state_dict() and the loop's clocks), RNG
        es_complete.json                 the marker: world size, step, size + sha256 per file

Why a marker: DeepSpeed writes its files in place, so a rank killed mid-save leaves a half
checkpoint. Each rank writes its ES file atomically (temp file in the same directory, fsync,
rename); after a barrier that all of DeepSpeed's and every rank's files are there, rank 0
writes the marker and then moves ``latest``, both atomically. Resume reads only a tag that has
the marker, so whatever a crash leaves behind is never what it reads. Nothing is re-initialised
silently: a missing, truncated or corrupt file, a world-size change or a different run
configuration is an error that names the file or the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from es_llm import dist
from es_llm.errors import InputError

FORMAT_VERSION = 2  # 2: the rank file holds ESRun.state_dict() under "run"
MARKER = "es_complete.json"
LATEST = "latest"
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(InputError):
    """A checkpoint cannot be written or resumed from; the message names the file."""


def checkpoint_root(out: Path) -> Path:
    return Path(out) / CHECKPOINT_SUBDIR


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def es_state_file(rank: int) -> str:
    return f"es_state_rank{rank}.pt"


# ---------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, write: Any) -> None:
    """`write(fh)` into a temp file beside `path`, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda fh: fh.write(text.encode()))


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    sha256: str


def write_rank_state(tag_dir: Path, rank: int, state: dict[str, Any]) -> FileRecord:
    """Write one rank's ES state atomically; return what the marker records about it."""
    path = Path(tag_dir) / es_state_file(rank)
    _write_atomic(path, lambda fh: torch.save(state, fh))
    return FileRecord(path.name, path.stat().st_size, _sha256(path))


def write_marker(tag_dir: Path, *, step: int, world_size: int, files: list[FileRecord]) -> None:
    """Declare `tag_dir` complete (rank 0, after every rank's files are written)."""
    tag_dir = Path(tag_dir)
    missing = [f.name for f in files if not (tag_dir / f.name).is_file()]
    if missing:
        raise CheckpointError(
            f"{tag_dir}: ES state files {missing} are missing; not marking complete"
        )
    if not any(tag_dir.glob("*model_states.pt")):
        raise CheckpointError(
            f"{tag_dir}: DeepSpeed's model states are missing; not marking complete"
        )
    marker = {
        "format_version": FORMAT_VERSION,
        "tag": tag_dir.name,
        "step": int(step),
        "world_size": int(world_size),
        "files": {f.name: {"size": f.size, "sha256": f.sha256} for f in files},
        "written_unix_s": time.time(),
    }
    _write_text_atomic(tag_dir / MARKER, json.dumps(marker, indent=2) + "\n")


def read_marker(tag_dir: Path) -> dict[str, Any]:
    path = Path(tag_dir) / MARKER
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{tag_dir} is not a complete checkpoint (no {MARKER})") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from e
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint marker format")
    return marker


def read_rank_state(tag_dir: Path, rank: int, world_size: int, marker: dict[str, Any]) -> dict:
    """Load and verify one rank's ES state: present, same size and sha256 as when written."""
    tag_dir = Path(tag_dir)
    if int(marker["world_size"]) != world_size:
        raise CheckpointError(
            f"{tag_dir / MARKER}: the checkpoint was written by {marker['world_size']} ranks, "
            f"this run has {world_size}; resume with the same number of ranks"
        )
    name = es_state_file(rank)
    path = tag_dir / name
    rec = marker["files"].get(name)
    if rec is None:
        raise CheckpointError(f"{tag_dir / MARKER} lists no {name} (rank {rank})")
    if not path.is_file():
        raise CheckpointError(f"ES state file {path} is missing")
    size = path.stat().st_size
    if size != rec["size"]:
        raise CheckpointError(
            f"ES state file {path} is truncated or altered: {size} bytes, {rec['size']} written"
        )
    if _sha256(path) != rec["sha256"]:
        raise CheckpointError(
            f"ES state file {path} is corrupt: its sha256 differs from the marker's"
        )
    return load_rank_file(path, rank, world_size)


def load_rank_file(path: Path, rank: int, world_size: int) -> dict:
    """Read one rank's state file and check it belongs to this rank of this world size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ES state file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"ES state file {path} cannot be read: {e}") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"ES state file {path} has an unknown format")
    if int(state["rank"]) != rank or int(state["world_size"]) != world_size:
        raise CheckpointError(
            f"ES state file {path} belongs to rank {state['rank']} of {state['world_size']}, "
            f"not rank {rank} of {world_size}: resume with the same number of ranks"
        )
    return state


def find_complete_tag(root: Path) -> str:
    """The tag to resume from: `latest` if complete, else the highest complete step."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(
            f"no checkpoint directory {root} (was the run started with --save-every?)"
        )
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and (root / tag / MARKER).is_file():
            return tag
    complete = [p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file()]
    if not complete:
        partial = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise CheckpointError(
            f"no complete checkpoint in {root} (incomplete: {partial or 'none'}); cannot resume"
        )
    return max(complete, key=lambda p: read_marker(p)["step"]).name


# ---------------------------------------------------------------- run state
def rank_state(run_state: dict[str, Any]) -> dict[str, Any]:
    """One rank's file content: the caller's state (e.g. `ESRun.state_dict()`, which holds
    `ESDataPath.state_dict()`) plus the file header and the RNG states."""
    return {
        "format_version": FORMAT_VERSION,
        "rank": dist.rank(),
        "world_size": dist.world_size(),
        "run": run_state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def rewind_metrics(path: Path, step: int) -> None:
    """Drop the metrics a killed run wrote after the checkpoint it resumes from.

    Those steps are trained again; keeping them would count them twice. A line cut short by
    the kill is dropped too. Rewritten atomically (rank 0 only).
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or int(rec.get("step", 0) or 0) > step:
            continue
        kept.append(line)
    _write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def save_checkpoint(engine: Any, root: Path, *, step: int, state: dict[str, Any]) -> Path:
    """Save DeepSpeed's state and this rank's `state` (from `rank_state`) as step `step`.

    Every rank calls it (it is collective).
    """
    root = Path(root)
    rank, world = dist.rank(), dist.world_size()
    tag = tag_for_step(step)
    tag_dir = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # left by a crashed attempt at this step (resume rewinds to it)
            (tag_dir / MARKER).unlink(missing_ok=True)
            shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    tag_dir.mkdir(parents=True, exist_ok=True)
    rec = write_rank_state(tag_dir, rank, state)
    records = dist.all_gather_object(rec)  # also a barrier: every rank's files are on disk
    if rank == 0:
        write_marker(tag_dir, step=step, world_size=world, files=records)
        _write_text_atomic(root / LATEST, tag)
    dist.barrier()
    return tag_dir


def load_checkpoint(engine: Any, out: Path) -> tuple[Path, dict[str, Any]]:
    """Restore DeepSpeed's state from the newest complete checkpoint of `out`; return the tag
    directory and this rank's verified state file (for the caller's `load_state_dict`)."""
    rank, world = dist.rank(), dist.world_size()
    root = checkpoint_root(out)
    tag = find_complete_tag(root)
    tag_dir = root / tag
    marker = read_marker(tag_dir)
    state = read_rank_state(tag_dir, rank, world, marker)
    load_path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load its checkpoint files in {tag_dir}")
    return tag_dir, state
