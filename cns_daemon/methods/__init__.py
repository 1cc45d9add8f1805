"""The three methods behind one interface (see base.py). Importing this imports torch.

    from cns_daemon.methods import get_method
    method = get_method("cns")            # "cns" | "cones" | "cones2"

Each method module exposes its Method instance as `METHOD`; modules are imported on first use
(cones2 is optional at import time so one broken method cannot take the others down).
"""
from __future__ import annotations

import importlib

from cns_daemon.api.errors import BadInput, Internal
from cns_daemon.api.names import METHODS
from cns_daemon.methods.base import (CancelToken, LearnSpec, Method, ProgressEvent, ProgressFn,
                                     ProgressReporter)

# One module per method name, in the order a request applies them (generate.applied): CNS
# writes weights, Cones zeroes some of them, Cones 2 only adds to the text embeddings.
METHOD_MODULES = {name: f"cns_daemon.methods.{name}" for name in METHODS}

__all__ = ["get_method", "resident_methods", "METHOD_MODULES", "CancelToken", "LearnSpec", "Method",
           "ProgressEvent", "ProgressFn", "ProgressReporter"]


def get_method(name: str) -> Method:
    module_name = METHOD_MODULES.get(name)
    if module_name is None:
        raise BadInput(f"Unknown method {name!r}.", f"Use one of: {', '.join(METHOD_MODULES)}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise Internal(f"The {name} method could not be loaded: {exc}") from exc
    method = getattr(module, "METHOD", None)
    if method is None:
        raise Internal(f"{module_name} defines no METHOD.")
    return method


def resident_methods() -> list[Method]:
    """The methods whose concepts live in the weights between requests (base.Method.resident)."""
    return [m for m in map(get_method, METHOD_MODULES) if m.resident]
