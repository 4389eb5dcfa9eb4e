"""The one build-once cache helper every cached artifact uses (es_llm/data/cache.py)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from es_llm.data.cache import build_once, lock_path


def _fill(tmp: Path, log: Path) -> Path:
    with log.open("a") as f:
        f.write("built\n")
    (tmp / "data.txt").write_text("payload")
    (tmp / "meta.json").write_text("{}")
    return tmp


def _build_from_another_process(entry: str, log: str) -> None:
    entry_p = Path(entry)
    lock = lock_path(entry_p.parent, entry_p.name)
    build_once(entry_p, marker="meta.json", lock=lock, build=lambda t: _fill(t, Path(log)))


def test_an_entry_is_built_once_by_concurrent_processes(tmp_path):
    entry, log = tmp_path / "cache" / "entry", tmp_path / "log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_from_another_process, args=(str(entry), str(log)))
             for _ in range(3)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text() == "built\n"
    assert (entry / "data.txt").read_text() == "payload"
    assert sorted(p.name for p in entry.parent.iterdir()) == ["entry", "locks"]  # no tmp left


def test_a_half_entry_is_replaced_and_a_failed_build_leaves_nothing(tmp_path):
    entry, log = tmp_path / "entry", tmp_path / "log"
    lock = lock_path(tmp_path, "entry")
    entry.mkdir()
    (entry / "stale.bin").write_text("from a crash")  # no marker: not complete
    assert build_once(entry, marker="meta.json", lock=lock, build=lambda t: _fill(t, log))
    assert sorted(p.name for p in entry.iterdir()) == ["data.txt", "meta.json"]
    assert not build_once(entry, marker="meta.json", lock=lock, build=lambda t: _fill(t, log))
    assert log.read_text() == "built\n"

    def fails(tmp: Path) -> Path:
        (tmp / "part").write_text("x")
        raise OSError("disk full")

    other = tmp_path / "other"
    with pytest.raises(OSError, match="disk full"):
        build_once(other, marker="meta.json", lock=lock_path(tmp_path, "other"), build=fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "locks", "log"]
    with pytest.raises(RuntimeError, match="wrote no meta.json"):
        build_once(other, marker="meta.json", lock=lock_path(tmp_path, "other"), build=lambda t: t)


def test_the_built_folder_may_be_inside_the_temporary_one(tmp_path):
    def nested(tmp: Path) -> Path:
        (tmp / "run" / "model").mkdir(parents=True)
        (tmp / "run" / "log.txt").write_text("left behind")
        (tmp / "run" / "model" / "config.json").write_text("{}")
        return tmp / "run" / "model"

    entry = tmp_path / "models" / "m"
    build_once(entry, marker="config.json", lock=lock_path(tmp_path, "m"), build=nested)
    assert [p.name for p in entry.iterdir()] == ["config.json"]
    assert [p.name for p in entry.parent.iterdir()] == ["m"]
