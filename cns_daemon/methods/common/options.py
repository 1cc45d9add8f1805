"""Hyper-parameters: a typed dataclass per method; LearnSpec.options overrides fields by name.

Unknown keys, values of the wrong type and values out of range are BadInput errors (a typo in
`concept.toml` must not silently fall back to a default, and a negative learning rate must not
train backwards).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, TypeVar

from cns_daemon.api.errors import BadInput
from cns_daemon.api.protocol import MAX_LEARN_STEPS

T = TypeVar("T")

# The least sensible value of options the methods share by name: (bound, whether the bound
# itself is allowed). Class images drawn in one step are noise (generate.check_steps). Each method's `validate` checks what is its own (percentages, choices).
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "lr": (0, False), "lr_token": (0, False), "probe_lr": (0, False), "rho": (0, False),
    "grad_clip": (0, False),
    "lambda_prior": (0, True), "lambda_prev": (0, True), "lambda_base": (0, True),
    "lambda_reg": (0, True), "tau": (0, True),
    "prior_images": (0, True), "prior_batch": (1, True), "prior_steps": (2, True),
    "variants": (1, True), "probe_steps": (1, True), "tune_steps": (1, True), "reg_batch": (1, True), "vectors": (1, True),
}
# The most of a count that makes sense: more loops as long as a learn may (MAX_LEARN_STEPS), or
# holds that many images in memory (`variants` is a pool of every photo that many times over:
# 1,000 at 512 px was some 16 GB) or draws that many class images or denoising steps.
UPPER_BOUNDS: dict[str, int] = {
    "tune_steps": MAX_LEARN_STEPS, "probe_steps": MAX_LEARN_STEPS, "prior_steps": 1000,
    "prior_images": 1000, "prior_batch": 64, "variants": 64, "reg_batch": 1024,
}


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
            try:
                return float(value)
            except OverflowError:   # an integer of 400 digits: no float holds it
                raise BadInput(f"Option {name!r} must be a finite number, not one this large.") from None
    elif default is None or isinstance(value, kind):
        return value
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise BadInput(f"Option {name!r} must be {article} {kind.__name__}, not {value!r}.")


def parse_options(cls: type[T], options: dict | None, steps: int | None = None) -> T:
    """Defaults of `cls`, overridden by `options`, then by `steps` (LearnSpec.steps) if given."""
    defaults = cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    options = dict(options or {})
    unknown = sorted(set(options) - fields)
    if unknown:
        raise BadInput(f"Unknown option(s) {', '.join(map(repr, unknown))}.",
                       f"Valid options: {', '.join(sorted(fields - {'steps'}))} (steps: --steps N, or steps = N in an inbox folder's concept.toml).")
    try:
        values = {k: _coerce(k, v, getattr(defaults, k)) for k, v in options.items()}
        if steps is not None:
            if "steps" not in fields:
                raise BadInput("This method has no `steps` setting.")
            values["steps"] = _coerce("steps", steps, 0)
        for key, value in values.items():
            _check_range(key, value)
        hp = dataclasses.replace(defaults, **values)
        check = getattr(hp, "validate", None)
        if check is not None:
            check(frozenset(values))   # (what was given: a combination that cannot be is refused)
    except BadInput as exc:
        if exc.hint != BadInput.default_hint:   # a hint of its own says more
            raise
        # The generic hint points at `--help`, which does not list method options: the defaults
        # of the ones given do.
        given = [f"{k}={getattr(defaults, k)!r}" for k in sorted(options) if k in fields]
        raise BadInput(exc.message, f"Change the value; this method's default{'s are' if len(given) > 1 else ' is'} "
                       f"{', '.join(given)}." if given else None) from None
    return hp


def _check_range(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise BadInput(f"Option {name!r} must be a finite number, not {value!r}.")
    bound, inclusive = LOWER_BOUNDS.get(name, (-math.inf, True))
    if value < bound or (value == bound and not inclusive):
        raise BadInput(f"Option {name!r} must be {'≥' if inclusive else '>'} {bound:g}, not {value!r}.")
    if value > UPPER_BOUNDS.get(name, math.inf):
        raise BadInput(f"Option {name!r} must be ≤ {UPPER_BOUNDS[name]:,}, not {value!r}.")


def inert_note(hp: Any, given: Iterable[str]) -> str | None:
    """What the learn result says of options given that changed nothing under the others (a
    prior weight with scoped values, which never meet the class prompt): said, not refused, so
    a relearn line or concept.toml of an earlier learn still runs. `hp.inert()`: option -> why."""
    inert = hp.inert() if hasattr(hp, "inert") else {}
    hit = [f"{k} ({inert[k]})" for k in sorted(set(given) & set(inert))]
    return f"options that changed nothing: {'; '.join(hit)}" if hit else None


def as_dict(hp: Any) -> dict[str, Any]:
    """The record's meta.hparams form."""
    return dataclasses.asdict(hp)
