"""The validation schedule, the monitor bridge and the stdout filter, in this process."""

from __future__ import annotations

import io
import json

import pytest

from es_llm.drivers.deepspeed import monitor as mon
from es_llm.drivers.deepspeed.validation import eval_steps, subset_size
from es_llm.ds_ops import LineFilter, _built_line


def test_about_ten_points_spread_over_the_run():
    steps = eval_steps(1000)
    assert sorted(steps) == [100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert sorted(eval_steps(512)) == [51, 102, 154, 205, 256, 307, 358, 410, 461]
    assert sorted(eval_steps(8)) == [1, 2, 3, 4, 5, 6, 7]  # short runs: each step at most once
    assert eval_steps(1) == set() and eval_steps(0) == set()
    assert sorted(eval_steps(100, points=4)) == [25, 50, 75]


def test_eval_every_wins_and_never_lands_on_the_end():
    assert sorted(eval_steps(10, every=3)) == [3, 6, 9]
    assert sorted(eval_steps(9, every=3)) == [3, 6]  # step 9 is the end: the full evaluation
    with pytest.raises(ValueError):
        eval_steps(10, every=0)


def test_the_subset_is_a_prefix_no_larger_than_the_split():
    assert subset_size(1511) == 256
    assert subset_size(32) == 32
    assert subset_size(1511, 1000) == 1000
    with pytest.raises(ValueError):
        subset_size(10, 0)


def test_enabled_monitor_sections_are_routed_under_out(tmp_path):
    cfg = {
        "train_batch_size": 8,
        "csv_monitor": {"enabled": True},
        "tensorboard": {"enabled": False},
        "wandb": {"enabled": True, "project": "p"},
    }
    assert mon.enabled_monitors(cfg) == ["wandb", "csv_monitor"]
    routed = mon.route_output(cfg, tmp_path)
    assert routed["csv_monitor"] == {
        "enabled": True,
        "output_path": str(tmp_path / "monitor"),
        "job_name": "es-llm",
    }
    assert routed["wandb"] == {"enabled": True, "project": "p"}  # wandb has its own dir setting
    assert cfg["csv_monitor"] == {"enabled": True}  # the caller's config is left alone
    kept = {"csv_monitor": {"enabled": True, "output_path": "/x", "job_name": "j"}}
    assert mon.route_output(kept, tmp_path) == kept
    assert mon.route_output({"train_batch_size": 8}, tmp_path) == {"train_batch_size": 8}


def test_a_monitor_without_its_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(mon.MONITOR_PACKAGES, "wandb", "es_llm_no_such_package")
    with pytest.raises(mon.MonitorError, match="'wandb' monitor but the 'es_llm_no_such_package'"):
        mon.check_monitor_packages({"wandb": {"enabled": True}})
    mon.check_monitor_packages({"wandb": {"enabled": False}})
    mon.check_monitor_packages({"csv_monitor": {"enabled": True}})  # needs no package


class _Recorder:
    enabled = True

    def __init__(self) -> None:
        self.events: list = []

    def write_events(self, events: list) -> None:
        self.events.extend(events)


class _Engine:
    def __init__(self) -> None:
        self.monitor = _Recorder()


def test_step_and_eval_records_become_monitor_events():
    engine = _Engine()
    hooks = mon.MonitorHooks(engine, is_main=True)
    hooks.step({"step": 3, "epoch": 0, "phase": "select", "train_loss": 2.5, "lr": None,
                "scored": 16, "selected": 8, "meta_loss": float("nan"), "select_s": 0.01,
                "selection_digest": "ab"})  # fmt: skip
    hooks.evaluation({"step": 3, "val_loss": 2.75, "val_subset_loss": 2.7, "set": "full"})
    assert engine.monitor.events == [
        ("Train/ES/train_loss", 2.5, 3),
        ("Train/ES/scored", 16.0, 3),
        ("Train/ES/selected", 8.0, 3),
        ("Train/ES/select_s", 0.01, 3),
        ("Eval/val_loss", 2.75, 3),
        ("Eval/val_subset_loss", 2.7, 3),
    ]
    other = _Engine()
    mon.MonitorHooks(other, is_main=False).step({"step": 1, "train_loss": 1.0})
    assert other.monitor.events == []  # only rank 0 writes


def test_the_cached_op_line_is_dropped_and_everything_else_kept():
    sink = io.StringIO()
    out = LineFilter(sink, _built_line)
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=out)
    print(json.dumps({"steps": 3}), file=out)
    print("partial", end="", file=out)
    assert sink.getvalue() == '{"steps": 3}\n'
    out.flush()
    assert sink.getvalue() == '{"steps": 3}\npartial'
