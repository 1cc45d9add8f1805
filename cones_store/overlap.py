"""Which neurons each stored concept tunes, and how much concepts share: the overlap
bookkeeping of the concept store, kept apart from its record reading and writing.

A concept's overlap (its `Overlap` value) lists the earlier concepts that tune some of the same
positions (Cones mask positions, CNS delta positions) and how many. It is computed inside the
write transaction that stores the concept and kept symmetric: writing or deleting a concept
updates the entries of every concept that lists it. `tuned_union` is every position the stored
concepts (of one method, or all) tune, per tensor.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np

from . import serialize as ser
from .codec import CodecError
from .envelope import frame, unframe
from .records import ConceptMeta, ConceptRecord, Overlap

log = logging.getLogger("cones.store")
SEP = b"\x00"   # part keys are `name \0 part`


class OverlapIndex:
    """Mixin of `ConceptStore` (which provides `_env` and the named databases `_db`)."""

    def _put_overlap(self, txn, name: str, overlap: Overlap) -> None:
        key = name.encode()
        txn.put(key, frame(key, ser.encode_overlap(overlap)), db=self._db["overlap"])

    def _sync_others(self, txn, name: str, counts: dict[str, int]) -> None:
        """After `name` was (re)written or deleted, concepts that list it as an earlier
        concept get the new pairwise count (overlap is symmetric) or lose the entry."""
        updated: dict[str, Overlap] = {}
        for other, raw in txn.cursor(db=self._db["overlap"]):
            try:
                other_name = other.decode()
            except UnicodeDecodeError:
                continue   # a damaged key (`cones store check` names it): not a reason to refuse this write
            if other_name == name:
                continue
            try:
                ov = ser.decode_overlap(unframe(other, raw)[1])
            except CodecError:
                continue  # that concept is damaged; its own get() reports it
            if name not in ov.shared_with:
                continue
            if other_name in counts:
                ov.shared_with[name] = counts[other_name]
            else:
                del ov.shared_with[name]
            updated[other_name] = ov
        for other_name, ov in updated.items():  # written after the scan, not under its cursor
            self._put_overlap(txn, other_name, ov)

    def forget(self, names: Iterable[str]) -> None:
        """Drop every other concept's overlap entry for these (lost) concepts."""
        def txn_fn(txn):
            for name in names:
                self._sync_others(txn, name, {})
        self._env.write(txn_fn)

    def tuned_union(self, method: str | None = None) -> dict[str, np.ndarray]:
        """Union of the neurons every stored concept (of `method`, or all) tunes, per tensor:
        Cones mask positions and CNS delta positions. Damaged values are skipped (a damaged
        concept cannot be applied, so its neurons are not in use)."""
        def txn_fn(txn):
            parts: dict[str, list[np.ndarray]] = {}
            for name, tensor, idx in self._stored_indices(txn, method=method):
                parts.setdefault(tensor, []).append(idx)
            return {t: np.unique(np.concatenate(v)) if len(v) > 1 else v[0]
                    for t, v in parts.items()}
        return self._env.read(txn_fn)

    def intersect(self, tensor_indices: dict[str, np.ndarray],
                  exclude: str | None = None) -> dict[str, int]:
        """For every stored concept (but `exclude`): how many of these positions it also
        tunes, summed over tensors. Concepts sharing none are left out."""
        return self._env.read(lambda txn: self._shared_counts(txn, tensor_indices, exclude))

    def _shared_counts(self, txn, own: dict[str, np.ndarray], exclude: str | None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, tensor, idx in self._stored_indices(txn, tensors=own.keys()):
            if name != exclude:
                counts[name] = counts.get(name, 0) + count_common(idx, own[tensor])
        return {k: v for k, v in sorted(counts.items()) if v}

    def _stored_indices(self, txn, method: str | None = None,
                        tensors: Iterable[str] | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
        """(concept, tensor, positions) for every stored mask and delta."""
        wanted = set(tensors) if tensors is not None else None
        methods = None
        if method is not None:
            methods = {m.name: m.method for m in self._metas(txn)}
        for db, decoder in (("masks", ser.decode_mask), ("deltas", ser.delta_indices)):
            for key, raw in txn.cursor(db=self._db[db]):
                try:
                    name, tensor = (p.decode() for p in key.split(SEP, 1))
                except (UnicodeDecodeError, ValueError):   # a damaged key: `store check` names it;
                    continue                             # every learn and removal failed as a bug
                if wanted is not None and tensor not in wanted:
                    continue
                if methods is not None and methods.get(name) != method:
                    continue
                try:
                    yield name, tensor, decoder(unframe(key, raw)[1])
                except CodecError:
                    log.warning("skipping damaged %s value of concept %r", db, name)

    def _metas(self, txn) -> list[ConceptMeta]:
        out = []
        for key, raw in txn.cursor(db=self._db["concepts"]):
            try:
                out.append(ser.decode_meta(unframe(key, raw)[1]))
            except CodecError:
                pass
        return out


def record_indices(record: ConceptRecord) -> dict[str, np.ndarray]:
    """The neurons a record tunes, per tensor (its mask and delta positions)."""
    out = {t: np.asarray(i, dtype=np.int64) for t, i in record.masks.items()}
    for tensor, delta in record.deltas.items():
        idx = np.asarray(delta.indices, dtype=np.int64)
        out[tensor] = np.union1d(out[tensor], idx) if tensor in out else idx
    return out


def count_common(a: np.ndarray, b: np.ndarray) -> int:
    """|a ∩ b| for sorted unique arrays, by binary search of the smaller in the larger."""
    if a.size > b.size:
        a, b = b, a
    if a.size == 0:
        return 0
    pos = np.searchsorted(b, a)
    pos[pos == b.size] = b.size - 1
    return int(np.count_nonzero(b[pos] == a))
