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
                       "Use 1-64 letters, digits, '-' or '_' (for example: rex, my_mug, red-star).")
    return name
