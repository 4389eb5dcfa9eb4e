"""The checkpoint file protocol without an engine: atomic per-rank files, the completion
marker, choosing the tag to resume from, and errors that name the bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from es_llm.drivers.deepspeed.checkpoint import (
    FORMAT_VERSION,
    LATEST,
    MARKER,
    CheckpointError,
    find_complete_tag,
    read_marker,
    read_rank_state,
    rewind_metrics,
    write_marker,
    write_rank_state,
)


def _state(rank: int, world: int = 2) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "rank": rank,
        "world_size": world,
        "scores": torch.arange(10, dtype=torch.float32) + rank,
    }


def _complete(root: Path, step: int, world: int = 2) -> Path:
    tag_dir = root / f"global_step{step}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    recs = [write_rank_state(tag_dir, r, _state(r, world)) for r in range(world)]
    write_marker(tag_dir, step=step, world_size=world, files=recs)
    (root / LATEST).write_text(tag_dir.name)
    return tag_dir


def test_round_trip_and_no_temp_files_left(tmp_path: Path) -> None:
    tag_dir = _complete(tmp_path, 4)
    marker = read_marker(tag_dir)
    assert marker["step"] == 4 and marker["world_size"] == 2
    for r in range(2):
        got = read_rank_state(tag_dir, r, 2, marker)
        assert torch.equal(got["scores"], _state(r)["scores"])
    assert sorted(p.name for p in tag_dir.iterdir()) == sorted(
        [MARKER, "mp_rank_00_model_states.pt", "es_state_rank0.pt", "es_state_rank1.pt"]
    )


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:50]), "truncated"),
        (lambda p: p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes())), "corrupt"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_damaged_rank_file_is_an_error_naming_it(tmp_path: Path, damage, words: str) -> None:
    tag_dir = _complete(tmp_path, 4)
    path = tag_dir / "es_state_rank1.pt"
    damage(path)
    marker = read_marker(tag_dir)
    read_rank_state(tag_dir, 0, 2, marker)  # the other rank's file is fine
    with pytest.raises(CheckpointError, match=words) as e:
        read_rank_state(tag_dir, 1, 2, marker)
    assert str(path) in str(e.value)


def test_world_size_mismatch_is_an_error(tmp_path: Path) -> None:
    tag_dir = _complete(tmp_path, 4)
    with pytest.raises(CheckpointError, match="written by 2 ranks, this run has 1"):
        read_rank_state(tag_dir, 0, 1, read_marker(tag_dir))


def test_marker_refuses_an_incomplete_directory(tmp_path: Path) -> None:
    tag_dir = tmp_path / "global_step2"
    tag_dir.mkdir()
    rec = write_rank_state(tag_dir, 0, _state(0, 1))
    with pytest.raises(CheckpointError, match="model states are missing"):
        write_marker(tag_dir, step=2, world_size=1, files=[rec])
    assert not (tag_dir / MARKER).exists()


def test_resume_reads_only_complete_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        find_complete_tag(tmp_path / "nothing")
    half = tmp_path / "global_step2"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="no complete checkpoint.*global_step2"):
        find_complete_tag(tmp_path)
    _complete(tmp_path, 4)
    _complete(tmp_path, 8)
    assert find_complete_tag(tmp_path) == "global_step8"
    (tmp_path / "global_step12").mkdir()  # a save cut short after `latest` moved? never: but
    (tmp_path / LATEST).write_text("global_step12")  # a stale or damaged pointer is not trusted
    assert find_complete_tag(tmp_path) == "global_step8"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_marker(tmp_path / "global_step12")


def test_rewind_metrics_drops_steps_after_the_checkpoint_and_cut_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"type": "eval", "step": 0}] + [{"type": "step", "step": s} for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "st')
    rewind_metrics(path, 4)
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]


def test_collective_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from es_llm.dist import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() is None
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout() == timedelta(seconds=90)
    for bad in ("soon", "0"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            collective_timeout()
