"""`cones export` / `cones import`: one concept as one safetensors file.

Arrays are safetensors tensors under "/"-separated keys (K/V parameter names use dots, so the
separator never collides); the metadata (ConceptMeta, overlap, delta shapes) rides in the
file's string header as JSON. The base-model fingerprint travels in the meta, so importing on
another model is refused by the engine.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from cns_daemon.api.concept_file import FORMAT, Newer, check_format, metadata as header_metadata, refusal
from cns_daemon.archive import is_digest
from cns_daemon.methods.common.tokens import token_words
from cones_store.records import ConceptMeta, ConceptRecord, Overlap, SparseDelta

# Metadata a concept of cones' own stays far under (its captions are at most 64 x 1,000 characters)
MAX_META_CHARS = 1 << 20


def encode(record: ConceptRecord) -> bytes:
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for name, idx in record.masks.items():
        tensors[f"mask/{name}"] = np.ascontiguousarray(idx, dtype=np.int64)
    for name, d in record.deltas.items():
        tensors[f"delta/{name}/indices"] = np.ascontiguousarray(d.indices, dtype=np.int64)
        tensors[f"delta/{name}/values"] = np.ascontiguousarray(d.values)
    if record.residual is not None:
        tensors["residual"] = np.ascontiguousarray(record.residual)
    for token, vec in record.embeddings.items():
        tensors[f"embedding/{token}"] = np.ascontiguousarray(vec)
    metadata = {
        "format": FORMAT,
        # (the store's own count of its parts stays behind: an importing store counts anew, and
        # a cones from before it counted reads the file)
        "meta": json.dumps({k: v for k, v in dataclasses.asdict(record.meta).items() if k != "parts"},
                           default=_jsonable),
        "overlap": json.dumps(dataclasses.asdict(record.overlap)),
        "delta_shapes": json.dumps({k: list(d.shape) for k, d in record.deltas.items()}),
    }
    return save(tensors, metadata=metadata)


def decode(data: bytes) -> ConceptRecord:
    """Bytes -> ConceptRecord, or BadInput saying the file is not a usable concept file (a bad
    file given to `cones import` is the person's input, not damage to the store)."""
    from safetensors.numpy import load

    try:
        metadata = header_metadata(data)
        check_format(metadata)
        tensors = load(data)
        if len(metadata["meta"]) > MAX_META_CHARS:   # it is stored, listed and sent whole
            raise ValueError(f"its metadata is {len(metadata['meta']):,} characters, over {MAX_META_CHARS:,}")
        fields = json.loads(metadata["meta"])
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ConceptMeta)}) \
            if isinstance(fields, dict) else []
        if unknown:
            raise Newer(f"it holds {', '.join(unknown[:3])}, which this version does not know")
        if isinstance(fields, dict) and isinstance(fields.get("method"), str) and fields["method"] not in PARTS:
            raise Newer(f"its method {fields['method']!r} is none this version knows")
        meta = ConceptMeta(**fields)
        overlap_fields = json.loads(metadata.get("overlap", "{}"))
        if isinstance(overlap_fields, dict) and (added := sorted(
                set(overlap_fields) - {f.name for f in dataclasses.fields(Overlap)})):
            raise Newer(f"its overlap holds {', '.join(added[:3])}, which this version does not know")
        overlap = Overlap(**overlap_fields)
        shapes = json.loads(metadata.get("delta_shapes", "{}"))
        record = ConceptRecord(meta=meta, overlap=overlap)
        for key, arr in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "mask":
                record.masks[rest] = arr
            elif kind == "embedding":
                record.embeddings[rest] = arr
            elif kind == "residual":
                record.residual = arr
            elif kind == "delta" and rest.endswith("/indices"):
                name = rest[: -len("/indices")]
                record.deltas[name] = SparseDelta(arr, tensors[f"delta/{name}/values"],
                                                  tuple(shapes[name]))
            elif kind not in ("delta", "mask", "embedding", "residual"):   # a part added since
                raise Newer(f"it holds a part of kind {kind!r}, which this version does not know")
            elif kind != "delta":
                raise ValueError(f"unexpected tensor {key!r}")
        _check_parts(record)
        _check_values(record)
        _check_meta(record.meta)
        if not all(is_digest(d) for d in meta.photo_digests):
            raise ValueError("its photos are not named by their SHA-256")
    except Exception as exc:  # safetensors, json, dataclass and name errors all mean "not ours"
        raise refusal(exc) from None   # (or, Newer, ours from a later cones)
    return record


# What each method's concept holds (and must): a file whose parts are another method's was
# edited or damaged, and would draw something else than it says.
PARTS = {"cns": ({"deltas", "embeddings"}, set()), "cones": ({"masks", "embeddings"}, {"masks"}),
         "cones2": ({"residual"}, {"residual"})}
# A Cones concept whose neurons' values were trained (`values tuned`) holds them instead of a mask
TUNED_CONES = ({"deltas", "embeddings"}, {"deltas"})


def _check_parts(record: ConceptRecord) -> None:
    held = {part for part, present in (("masks", record.masks), ("deltas", record.deltas),
                                       ("embeddings", record.embeddings),
                                       ("residual", record.residual is not None)) if present}
    allowed, needed = PARTS[record.meta.method]
    if record.meta.method == "cones" and record.meta.hparams.get("values") == "tuned":
        allowed, needed = TUNED_CONES
    if held - allowed or needed - held:
        raise ValueError(f"it holds {', '.join(sorted(held)) or 'nothing'}, not what a "
                         f"{record.meta.method} concept holds")
    # Token rows for its own words only: a row for "red" would turn every red thing of every
    # prompt into what the file says, named or not
    words = token_words(record.meta.token) if isinstance(record.meta.token, str) else []
    if not words and record.meta.method != "cones2":   # Cones 2 reads the class word: no token
        raise ValueError("it names no token")
    if stray := sorted(set(record.embeddings) - set(words)):
        raise ValueError(f"it holds token rows for words its token does not name ({', '.join(map(repr, stray[:3]))})")


def _check_meta(meta) -> None:
    """The metadata's fields of the types cones writes: an edited file with "created":
    "yesterday" was taken and failed every `cones list` after (a bug report, exit 70), hparams
    as a list failed its import so, and an empty class failed its generates."""
    import re

    from cns_daemon.api.protocol import CLASS_PATTERN

    kinds = {"created": (int, float), "hparams": dict, "metrics": dict, "token": str,
             "class_word": str, "photo_digests": list, "photo_captions": list, "fingerprint": str}
    for field, kind in kinds.items():
        value = getattr(meta, field)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"its {field} is a {type(value).__name__}")
    if not 0 <= meta.created <= time.time() + 86400 * 366 * 100:   # 1e20 failed every `cones show`
        raise ValueError(f"its creation time {meta.created!r} is no time a concept was made")
    if not meta.fingerprint:   # every export names the model it was learned on: this one was edited
        raise ValueError("it names no base model (its fingerprint is empty)")
    if not re.fullmatch(CLASS_PATTERN, meta.class_word):
        raise ValueError(f"its class {meta.class_word!r} is not one cones takes")
    if not all(c is None or isinstance(c, str) for c in meta.photo_captions):
        raise ValueError("its photo captions are not text")
    hparams = meta.hparams
    for key in ("steps", "seed"):
        if key in hparams and (isinstance(hparams[key], bool) or not isinstance(hparams[key], int)):
            raise ValueError(f"its {key} is a {type(hparams[key]).__name__}")
    given = hparams.get("options_given", {})
    if not isinstance(given, dict) or not all(
            isinstance(v, (str, int, float, bool)) or v is None for v in given.values()):
        raise ValueError("its options are not names with values")
    if hparams.get("scope", "all") not in ("concept", "all"):   # a scope added since
        raise Newer(f"its scope {hparams['scope']!r} is none this version knows")


def _check_values(record: ConceptRecord) -> None:
    """What the store would refuse (positions unsorted or outside their tensor: a bug report
    then), and values that are not numbers: one NaN made every image of the concept black."""
    from cones_store.store import check_record, values_finite

    check_record(record)
    if not values_finite(record):
        raise ValueError("it holds values that are not finite numbers (NaN or infinity)")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
