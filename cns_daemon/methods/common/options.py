"""Hyper-parameters: a typed dataclass per method; LearnSpec.options overrides fields by name.

Unknown keys and values of the wrong type are BadInput errors (a typo in `concept.toml` must
not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from cns_daemon.api.errors import BadInput

T = TypeVar("T")


def _coerce(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif default is None or isinstance(value, kind):
        return value
    raise BadInput(f"Option {name!r} must be a {kind.__name__}, not {value!r}.")


def parse_options(cls: type[T], options: dict | None, steps: int | None = None) -> T:
    """Defaults of `cls`, overridden by `options`, then by `steps` (LearnSpec.steps) if given."""
    defaults = cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    options = dict(options or {})
    unknown = sorted(set(options) - fields)
    if unknown:
        raise BadInput(f"Unknown option(s) {', '.join(map(repr, unknown))}.",
                       f"Valid options: {', '.join(sorted(fields))}.")
    values = {k: _coerce(k, v, getattr(defaults, k)) for k, v in options.items()}
    if steps is not None:
        if "steps" not in fields:
            raise BadInput("This method has no `steps` setting.")
        values["steps"] = _coerce("steps", steps, 0)
    hp = dataclasses.replace(defaults, **values)
    check = getattr(hp, "validate", None)
    if check is not None:
        check()
    return hp


def as_dict(hp: Any) -> dict[str, Any]:
    """The record's meta.hparams form."""
    return dataclasses.asdict(hp)
