"""The names every part of cones agrees on, spelled once: the methods and what a concept may be
called. The protocol, the settings, the store and the method registry all read them here."""
from __future__ import annotations

import re
from typing import Literal, get_args

from .errors import BadInput

MethodName = Literal["cns", "cones", "cones2"]
METHODS: tuple[str, ...] = get_args(MethodName)   # also the order one request applies them in
DEFAULT_METHOD: MethodName = "cns"

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
NAME_RE = re.compile(NAME_PATTERN)


def validate_name(name: str) -> str:
    """Concept names: letters, digits, `-`, `_`; 1–64 characters."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:77]}..."
        raise BadInput(f"Invalid concept name {shown!r}.",
                       "Use 1-64 ASCII letters (a-z, A-Z), digits, '-' or '_' (for example: rex, my_mug, red-star).")
    return name


def validate_new_name(name: str) -> str:
    """A name for a concept about to be learned: `validate_name`, and no leading `-`, which a
    command line reads as an option (`cones show -rex` fails; `cones show -- -rex` is needed).
    Names stored already keep working."""
    validate_name(name)
    if name.startswith("-"):
        raise BadInput(f"A concept name cannot start with '-' ({name!r}): commands would read it as an option.",
                       f"Use {name.lstrip('-') or 'another name'!r} or '_{name.lstrip('-')}' instead.")
    return name
