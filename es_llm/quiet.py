"""Known-harmless DeepSpeed log lines and warnings, filtered unless the user asks for everything.

DeepSpeed logs through one ``logging`` logger named "DeepSpeed"; a filter on it drops the
records listed here and nothing else. DeepSpeed's ZeRO stages still call torch.distributed's
collectives by their former names (all_gather_into_tensor, reduce_scatter_tensor), which
torch now marks deprecated with a FutureWarning on every rank; es-llm's own collectives use
the current names (`es_llm.dist`), so those two warnings say nothing a user can act on and are
ignored too. ``es-llm --verbose`` (or ES_LLM_VERBOSE=1, which the command line sets so that
launched ranks inherit it) leaves every line in place.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "ES_LLM_VERBOSE"

# Substrings of DeepSpeed log messages that say nothing a user of es-llm can act on.
KNOWN_HARMLESS = (
    # CPU machines: the accelerator is detected correctly, the line only alarms.
    "Setting accelerator to CPU",
    # DeepSpeed reads the learning rate for its own logging before the first step.
    "Attempting to get learning rate from scheduler before it has started",
)


# torch's deprecation notices for the collectives DeepSpeed calls by their former names
KNOWN_HARMLESS_WARNINGS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)


class KnownHarmlessFilter(logging.Filter):
    """Drops records whose message contains one of ``KNOWN_HARMLESS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in KNOWN_HARMLESS)


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_deepspeed(verbose: bool = False) -> None:
    """Install the filter on DeepSpeed's logger (before or after deepspeed is imported)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if verbose or verbose_requested():
        return
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, KnownHarmlessFilter) for f in ds_logger.filters):
        ds_logger.addFilter(KnownHarmlessFilter())
    for message in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


# The libraries' own progress bars, which --no-progress turns off too: huggingface_hub's
# (downloads; transformers' bars, "Loading weights" included, start from its setting) and
# datasets' (map, save_to_disk, load_dataset). Each reads its variable once, at import.
PROGRESS_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def quiet_progress_bars() -> None:
    """Turn off every progress bar of transformers, huggingface_hub and datasets in this
    process and in the processes it starts: through the environment for a library not
    imported yet (so this imports none of them), through its switch for one that is."""
    for var in PROGRESS_ENV:
        os.environ[var] = "1"
    with warnings.catch_warnings():  # a library refuses (and warns) when its variable says "0"
        warnings.simplefilter("ignore")
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "datasets" in sys.modules:
            import datasets

            datasets.disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
