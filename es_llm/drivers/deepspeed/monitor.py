"""The run's metrics through DeepSpeed's own monitors (tensorboard, wandb, csv_monitor, comet).

When the DeepSpeed config enables a monitor section, the engine builds a
`deepspeed.monitor.monitor.MonitorMaster` (`engine.monitor`) and writes its own events there
(learning rate, engine timers; x = global samples). This module sends es-llm's records to the
same writers, through `engine.monitor.write_events`, so one dashboard shows both:

- every optimizer step: `Train/ES/<field>` for the numeric fields of the step record of
  metrics.jsonl (train_loss, lr, scored, selected, invalid, meta_loss, step_s, the step's
  share of each ES timer: score_fwd_s, select_s, train_fwd_bwd_s, optimizer_s, and with
  scorer proxy proxy_fwd_s, proxy_train_s);
- every evaluation: `Eval/val_loss` (what was evaluated) and `Eval/val_subset_loss` (the
  fixed subset, the curve's series).

x is the optimizer step. Only rank 0 writes (as `MonitorMaster` does). A monitor section
whose `output_path` is empty writes under OUT/monitor/ instead of the working directory.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path
from typing import Any

from es_llm.errors import InputError
from es_llm.sampling.timing import TIMERS

__all__ = [
    "MONITOR_PACKAGES",
    "MonitorError",
    "MonitorHooks",
    "check_monitor_packages",
    "enabled_monitors",
    "route_output",
]

# DeepSpeed's monitor sections, and the package each one imports when enabled
MONITOR_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "csv_monitor": None,
    "comet": "comet_ml",
}
STEP_EVENTS = (
    "train_loss",
    "lr",
    "scored",
    "selected",
    "invalid",
    "meta_loss",
    "step_s",
    *TIMERS,  # the step's share of each ES timer
)
EVAL_EVENTS = ("val_loss", "val_subset_loss")


class MonitorError(InputError):
    """A monitor section is enabled but cannot run here (its package is missing)."""


def enabled_monitors(ds_config: dict[str, Any]) -> list[str]:
    """The monitor sections of `ds_config` that are enabled."""
    return [
        name
        for name in MONITOR_PACKAGES
        if isinstance(ds_config.get(name), dict) and ds_config[name].get("enabled", False)
    ]


def check_monitor_packages(ds_config: dict[str, Any]) -> None:
    """Refuse, before any engine starts, a monitor whose package is not installed."""
    for name in enabled_monitors(ds_config):
        package = MONITOR_PACKAGES[name]
        if package is not None and importlib.util.find_spec(package) is None:
            raise MonitorError(
                f"the DeepSpeed config enables the {name!r} monitor but the {package!r} package "
                f"is not installed: pip install {package}, or set {name}.enabled to false"
            )


def route_output(ds_config: dict[str, Any], out: Path) -> dict[str, Any]:
    """A copy of `ds_config` whose enabled monitors without an output_path write to
    OUT/monitor/ (DeepSpeed's default is the working directory)."""
    enabled = enabled_monitors(ds_config)
    if not enabled:
        return ds_config
    cfg = copy.deepcopy(ds_config)
    for name in enabled:
        section = cfg[name]
        if name != "wandb" and not section.get("output_path"):
            section["output_path"] = str(Path(out) / "monitor")
        if name != "wandb":
            section.setdefault("job_name", "es-llm")
    return cfg


def _events(record: dict[str, Any], fields: tuple[str, ...], prefix: str, step: int) -> list:
    out = []
    for key in fields:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out.append((f"{prefix}/{key}", float(value), step))
    return out


class MonitorHooks:
    """Writes step and evaluation records to `engine.monitor` when it is enabled (rank 0)."""

    def __init__(self, engine: Any, is_main: bool) -> None:
        monitor = getattr(engine, "monitor", None)
        self.monitor = monitor if is_main and getattr(monitor, "enabled", False) else None

    @property
    def enabled(self) -> bool:
        return self.monitor is not None

    def step(self, record: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.write_events(_events(record, STEP_EVENTS, "Train/ES", record["step"]))

    def evaluation(self, record: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.write_events(_events(record, EVAL_EVENTS, "Eval", record["step"]))
