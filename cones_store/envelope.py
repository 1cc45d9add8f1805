"""The frame around every value in the store: schema version and a checksum.

    b"cs" | schema version (u16 LE) | crc32 (u32 LE) | payload

The crc32 covers the record's key as well as the version and payload, so a flipped byte, a
truncated value, and a value written under the wrong key (a bad write) are all detected. crc32
catches every error burst up to 32 bits and runs at memory speed, which matters for the
multi-megabyte delta values.
"""
from __future__ import annotations

import struct
import zlib

from .codec import CodecError

SCHEMA_VERSION = 1
MAGIC = b"cs"
_HEADER = struct.Struct("<2sHI")


def frame(key: bytes, payload: bytes, version: int = SCHEMA_VERSION) -> bytes:
    return _HEADER.pack(MAGIC, version, _crc(key, version, payload)) + payload


def unframe(key: bytes, value: bytes) -> tuple[int, bytes]:
    """(schema version, payload); CodecError if the value is damaged or unknown."""
    if len(value) < _HEADER.size:
        raise CodecError(f"value too short ({len(value)} bytes)")
    magic, version, crc = _HEADER.unpack_from(value)
    payload = bytes(value[_HEADER.size:])
    if magic != MAGIC:
        raise CodecError("bad value header")
    if crc != _crc(key, version, payload):
        raise CodecError("checksum mismatch")
    if version > SCHEMA_VERSION:
        raise CodecError(f"written by a newer cones (schema {version}; this one reads up to "
                         f"{SCHEMA_VERSION})")
    return version, payload


def frame_version(key: bytes, value: bytes) -> int | None:
    """The schema version a whole value was framed at (its checksum confirms it), whatever
    version that is; None for a damaged one. A newer cones frames its values, the schema record
    too, at its own version: read so, a store of a newer schema is told as one, not as damage
    (which salvage would have emptied)."""
    if len(value) < _HEADER.size:
        return None
    magic, version, crc = _HEADER.unpack_from(value)
    if magic != MAGIC or crc != _crc(key, version, bytes(value[_HEADER.size:])):
        return None
    return version


def unchecked_payload(value: bytes) -> bytes:
    """The payload without checking it: to read what a value says it is before its checksum
    confirms it (a value under a damaged key names the key it was written under)."""
    return bytes(value[_HEADER.size:])


def _crc(key: bytes, version: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<H", version), zlib.crc32(key)))
