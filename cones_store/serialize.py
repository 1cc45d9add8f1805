"""Records <-> store values. One function per value kind, used for both the write and the read
side so the byte layout lives in one place. Payloads are framed by `envelope` in the store."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from .codec import (CodecError, Reader, decode_indices, decode_tensor, encode_indices,
                    encode_tensor, put_bytes, put_uvarint)
from .records import ConceptMeta, JobRecord, Overlap, SparseDelta


# JSON-shaped records ------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    # Metrics and hyper-parameters often hold numpy scalars; store them as plain numbers.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, default=_json_default, sort_keys=True, separators=(",", ":")).encode()


def load_json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"bad JSON ({exc})") from None


def _from_fields(cls, data: Any):
    """Build a dataclass from stored JSON, ignoring keys a newer field set no longer has."""
    if not isinstance(data, dict):
        raise CodecError(f"expected an object for {cls.__name__}")
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise CodecError(f"bad {cls.__name__} ({exc})") from None


def encode_meta(meta: ConceptMeta) -> bytes:
    return dump_json(asdict(meta))


def decode_meta(payload: bytes) -> ConceptMeta:
    from cns_daemon.api.errors import ConesError

    try:
        return _from_fields(ConceptMeta, load_json(payload))
    except ConesError as exc:  # a stored name/method that no longer validates
        raise CodecError(exc.message) from None


def encode_overlap(overlap: Overlap) -> bytes:
    return dump_json(asdict(overlap))


def decode_overlap(payload: bytes) -> Overlap:
    return _from_fields(Overlap, load_json(payload))


def encode_job(job: JobRecord) -> bytes:
    return dump_json(asdict(job))


def decode_job(payload: bytes) -> JobRecord:
    return _from_fields(JobRecord, load_json(payload))


# Array-shaped records ------------------------------------------------------------------------


def encode_mask(indices: np.ndarray) -> bytes:
    """A Cones mask. Records do not carry tensor shapes for masks, so the codec's upper bound is
    the largest position + 1; the header costs the same either way."""
    idx = np.asarray(indices)
    return encode_indices(idx, int(idx[-1]) + 1 if idx.size else 0)


def decode_mask(payload: bytes) -> np.ndarray:
    return decode_indices(payload)[0]


def encode_delta(delta: SparseDelta) -> bytes:
    idx = np.asarray(delta.indices)
    values = np.asarray(delta.values)
    if values.shape != idx.shape:
        raise ValueError(f"delta has {idx.size} indices but values of shape {values.shape}")
    out = bytearray()
    put_uvarint(out, len(delta.shape))
    for dim in delta.shape:
        put_uvarint(out, int(dim))
    put_bytes(out, encode_indices(idx, math.prod(delta.shape)))
    put_bytes(out, encode_tensor(values))
    return bytes(out)


def decode_delta(payload: bytes) -> SparseDelta:
    reader = Reader(payload)
    shape = tuple(reader.uvarint() for _ in range(reader.uvarint()))
    indices, n = decode_indices(reader.bytes())
    values = decode_tensor(reader.bytes())
    reader.expect_end()
    if n != math.prod(shape) or values.shape != indices.shape:
        raise CodecError("delta indices, values and shape disagree")
    return SparseDelta(indices=indices, values=values, shape=shape)


def delta_indices(payload: bytes) -> np.ndarray:
    """Only the positions of a stored delta (overlap queries skip the values)."""
    reader = Reader(payload)
    for _ in range(reader.uvarint()):
        reader.uvarint()
    return decode_indices(reader.bytes())[0]

