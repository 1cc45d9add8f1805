"""A concept file's header, read without the rest of it: `cones import` checks it before it
sends a file (a 4 GB checkpoint given by mistake was read whole, sent, and refused only then),
and the service's decoder (transfer.py) reads it first. A safetensors file is an 8-byte
little-endian header length, the header as JSON (its `__metadata__` holds cones's strings),
then the tensors."""
from __future__ import annotations

import json

from .errors import BadInput

FORMAT = "cones-concept/1"
# A concept's metadata stays under 1 MiB of characters (transfer.MAX_META_CHARS); its tensors'
# entries add little. A header past this is no concept file of cones's.
MAX_HEADER_BYTES = 16 << 20


class Newer(Exception):
    """A concept file of a later cones (a higher format, or parts added since)."""


def header_length(head: bytes) -> int:
    """Bytes of the file to read for its header (the first 8 say how long it is)."""
    if len(head) < 8:
        raise ValueError("it is too short for a safetensors file")
    size = int.from_bytes(head[:8], "little")
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"its header says it is {size:,} bytes long")
    return 8 + size


def metadata(head: bytes) -> dict[str, str]:
    """The header's __metadata__; `head` holds at least header_length(head) bytes."""
    header = json.loads(head[8:header_length(head)])
    found = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(found, dict):
        raise ValueError("its header is no safetensors header")
    return found


def check_format(meta: dict[str, str]) -> None:
    """Refuse what this version does not read: Newer for a later format of cones's."""
    written = meta.get("format")
    if written == FORMAT:
        return
    family, _, version = str(written).partition("/")
    ours, _, mine = FORMAT.partition("/")
    if family == ours and version.isdigit() and int(version) > int(mine):
        raise Newer(f"format {written}, this version reads {FORMAT}")
    if written is None:
        raise ValueError("a safetensors file without cones's format in it: a model or a LoRA?")
    raise ValueError(f"format {written!r}")


def refusal(exc: Exception) -> BadInput:
    """What `cones import` says of a file it does not take, here and in the service alike."""
    if isinstance(exc, Newer):   # ours, from a later cones: "not ours" sent people to re-export
        return BadInput(f"This concept file was written by a newer version of cones ({exc}).",
                        "Update cones to import it, or export the concept again from a service of "
                        "this version.")
    why = f"no {exc} in it" if isinstance(exc, KeyError) else str(exc).rstrip(".")
    return BadInput(f"This is not a cones concept file ({why}).", "Export it again with `cones export NAME -o FILE`.")
