"""The registry of sampling methods: one module per method, each registering one class.

Importing this package imports every module beside `base` (found on disk, so adding a method
is adding its file) and so fills the registry. See `base` for what a method declares.
"""

from __future__ import annotations

import importlib
import pkgutil

from es_llm.sampling.methods.base import (
    Options,
    SamplingMethod,
    UnknownMethodError,
    Visit,
    get_method,
    method_names,
    option_owners,
    register,
    registered,
)

__all__ = [
    "Options",
    "SamplingMethod",
    "UnknownMethodError",
    "Visit",
    "get_method",
    "method_names",
    "option_owners",
    "register",
    "registered",
]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
