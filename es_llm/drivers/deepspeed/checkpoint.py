"""ES state saved with DeepSpeed checkpoints, and exact resume (spec section 5).

Layout of ``OUT/checkpoints/`` (the ``save_dir`` of ``engine.save_checkpoint``)::

    latest                      tag of the newest *complete* checkpoint (DeepSpeed's format)
    global_step12/
        mp_rank_00_model_states.pt ...   DeepSpeed's own files (weights, optimizer, LR scheduler)
        es_state_rank0.pt ...            one file per rank: ESRun.state_dict() (the ES data
                                         path's state_dict() and the loop's clocks), RNG
        es_complete.json                 the marker: world size, step, and the size + sha256
                                         of every other file of the directory

Why a marker: DeepSpeed writes its files in place, so a rank killed mid-save leaves a half
checkpoint. Each rank writes its ES file atomically (temp file in the same directory, fsync,
rename); after a barrier that all of DeepSpeed's and every rank's files are there, the ranks
hash DeepSpeed's files (a share each), and rank 0 writes the marker and then moves ``latest``,
both atomically. Resume reads only a tag that has the marker, so whatever a crash leaves
behind is never what it reads, and it reads a tag only once every file in it has the size and
sha256 the marker recorded: a damaged tag is skipped (one line says which file) for the newest
intact one, and no intact one is an error. Nothing is re-initialised silently: a missing,
truncated or corrupt file, a world-size change or a different run configuration is an error
that names the file or the field.

No load runs code from a checkpoint: the ES files load with ``torch.load(weights_only=True)``,
and `load_checkpoint` gives the engine a checkpoint engine whose loads are weights-only too,
allowing only the few DeepSpeed classes its ZeRO states hold (`ENGINE_STATE_CLASSES`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from es_llm import dist
from es_llm.errors import InputError

# 3: the marker records every file of the tag directory (DeepSpeed's under "engine_files").
# 2: the rank file holds ESRun.state_dict() under "run" (rank files of 2 and 3 are the same).
FORMAT_VERSION = 3
RANK_FILE_FORMATS = (2, 3)  # rank-file headers this version reads
MARKER = "es_complete.json"
LATEST = "latest"
CHECKPOINT_SUBDIR = "checkpoints"
# What DeepSpeed 0.19's engine files hold besides tensors and plain containers (ZeRO 1-3
# optimizer states: the loss scaler, the stage, the bf16 fragment addresses): the only classes
# a weights-only load of them may build. Listed by name, resolved when an engine is loaded.
ENGINE_STATE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_HASH_THREADS = 4


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


# sha256 of files this process hashed, by identity and state: a file preflight verified is not
# read again when the run loads the same tag, unless it changed since (size, mtime, ctime).
_HASHED: dict[tuple[str, int, int, int, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HASHED:
        return _HASHED[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    _HASHED[key] = h.hexdigest()
    return _HASHED[key]


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
    name: str  # path relative to the tag directory, with "/"
    size: int
    sha256: str


def file_record(tag_dir: Path, name: str) -> FileRecord:
    path = Path(tag_dir) / name
    return FileRecord(name, path.stat().st_size, _sha256(path))


def tag_files(tag_dir: Path) -> list[str]:
    """Every file of a tag directory but the marker, relative, sorted (subfolders included)."""
    tag_dir = Path(tag_dir)
    names = (p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if not p.is_dir())
    return sorted(n for n in names if n != MARKER)


def write_rank_state(tag_dir: Path, rank: int, state: dict[str, Any]) -> FileRecord:
    """Write one rank's ES state atomically; return what the marker records about it."""
    path = Path(tag_dir) / es_state_file(rank)
    _write_atomic(path, lambda fh: torch.save(state, fh))
    return file_record(path.parent, path.name)


def write_marker(
    tag_dir: Path,
    *,
    step: int,
    world_size: int,
    files: list[FileRecord],
    engine_files: list[FileRecord] | None = None,
) -> None:
    """Declare `tag_dir` complete (rank 0, after every rank's files are written).

    `files`: the ranks' ES files; `engine_files`: DeepSpeed's, as the ranks hashed them. Any
    other file of the directory is hashed here, so the marker records every file in it.
    """
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
    es_names = {f.name for f in files}
    engine = {f.name: f for f in engine_files or [] if f.name not in es_names}
    on_disk = [n for n in tag_files(tag_dir) if n not in es_names]
    gone = sorted(set(engine) - set(on_disk))
    if gone:
        raise CheckpointError(f"{tag_dir}: {gone} vanished while saving; not marking complete")
    for name in on_disk:
        if name not in engine:
            engine[name] = file_record(tag_dir, name)
    marker = {
        "format_version": FORMAT_VERSION,
        "tag": tag_dir.name,
        "step": int(step),
        "world_size": int(world_size),
        "files": {f.name: {"size": f.size, "sha256": f.sha256} for f in files},
        "engine_files": {
            n: {"size": engine[n].size, "sha256": engine[n].sha256} for n in sorted(engine)
        },
        "written_unix_s": time.time(),
    }
    _write_text_atomic(tag_dir / MARKER, json.dumps(marker, indent=2) + "\n")


def _records_ok(records: Any) -> bool:
    return isinstance(records, dict) and all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
        for r in records.values()
    )


def read_marker(tag_dir: Path) -> dict[str, Any]:
    path = Path(tag_dir) / MARKER
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{tag_dir} is not a complete checkpoint (no {MARKER})") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from e
    version = marker.get("format_version") if isinstance(marker, dict) else None
    if version == 2:
        raise CheckpointError(
            f"{path} was written by an older es-llm (marker format 2), which did not record "
            f"DeepSpeed's files: they cannot be verified, so this checkpoint is not resumed "
            f"(resume it with the es-llm that wrote it, or start a fresh run)"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint marker format")
    fields_ok = isinstance(marker.get("step"), int) and isinstance(marker.get("world_size"), int)
    if not (fields_ok and _records_ok(marker.get("files"))):
        raise CheckpointError(f"{path} is malformed (step, world_size or files)")
    if not _records_ok(marker.get("engine_files")):
        raise CheckpointError(f"{path} is malformed (engine_files)")
    return marker


def verify_tag(tag_dir: Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check that `tag_dir` holds exactly the files its marker records, each of the recorded
    size and (with `hashes`) sha256; return the marker. Sizes are checked for every file
    before any is hashed, so a truncated file is found without reading the others."""
    tag_dir = Path(tag_dir)
    marker = read_marker(tag_dir)
    recorded = {**marker["engine_files"], **marker["files"]}
    extra = sorted(set(tag_files(tag_dir)) - set(recorded))
    if extra:
        raise CheckpointError(
            f"{tag_dir / extra[0]} is not a file its {MARKER} records (added after the save)"
        )
    for name in sorted(recorded):
        path, size = tag_dir / name, recorded[name]["size"]
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or altered: {path.stat().st_size} bytes, "
                f"{size} written"
            )
    if hashes:
        names = sorted(recorded, key=lambda n: -recorded[n]["size"])
        with ThreadPoolExecutor(min(_HASH_THREADS, len(names) or 1)) as pool:
            found = pool.map(lambda n: _sha256(tag_dir / n), names)
            digests = dict(zip(names, found, strict=True))
        for name in sorted(recorded):
            if digests[name] != recorded[name]["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {tag_dir / name} is corrupt: its sha256 differs from the "
                    f"one {MARKER} recorded"
                )
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
        raise CheckpointError(f"ES state file {path} cannot be read: {_first_line(e)}") from e
    if not isinstance(state, dict) or state.get("format_version") not in RANK_FILE_FORMATS:
        raise CheckpointError(f"ES state file {path} has an unknown format")
    if int(state["rank"]) != rank or int(state["world_size"]) != world_size:
        raise CheckpointError(
            f"ES state file {path} belongs to rank {state['rank']} of {state['world_size']}, "
            f"not rank {rank} of {world_size}: resume with the same number of ranks"
        )
    return state


# tags this process has said it skips: preflight and the run's own choice say it once
_REPORTED: set[str] = set()


def find_complete_tag(root: Path, *, hashes: bool = True, report: bool = True) -> str:
    """The tag to resume from: the newest checkpoint that has its marker and whose every file
    is intact (`latest` first, then by step). A damaged one is skipped with one line on stderr
    (`report`) naming the file; with none intact, a CheckpointError lists why each is not.

    `hashes=False` checks presence and sizes only (cheap; what a rank that leaves the hashing
    to another checks)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(
            f"no checkpoint directory {root} (was the run started with --save-every?)"
        )
    marked = [p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file()]
    if not marked:
        partial = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise CheckpointError(
            f"no complete checkpoint in {root} (incomplete: {partial or 'none'}); cannot resume"
        )
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    damaged: list[str] = []

    def newest_first(p: Path) -> tuple[bool, int]:
        try:  # the step as written, also in a marker this version refuses (reported then)
            step = int(json.loads((p / MARKER).read_text())["step"])
        except (OSError, ValueError, TypeError, KeyError):
            step = -1  # an unreadable marker: tried last
        return (p.name != latest, -step)

    for tag_dir in sorted(marked, key=newest_first):
        try:
            verify_tag(tag_dir, hashes=hashes)
            return tag_dir.name
        except CheckpointError as e:
            damaged.append(f"{tag_dir.name}: {e}")
            key = f"{tag_dir.resolve()}: {e}"
            if report and key not in _REPORTED:
                _REPORTED.add(key)
                print(f"es-llm: skipping damaged checkpoint {tag_dir.name}: {e}", file=sys.stderr)
    raise CheckpointError(f"no intact checkpoint in {root}, cannot resume: {'; '.join(damaged)}")


def preflight_resume(run_dir: Path) -> str:
    """What `--resume DIR` resumes from, checked before any process group exists: the first
    local rank of each node hashes every file (the run's own choice on rank 0 reuses those
    hashes, see `_sha256`), the other ranks check sizes; rank 0 says what it skips."""
    hashes = os.environ.get("LOCAL_RANK", "0") == "0"
    return find_complete_tag(
        checkpoint_root(run_dir), hashes=hashes, report=os.environ.get("RANK", "0") == "0"
    )


# ---------------------------------------------------------------- weights-only engine loads
def _first_line(e: BaseException) -> str:
    """The part of an exception's message that says what is wrong, on one line."""
    text = str(e)
    refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
    if refused:  # torch's weights-only refusal: name the global, not torch's advice
        return f"it names {refused.group(1)}, which a weights-only load does not build"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:  # another weights-only refusal (an opcode, a type)
        if "unsupported" in line.lower():
            return line.split(". ")[0]
    return lines[0] if lines else type(e).__name__


def engine_state_classes() -> list[type]:
    """`ENGINE_STATE_CLASSES`, imported (DeepSpeed is imported here, not at module import)."""
    import importlib

    classes = []
    for dotted in ENGINE_STATE_CLASSES:
        module, _, name = dotted.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def load_engine_file(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load` of one of DeepSpeed's checkpoint files, weights-only: tensors, plain
    containers and `ENGINE_STATE_CLASSES`; anything else (a pickle that would call a function,
    build another class) is a CheckpointError naming the file, and nothing of it runs."""
    try:
        with torch.serialization.safe_globals(engine_state_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint file {path} holds more than tensors and DeepSpeed's state "
            f"({_first_line(e)}); it is not loaded, since loading it would run code from it"
        ) from e
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {_first_line(e)}") from e


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose `load` is `load_engine_file`; everything else
    (saving, commit, its flags) is the wrapped engine's."""

    def __init__(self, inner: Any, load: Callable[..., Any] = load_engine_file) -> None:
        self._inner = inner
        self._load = load

    def load(self, path: str, map_location: Any = None) -> Any:
        return self._load(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install_weights_only_loads(engine: Any) -> None:
    """Make every load of `engine.load_checkpoint` weights-only (idempotent)."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)


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

    Every rank calls it (it is collective). Once every rank's files are on disk, each rank
    hashes a share of DeepSpeed's files, so the marker rank 0 writes records every file.
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
    es_names = {r.name for r in records}
    engine_names = [n for n in tag_files(tag_dir) if n not in es_names]
    mine = [file_record(tag_dir, n) for i, n in enumerate(engine_names) if i % world == rank]
    shares = dist.all_gather_object(mine)
    if rank == 0:
        hashed = [r for share in shares for r in share]
        write_marker(tag_dir, step=step, world_size=world, files=records, engine_files=hashed)
        _write_text_atomic(root / LATEST, tag)
    dist.barrier()
    return tag_dir


def load_checkpoint(engine: Any, out: Path) -> tuple[Path, dict[str, Any]]:
    """Restore DeepSpeed's state from the newest intact checkpoint of `out`; return the tag
    directory and this rank's verified state file (for the caller's `load_state_dict`).

    Rank 0 chooses the tag, verifying every file (hashes preflight computed in this process
    are reused), and every rank resumes from its choice; DeepSpeed's files load weights-only.
    Collective.
    """
    rank, world = dist.rank(), dist.world_size()
    root = checkpoint_root(out)
    choice: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        try:
            choice = (find_complete_tag(root), None)
        except CheckpointError as e:
            choice = (None, str(e))
    tag, error = dist.all_gather_object(choice)[0]
    if error is not None or tag is None:
        raise CheckpointError(error or f"no checkpoint chosen in {root}")
    tag_dir = root / tag
    marker = read_marker(tag_dir)
    state = read_rank_state(tag_dir, rank, world, marker)
    install_weights_only_loads(engine)
    load_path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load its checkpoint files in {tag_dir}")
    return tag_dir, state
