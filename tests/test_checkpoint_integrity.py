"""Every checkpoint file is verified before use, and no load runs code from a checkpoint.

One short real run (`es-llm train --save-every 1`, 3 steps) writes three tags; the tests
damage copies of them. A damaged or truncated tag is skipped for the newest intact one (one
line naming the file), no intact one is a one-line error found before any engine starts, and
a crafted engine file (a pickle that would run a shell command) is refused by a real resume
through DeepSpeed's own load path, with a sentinel file proving nothing ran.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_ARGS, run_cli, write_ds_config

from es_llm.drivers.deepspeed import checkpoint as ckpt
from es_llm.drivers.deepspeed.checkpoint import (
    FORMAT_VERSION,
    MARKER,
    CheckpointError,
    file_record,
    find_complete_tag,
    load_engine_file,
    read_marker,
    tag_files,
    verify_tag,
)

MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory, es_cache: Path) -> tuple[Path, list[str]]:
    """A finished 3-step run with a checkpoint after every step; its train arguments."""
    folder = tmp_path_factory.mktemp("saved_run")
    cfg = write_ds_config(folder)
    out = folder / "run"
    args = ["train", "--config", str(cfg), *TINY_RUN_ARGS, "--max-steps", "3", "--save-every", "1"]
    proc = run_cli([*args, "--out", str(out)], es_cache, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, args


def _copy(saved_run: tuple[Path, list[str]], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(saved_run[0], run)
    return run


def _flip_64k(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 65536] = bytes(b ^ 0xFF for b in data[mid : mid + 65536])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _train_args(saved_run: tuple[Path, list[str]], run: Path):
    from es_llm.cli import build_parser

    argv = [*saved_run[1], "--out", str(run), "--resume", str(run)]
    return build_parser(argv).parse_args(argv)


def test_the_marker_records_every_file_of_the_tag(saved_run):
    root = saved_run[0] / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "global_step1",
        "global_step2",
        "global_step3",
    ]
    tag_dir = root / "global_step3"
    marker = read_marker(tag_dir)
    assert marker["format_version"] == FORMAT_VERSION == 3
    assert set(marker["files"]) == {"es_state_rank0.pt"}  # the ES files, as before
    assert MODEL_STATES in marker["engine_files"]
    recorded = {**marker["files"], **marker["engine_files"]}
    assert sorted(recorded) == tag_files(tag_dir)  # every file but the marker itself
    for name, rec in recorded.items():
        got = file_record(tag_dir, name)
        assert (got.size, got.sha256) == (rec["size"], rec["sha256"]), name


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "64 KB of flipped bytes": (_flip_64k, "is corrupt: its sha256 differs"),
    "truncated": (_truncate, "is truncated or altered"),
    "deleted": (lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_engine_file_is_skipped_for_the_newest_intact_tag(
    saved_run, tmp_path, capsys, case
):
    damage, words = DAMAGE[case]
    run = _copy(saved_run, tmp_path)
    root = run / "checkpoints"
    bad = root / "global_step3" / MODEL_STATES
    damage(bad)
    capsys.readouterr()
    from es_llm.preflight import check_train_inputs

    check_train_inputs(_train_args(saved_run, run))  # preflight finds an intact one
    assert find_complete_tag(root) == "global_step2"  # the run's own choice: the same tag
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # said once, though preflight and the run both looked
    assert err[0].startswith("es-llm: skipping damaged checkpoint global_step3: ")
    assert str(bad) in err[0] and words in err[0]


def test_added_files_and_an_old_marker_format_are_not_intact(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    root = run / "checkpoints"
    extra = root / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copyfile(root / "global_step3" / MODEL_STATES, extra)  # never saved: not recorded
    with pytest.raises(CheckpointError, match="is not a file its es_complete.json records"):
        verify_tag(root / "global_step3")
    marker_path = root / "global_step2" / MARKER
    old = json.loads(marker_path.read_text())
    old["format_version"] = 2  # es-llm before this change: DeepSpeed's files unrecorded
    del old["engine_files"]
    marker_path.write_text(json.dumps(old))
    assert find_complete_tag(root) == "global_step1"
    err = capsys.readouterr().err
    assert str(extra) in err and "marker format 2" in err


def test_no_intact_checkpoint_is_one_line_before_any_engine(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path)
    root = run / "checkpoints"
    for step in (1, 2, 3):
        (_flip_64k if step % 2 else _truncate)(root / f"global_step{step}" / MODEL_STATES)
    from es_llm.preflight import check_train_inputs

    with pytest.raises(CheckpointError) as e:
        check_train_inputs(_train_args(saved_run, run))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no intact checkpoint in {root}")
    for step in (1, 2, 3):
        assert str(root / f"global_step{step}" / MODEL_STATES) in msg
    assert len(capsys.readouterr().err.strip().splitlines()) == 3  # one skip line per tag


def test_preflight_hashes_once_and_the_run_reuses_it(saved_run, tmp_path, monkeypatch):
    run = _copy(saved_run, tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert ckpt.preflight_resume(run) == "global_step3"
    hashed: list[str] = []
    real = ckpt.hashlib.sha256
    monkeypatch.setattr(ckpt.hashlib, "sha256", lambda *a: hashed.append("x") or real(*a))
    assert find_complete_tag(run / "checkpoints") == "global_step3"
    assert hashed == []  # every file verified by preflight in this process is not read again
    _flip_64k(run / "checkpoints" / "global_step3" / MODEL_STATES)  # changed since: re-read
    assert find_complete_tag(run / "checkpoints", report=False) == "global_step2"
    assert hashed


class _Sentinel:
    """Pickles as a call of os.system that creates `path`: what a crafted file does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _craft(path: Path, sentinel: Path) -> None:
    """Replace a DeepSpeed file with a pickle that runs a command when unpickled."""
    real = torch.load(path, map_location="cpu", weights_only=True)
    real["module"] = _Sentinel(sentinel)
    torch.save(real, path)


def _rerecord(tag_dir: Path, name: str) -> None:
    """Write the marker as if the crafted file had been saved (what an attacker can do too)."""
    marker = json.loads((tag_dir / MARKER).read_text())
    rec = file_record(tag_dir, name)
    marker["engine_files"][name] = {"size": rec.size, "sha256": rec.sha256}
    (tag_dir / MARKER).write_text(json.dumps(marker))


def test_engine_state_classes_load_weights_only_and_nothing_else(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # what DeepSpeed 0.19's ZeRO 1-3 optimizer files hold besides tensors (checked on real
    # files of stages 0-3, fp32 and bf16)
    state = {
        "loss_scaler": LossScaler(1.0),
        "dynamic": DynamicLossScaler(2.0**16, 1000, 1, 2, False),
        "zero_stage": ZeroStageEnum.optimizer_states,
        "address": fragment_address(numel=4, start=8),
        "t": torch.arange(3.0),
    }
    good = tmp_path / "good.pt"
    torch.save(state, good)
    back = load_engine_file(good, map_location=lambda storage, loc: storage)
    assert vars(back["dynamic"]) == vars(state["dynamic"])
    assert back["zero_stage"] is ZeroStageEnum.optimizer_states
    assert back["address"] == state["address"] and torch.equal(back["t"], state["t"])
    sentinel = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    torch.save({"module": _Sentinel(sentinel)}, bad)
    with pytest.raises(CheckpointError, match="it names posix.system") as e:
        load_engine_file(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not sentinel.exists()


@pytest.mark.multiproc
def test_a_real_resume_skips_a_damaged_tag_and_runs_nothing_from_a_crafted_one(
    saved_run, tmp_path, es_cache
):
    run = _copy(saved_run, tmp_path)
    root = run / "checkpoints"
    flipped = root / "global_step3" / MODEL_STATES
    _flip_64k(flipped)  # before: trained from garbage weights to NaN and exited 0
    sentinel = tmp_path / "crafted_pickle_ran"
    crafted = root / "global_step2" / MODEL_STATES
    _craft(crafted, sentinel)
    _rerecord(root / "global_step2", MODEL_STATES)  # intact as far as the marker says
    proc = run_cli([*saved_run[1], "--out", str(run), "--resume", str(run)], es_cache,
                   env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert not sentinel.exists(), "the crafted pickle ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    skip = [ln for ln in lines if ln.startswith("es-llm: skipping damaged checkpoint")]
    assert len(skip) == 1 and str(flipped) in skip[0] and "sha256" in skip[0], lines
    assert lines[-1].startswith(f"es-llm: error: checkpoint file {crafted} holds more than"), lines
    assert "posix.system" in lines[-1]
