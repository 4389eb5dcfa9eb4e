"""Reading a DeepSpeed JSON config with an `evolved_sampling` section.

The ES section is taken out before the dict reaches `deepspeed.initialize` (DeepSpeed does
not know it), the batch fields are written out explicitly for the actual world size, and
`"auto"` in the LR scheduler's step counts is filled from the run's planned length, as the
Hugging Face integration does for its own `"auto"` values.
"""

from __future__ import annotations

import copy
from typing import Any

from es_llm.errors import InputError
from es_llm.model import load_json, resolve_preset_path
from es_llm.sampling.config import SECTION, EvolvedSamplingConfig, es_config_from_ds_config
from es_llm.sampling.geometry import BatchGeometry

DEFAULT_DS_CONFIG = "cpu_tiny"


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    path = resolve_preset_path(name_or_path, "ds")
    cfg = load_json(path)
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: a DeepSpeed config must be a JSON object")
    return cfg


def es_config_for_run(
    ds_config: dict[str, Any],
    method: str | None,
    overrides: dict[str, Any] | None = None,
    *,
    scorer: str | None = None,
    proxy_model: str | None = None,
) -> EvolvedSamplingConfig:
    """The ES config of a run: the ds_config section, then --method, --scorer,
    --proxy-model and --es.

    A config without the section (or with enabled=false) and no --method is plain uniform
    DeepSpeed training. `--method uniform` always means that, whatever the section says.
    """
    section = ds_config.get(SECTION)
    base = es_config_from_ds_config(ds_config)  # validates, also a disabled section
    data: dict[str, Any] = dict(section) if isinstance(section, dict) else {}
    data.pop("enabled", None)
    if base is None and method is None:
        data = {"method": "uniform"}
    if method is not None:
        data["method"] = method
    if scorer is not None:
        data["scorer"] = scorer
    if proxy_model is not None:
        data["proxy_model"] = proxy_model
    data.update(overrides or {})
    cfg = es_config_from_ds_config({SECTION: data})
    if cfg is None:  # only an override can disable it here
        raise InputError("--es enabled=false turns ES off: use --method uniform instead")
    return cfg


def deepspeed_config(
    ds_config: dict[str, Any], geometry: BatchGeometry, total_steps: int
) -> dict[str, Any]:
    """The dict handed to DeepSpeed: no ES section, explicit batch fields, no 'auto' left."""
    out = copy.deepcopy(ds_config)
    out.pop(SECTION, None)
    out["train_batch_size"] = geometry.train_batch
    out["train_micro_batch_size_per_gpu"] = geometry.micro
    out["gradient_accumulation_steps"] = geometry.grad_accum
    sched = out.get("scheduler")
    if isinstance(sched, dict):
        params = sched.setdefault("params", {})
        if params.get("total_num_steps") == "auto":
            params["total_num_steps"] = max(1, total_steps)
        if params.get("warmup_num_steps") == "auto":
            params["warmup_num_steps"] = max(1, round(0.05 * total_steps))
        leftover = [k for k, v in params.items() if v == "auto"]
        if leftover:
            raise InputError(
                f"scheduler.params {leftover} are 'auto', which es-llm can only fill for "
                f"total_num_steps and warmup_num_steps"
            )
    return out
