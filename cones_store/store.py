"""The concept store: one LMDB environment, one small typed API.

    store = ConceptStore.open(paths.store, fingerprint=fingerprint(pipe))
    store.put(record)            # all parts + overlap bookkeeping in ONE transaction
    record = store.get("rex")    # NotFound / Corrupt("concept 'rex' is damaged ...")
    store.tuned_union("cns")     # every tuned neuron, per tensor (for M_reg)

Layout (named databases; every value framed by `envelope`: schema version + crc32):
    meta        b"schema" -> {"version"}, b"fingerprint" -> base model fingerprint,
                b"aliases" -> [earlier digests of the same model], b"base_model" -> {model, dtype},
                b"lost" -> {name: [photo digests]}: concepts a salvage could not copy (their
                photos are kept for learning them again; `lost`)
    concepts    name -> ConceptMeta (JSON)
    masks       name \\0 tensor -> index set          (Cones)
    deltas      name \\0 tensor -> shape, indices, values (CNS)
    residuals   name -> vector                        (Cones 2)
    embeddings  name \\0 token -> vector
    overlap     name -> Overlap (JSON): earlier concepts sharing its neurons, and how many
    jobs        job id -> JobRecord (JSON)
A concept's parts are keyed by its name, so a damaged value only ever affects that concept.
The overlap bookkeeping (who shares which neurons) is the `OverlapIndex` mixin, cones_store/overlap.py;
which base model the store serves is the `BaseModelBinding` mixin, cones_store/binding.py.

Two kinds of damage. A value whose bytes changed fails its checksum: that concept is damaged and
`delete` (which never decodes a value) removes it. A damaged B-tree page (LMDB's
MDB_PAGE_NOTFOUND / MDB_CORRUPTED) makes every key behind it unreachable: a read that can pin it
on one concept (`get`, `overlap`, `size_of`) reports that concept damaged, anything else reports
the store damaged with one error saying to run `cones store salvage` (cones_store/salvage.py), which
copies every readable concept into a fresh store. LMDB poisons a transaction after such an
error, so per-concept checks each use their own read transaction.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

import lmdb
import numpy as np

from cns_daemon.api.errors import (BadInput, Conflict, Corrupt, Internal, NotFound,
                                   ProtocolMismatch, Unavailable)

from . import serialize as ser
from .codec import CodecError, decode_tensor, encode_tensor
from .env import DEFAULT_MAP_SIZE, PAGE_ERRORS, SALVAGE_HINT, Env, lmdb_reason
from .binding import BaseModelBinding
from .jobs import JobQueue
from .overlap import SEP, OverlapIndex, record_indices
from .envelope import SCHEMA_VERSION, frame, frame_version, unchecked_payload, unframe
from .records import ConceptMeta, ConceptRecord, Overlap, validate_name

log = logging.getLogger("cones.store")
_PART_DBS = ("masks", "deltas", "embeddings")   # name \0 part keys
_WHOLE_DBS = ("residuals", "overlap")           # name keys
Item = tuple[str, bytes, bytes]                 # (database, key, framed value)

# Upgrades from schema version v to v + 1, run inside one write transaction on open.
# A new schema version adds its step here and keeps the fixture of the previous one.
MIGRATIONS: dict[int, Callable[["lmdb.Transaction", dict], None]] = {}


class ConceptStore(JobQueue, OverlapIndex, BaseModelBinding):
    def __init__(self, env: Env, fingerprint: str | None = None):
        self._env = env
        self._db = env.dbs
        self._bound: str | None = None
        self._accepted: frozenset[str] = frozenset()   # the bound digest and its aliases (binding.py)
        try:
            self._check_schema()
            if fingerprint:
                self.bind(fingerprint)
        except BaseException:
            env.close()  # a refused open must not keep the environment (LMDB allows one per process)
            raise

    @classmethod
    def open(cls, path: str | Path, fingerprint: str | None = None, create: bool = True,
             map_size: int = DEFAULT_MAP_SIZE, readonly: bool = False) -> "ConceptStore":
        return cls(Env(Path(path), map_size=map_size, create=create, readonly=readonly),
                   fingerprint)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> "ConceptStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._env.path

    @property
    def map_size(self) -> int:
        return self._env.map_size

    def copy(self, dest: str | Path) -> None:
        """A compacted copy of the whole store (fixtures, backups)."""
        self._env.copy(Path(dest))

    # -- schema --------------------------------------------------------------------------------

    def _check_schema(self) -> None:
        framed = self._env.read(lambda txn: frame_version(b"schema", txn.get(b"schema", db=self._db["meta"]) or b""))
        if framed is not None and framed > SCHEMA_VERSION:   # before anything reads it as damage
            raise ProtocolMismatch(
                f"The concept store at {self.path} was written by a newer cones (schema "
                f"{framed}); this cones reads up to schema {SCHEMA_VERSION}.",
                "Upgrade cones, or point CONES_HOME elsewhere. Do not salvage it: this cones "
                "would read every record as damaged.")
        try:
            stored = self._meta_value(b"schema")
            if stored is not None and not _schema_record(stored):
                raise Corrupt(f"The concept store at {self.path} has a damaged schema record.", META_HINT)
        except Corrupt:
            if self._env.readonly:   # check and salvage read it as this version's store;
                return               # damaged_records says it is damaged
            raise
        if stored is None:
            if self._env.readonly:
                return
            self._env.write(lambda txn: self._put_meta(txn, b"schema", {"version": SCHEMA_VERSION}))
            return
        version = stored["version"]
        if version > SCHEMA_VERSION:
            raise ProtocolMismatch(
                f"The concept store at {self.path} has schema {version}; this cones reads up "
                f"to schema {SCHEMA_VERSION}.", "Upgrade cones, or point CONES_HOME elsewhere.")
        if version < SCHEMA_VERSION:
            if self._env.readonly:
                raise Unavailable(f"The concept store at {self.path} has schema {version} and "
                                  "needs an upgrade before it can be read read-only.",
                                  "Open it once read-write (start the service).")
            self._env.write(lambda txn: self._migrate(txn, version))

    def _migrate(self, txn, version: int) -> None:
        for v in range(version, SCHEMA_VERSION):
            if v not in MIGRATIONS:
                raise Internal(f"No upgrade from store schema {v} to {v + 1}.")
            MIGRATIONS[v](txn, self._db)
        self._put_meta(txn, b"schema", {"version": SCHEMA_VERSION})

    def _meta_value(self, key: bytes):
        return self._env.read(lambda txn: self._read_meta(txn, key))

    def damaged_records(self) -> dict[str, str]:
        """The store's own records (schema, base model, lost concepts ...) that do not read: by
        name, why. One of them damaged refused every concept, and `store check` said nothing."""
        out = {}
        for key in META_KEYS:
            try:
                value = self._meta_value(key)
                if key == b"schema" and value is not None and not _schema_record(value):
                    raise Corrupt(f"The concept store at {self.path} has a damaged schema record.")
            except Corrupt as exc:
                out[key.decode()] = exc.message
        return out

    def _read_meta(self, txn, key: bytes):
        raw = txn.get(key, db=self._db["meta"])
        if raw is None:
            return None
        try:
            return ser.load_json(unframe(key, raw)[1])
        except CodecError:
            raise Corrupt(f"The concept store at {self.path} has a damaged '{key.decode()}' "
                          "record.", META_HINT) from None

    def _put_meta(self, txn, key: bytes, value) -> None:
        txn.put(key, frame(key, ser.dump_json(value)), db=self._db["meta"])

    # -- concepts: write -----------------------------------------------------------------------

    def put(self, record: ConceptRecord, replace: bool = False) -> Overlap:
        """Store a concept with all its parts in one transaction. Conflict if the name is taken
        (unless `replace`). The store computes the concept's overlap itself, against every
        stored concept's mask and delta positions, stores it in place of `record.overlap` and
        returns it; concepts that already list this name get the new pairwise count."""
        name = validate_name(record.meta.name)
        meta = dataclasses.replace(self._stamped_meta(record.meta), parts=part_counts(record))
        record = dataclasses.replace(record, meta=meta)
        try:
            items = _encode_parts(record)
        except ValueError as exc:
            raise Internal(f"Concept record '{name}' is inconsistent: {exc}.") from None
        own = record_indices(record)
        # Counted from a read before the write: decoding every stored concept's positions took
        # seconds at SD 1.5 size inside the write, and every other write (a generate's job
        # record) waited behind it (a review measured 2.3 s with 15 concepts). Concepts are
        # written by the one worker, one job at a time, so none changes between the two.
        shared = self.intersect(own, exclude=name)

        def txn_fn(txn) -> Overlap:
            key = name.encode()
            if txn.get(key, db=self._db["concepts"]) is not None and not replace:
                raise Conflict(f"A concept named '{name}' already exists.")
            # Parts of this name with no concept key (its key damaged, then removed) would be
            # read back as this concept's: none but its own stay.
            self._delete_parts(txn, name)
            stored_fp = self._read_meta(txn, b"fingerprint")
            if meta.fingerprint and stored_fp is None:
                self._put_meta(txn, b"fingerprint", meta.fingerprint)
            elif meta.fingerprint and stored_fp != meta.fingerprint:
                raise self._mismatch(stored_fp, meta.fingerprint, f"Concept '{name}'")
            self._put_items(txn, items)
            self._drop_lost(txn, name)   # learned again: its photos are this concept's now
            overlap = Overlap(shared_with=shared, total=sum(int(v.size) for v in own.values()))
            self._put_overlap(txn, name, overlap)
            self._sync_others(txn, name, overlap.shared_with)
            return overlap

        return self._env.write(txn_fn)

    # -- concepts a salvage left behind ---------------------------------------------------------

    def lost(self) -> dict[str, list[str]]:
        """Concepts a salvage could not copy, by name: the photos each was learned from, which
        `cones prune-photos` keeps until the concept is learned again or removed (`drop_lost`)."""
        return dict(self._meta_value(b"lost") or {})

    def set_lost(self, lost: dict[str, list[str]]) -> None:
        self._env.write(lambda txn: self._put_meta(txn, b"lost", {n: list(d) for n, d in lost.items()}))

    def drop_lost(self, name: str) -> bool:
        """Forget a lost concept (its photos may be pruned then). False if none of that name."""
        return self._env.write(lambda txn: self._drop_lost(txn, name))

    def _drop_lost(self, txn, name: str) -> bool:
        lost = self._read_meta(txn, b"lost") or {}
        if name not in lost:
            return False
        del lost[name]
        self._put_meta(txn, b"lost", lost)
        return True

    def _put_items(self, txn, items: Iterable[Item]) -> None:
        for db, key, value in items:
            txn.put(key, value, db=self._db[db])

    def delete(self, name: str) -> None:
        validate_name(name)

        def txn_fn(txn):
            if not txn.delete(name.encode(), db=self._db["concepts"]):
                raise NotFound(f"No concept named '{name}'.")
            self._delete_parts(txn, name)
            self._sync_others(txn, name, {})

        self._env.write(txn_fn)

    def _delete_parts(self, txn, name: str) -> None:
        key = name.encode()
        for db in _PART_DBS:
            for part_key in [k for k, _ in _scan(txn, self._db[db], key)]:
                txn.delete(part_key, db=self._db[db])
        for db in _WHOLE_DBS:
            txn.delete(key, db=self._db[db])

    def update_metrics(self, name: str, metrics: dict) -> ConceptMeta:
        """Merge evaluation metrics into a concept's metadata (a value None drops its key)."""
        validate_name(name)

        def txn_fn(txn):
            meta = self._read_concept_meta(txn, name)
            meta.metrics.update(metrics)
            for key in [k for k, v in metrics.items() if v is None]:
                del meta.metrics[key]
            key = name.encode()
            txn.put(key, frame(key, ser.encode_meta(meta)), db=self._db["concepts"])
            return meta

        return self._env.write(txn_fn)

    # -- concepts: read ------------------------------------------------------------------------

    def get(self, name: str) -> ConceptRecord:
        validate_name(name)
        record = self._env.read(lambda txn: self._read_record(txn, name))
        meta = self._current(record.meta)
        if self._bound and meta.fingerprint and meta.fingerprint != self._bound:
            raise self._mismatch(meta.fingerprint, self._bound, f"Concept '{name}'")
        return record if meta is record.meta else dataclasses.replace(record, meta=meta)

    def meta(self, name: str) -> ConceptMeta:
        """One concept's metadata, without its masks or values: NotFound, or Corrupt when it
        cannot be read."""
        validate_name(name)
        return self._current(self._env.read(lambda txn: self._read_concept_meta(txn, name)))

    def __contains__(self, name: str) -> bool:
        validate_name(name)
        return self._env.read(
            lambda txn: txn.get(name.encode(), db=self._db["concepts"]) is not None)

    UNNAMED = "Its name in the concept store is damaged (the bytes shown are no concept name)."

    def names(self) -> list[str]:
        """Every stored concept name, damaged or not; keys whose bytes are no name are left out
        (`unnamed`)."""
        return [name for name, ok in self._keys() if ok]

    def unnamed(self) -> list[str]:
        """Keys of the concepts database whose bytes are no concept name (damaged in the file),
        as text with the bad bytes escaped: nothing can address them but `cones store salvage`,
        which copies every other concept."""
        return [name for name, ok in self._keys() if not ok]

    def _keys(self) -> list[tuple[str, bool]]:
        def name_of(key: bytes) -> tuple[str, bool]:
            try:
                return validate_name(key.decode()), True
            except (UnicodeDecodeError, BadInput):
                return key.decode(errors="backslashreplace"), False
        return self._env.read(lambda txn: [name_of(bytes(k)) for k, _ in
                                           txn.cursor(db=self._db["concepts"])])

    def list(self) -> list[ConceptMeta]:
        """Metadata of every concept whose metadata is readable (see `damaged()` for the rest)."""
        def txn_fn(txn):
            out = []
            for key, raw in txn.cursor(db=self._db["concepts"]):
                try:
                    out.append(self._current(ser.decode_meta(unframe(key, raw)[1])))
                except CodecError:
                    log.warning("concept %r has damaged metadata", key.decode(errors="replace"))
            return out
        return self._env.read(txn_fn)

    def damaged(self) -> dict[str, str]:
        """Concepts with any damaged value or page -> what is damaged (checks every checksum;
        one read transaction per concept, since a page error ends the transaction it hit)."""
        bad: dict[str, str] = {}
        for name in self.names():
            try:
                self._env.read(lambda txn: self._read_record(txn, name))
            except Corrupt as exc:
                bad[name] = exc.message
        return bad

    def overlap(self, name: str) -> Overlap:
        """This concept's overlap alone: no masks or deltas are read (`cones list` is cheap)."""
        validate_name(name)
        key = name.encode()

        def txn_fn(txn):
            raw = txn.get(key, db=self._db["overlap"])
            if raw is None:
                self._read_concept_meta(txn, name)   # NotFound for an unknown name
                return Overlap()
            try:
                return self._decode(key, raw, ser.decode_overlap)
            except _DamagedPart as exc:
                raise _damaged(name, exc.where, exc.reason) from None
        return self._env.read(_pinned(name, "overlap", txn_fn))

    def size_of(self, name: str) -> int:
        """Bytes this concept takes in the store (keys + values, all databases)."""
        validate_name(name)
        key = name.encode()

        def txn_fn(txn):
            raw = txn.get(key, db=self._db["concepts"])
            if raw is None:
                raise NotFound(f"No concept named '{name}'.")
            total = len(key) + len(raw)
            for db in _PART_DBS:
                total += sum(len(k) + len(v) for k, v in _scan(txn, self._db[db], key))
            for db in _WHOLE_DBS:
                value = txn.get(key, db=self._db[db])
                total += len(key) + len(value) if value is not None else 0
            return total
        # measured on views of the map: `cones list` copied every byte of every concept
        return self._env.read(_pinned(name, "size", txn_fn), buffers=True)

    def _read_record(self, txn, name: str) -> ConceptRecord:
        return self._read_parts(txn, name)[0]

    def _read_parts(self, txn, name: str, meta_raw: bytes | None = None) -> tuple[ConceptRecord, list[Item]]:
        """The record, every value checked, and the framed values it came from (salvage copies
        those bytes as they are). `meta_raw`: its metadata found under another key (`misfiled`)."""
        key = name.encode()
        if meta_raw is None:
            meta = self._read_concept_meta(txn, name)
            meta_raw = bytes(txn.get(key, db=self._db["concepts"]))
        else:
            meta = ser.decode_meta(unframe(key, meta_raw)[1])
        record = ConceptRecord(meta=meta)
        items: list[Item] = [("concepts", key, meta_raw)]
        parts = (("masks", ser.decode_mask, record.masks), ("deltas", ser.decode_delta, record.deltas),
                 ("embeddings", decode_tensor, record.embeddings))
        where = "concept"
        try:
            for db, decoder, into in parts:
                where = db
                for part_key, raw in _scan(txn, self._db[db], key):
                    into[_part(part_key)] = self._decode(part_key, raw, decoder)
                    items.append((db, bytes(part_key), bytes(raw)))
            for db, decoder in (("residuals", decode_tensor), ("overlap", ser.decode_overlap)):
                where = db
                raw = txn.get(key, db=self._db[db])
                if raw is not None:
                    value = self._decode(key, raw, decoder)
                    if db == "residuals":
                        record.residual = value
                    else:
                        record.overlap = value
                    items.append((db, key, bytes(raw)))
            read = part_counts(record)
            for db, want in meta.parts.items():   # a part's checksum covers its key: one under a
                if read.get(db, 0) != want:       # damaged key is never read as this concept's
                    raise _DamagedPart(db, f"{read.get(db, 0)} of its {want} parts read; a key is damaged")
        except _DamagedPart as exc:
            raise _damaged(name, exc.where, exc.reason) from None
        except PAGE_ERRORS as exc:
            raise _damaged(name, where, lmdb_reason(exc), page=True) from None
        return record, items

    def _read_concept_meta(self, txn, name: str) -> ConceptMeta:
        key = name.encode()
        raw = txn.get(key, db=self._db["concepts"])
        if raw is None:
            raise NotFound(f"No concept named '{name}'.")
        try:
            return ser.decode_meta(unframe(key, raw)[1])
        except CodecError as exc:
            own = _meta_name(raw)
            if own is not None and own != name:   # `cones rm` would delete another concept's record
                raise Corrupt(f"Concept '{name}' is concept '{own}' under a damaged key ({exc}).",
                              SALVAGE_HINT) from None
            raise _damaged(name, "metadata", str(exc)) from None

    @staticmethod
    def _decode(key: bytes, raw: bytes, decoder):
        try:
            return decoder(unframe(key, raw)[1])
        except CodecError as exc:
            raise _DamagedPart(key.replace(SEP, b"/").decode(errors="replace"), str(exc)) from None

    # -- salvage (cones_store/salvage.py) ------------------------------------------------------------

    def scan_keys(self, db: str) -> tuple[list[bytes], str | None]:
        """Every key of one database, in order, as far as it can be walked, and why the walk
        stopped early (None: it reached the end). Values are not read."""
        keys: list[bytes] = []

        def txn_fn(txn):
            try:
                for k in txn.cursor(db=self._db[db]).iternext(keys=True, values=False):
                    keys.append(bytes(k))
            except PAGE_ERRORS as exc:
                return lmdb_reason(exc)
            return None
        return keys, self._env.read(txn_fn)

    def raw_concept(self, name: str, meta_raw: bytes | None = None) -> list[Item]:
        """Every framed value of one concept, each checked (Corrupt if any is damaged);
        `meta_raw`: its metadata, found under a damaged key (`misfiled`)."""
        validate_name(name)
        return self._env.read(lambda txn: self._read_parts(txn, name, meta_raw)[1])

    def misfiled(self) -> dict[str, tuple[str, bytes]]:
        """Concepts whose key in the concepts database was damaged (a flipped byte: "rex" read
        as "rax" or as no name at all): by the name their metadata gives, which its checksum
        confirms (it covers the key it was written under), the damaged key as text and the
        metadata's bytes. Only names no concept holds now."""
        def txn_fn(txn):
            found = {}
            try:
                for key, raw in txn.cursor(db=self._db["concepts"]):
                    key, raw = bytes(key), bytes(raw)
                    try:
                        unframe(key, raw)
                        continue   # whole where it is
                    except CodecError:
                        pass
                    name = _meta_name(raw)
                    if name is not None and txn.get(name.encode(), db=self._db["concepts"]) is None:
                        found[name] = (key.decode(errors="backslashreplace"), raw)
            except PAGE_ERRORS:   # a damaged page ends the walk: what was found before it
                pass
            return found
        return self._env.read(txn_fn)

    def misfiled_photos(self) -> set[str]:
        """The photos the concepts under damaged keys (`misfiled`) were learned from: theirs
        still, for a salvage to copy them back whole."""
        return {d for _, raw in self.misfiled().values()
                for d in ser.decode_meta(unchecked_payload(raw)).photo_digests}

    def put_raw(self, items: list[Item]) -> None:
        """Write framed values as they are, in one transaction (a concept `raw_concept` read from
        another store: its bytes, checksums and creation time stay the same)."""
        for _, key, value in items:
            unframe(key, value)   # never copy damage into a fresh store
        self._env.write(lambda txn: self._put_items(txn, items))


# -- helpers ------------------------------------------------------------------------------------


class _DamagedPart(Exception):
    def __init__(self, where: str, reason: str):
        super().__init__(where)
        self.where, self.reason = where, reason


# The store's own records, beside the concepts and jobs.
META_KEYS = (b"schema", b"fingerprint", b"aliases", b"base_model", b"lost")
META_HINT = ("Stop the service and run `cones store salvage`: it copies every concept and job into "
             "a fresh store and keeps this one aside.")


def _schema_record(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("version"), int)


def _meta_name(raw: bytes) -> str | None:
    """The name a concept's metadata value was written under, where its checksum confirms it
    (it covers the key): a value under a damaged key still says whose it is. None if not."""
    try:
        name = validate_name(ser.decode_meta(unchecked_payload(raw)).name)
        unframe(name.encode(), raw)
        return name
    except (CodecError, BadInput):
        return None


def _damaged(name: str, where: str, reason: str, page: bool = False) -> Corrupt:
    if page:   # the B-tree around the value: removing the concept would need that page too
        return Corrupt(f"Concept '{name}' is damaged ({where}: {reason}; the store's structure "
                       "is damaged there).", SALVAGE_HINT)
    return Corrupt(f"Concept '{name}' is damaged ({where}: {reason}).",
                   f"Remove it with `cones rm {name}` and learn it again; other concepts are "
                   "unaffected.")


def _pinned(name: str, where: str, fn):
    """`fn` with a page error it hits reported as this concept's damage."""
    def wrapped(txn):
        try:
            return fn(txn)
        except PAGE_ERRORS as exc:
            raise _damaged(name, where, lmdb_reason(exc), page=True) from None
    return wrapped


def _part(key: bytes) -> str:
    return key.split(SEP, 1)[1].decode()


def _scan(txn, db, name_key: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every `name \\0 part` entry of one concept in a part database."""
    prefix = name_key + SEP
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if bytes(key[:len(prefix)]) != prefix:   # (a view, in a transaction with buffers)
            return
        yield key, value


def values_finite(record: ConceptRecord) -> bool:
    """Whether every learned value is a number: one NaN made every image of a concept black
    (an edited file; a learn whose training diverged, at a learning rate of 1e9)."""
    arrays = [d.values for d in record.deltas.values()] + list(record.embeddings.values())
    arrays += [record.residual] if record.residual is not None else []
    return all(np.isfinite(arr).all() for arr in arrays
               if np.issubdtype(np.asarray(arr).dtype, np.floating))


def check_record(record: ConceptRecord) -> None:
    """ValueError saying why, if the record's parts cannot be stored as they are (what `put`
    refuses as inconsistent: positions unsorted, repeated or outside their tensor, ...)."""
    _encode_parts(record)


def part_counts(record: ConceptRecord) -> dict[str, int]:
    """How many values of each kind a concept has in the store (ConceptMeta.parts)."""
    return {"masks": len(record.masks), "deltas": len(record.deltas),
            "embeddings": len(record.embeddings), "residuals": int(record.residual is not None)}


def _encode_parts(record: ConceptRecord) -> list[Item]:
    """Every value of a concept except its overlap (`put` counts it against the stored ones)."""
    name = record.meta.name.encode()
    items: list[Item] = [("concepts", name, ser.encode_meta(record.meta))]
    for tensor, idx in record.masks.items():
        items.append(("masks", name + SEP + tensor.encode(), ser.encode_mask(idx)))
    for tensor, delta in record.deltas.items():
        items.append(("deltas", name + SEP + tensor.encode(), ser.encode_delta(delta)))
    for token, vector in record.embeddings.items():
        items.append(("embeddings", name + SEP + token.encode(), encode_tensor(vector)))
    if record.residual is not None:
        items.append(("residuals", name, encode_tensor(record.residual)))
    for _, key, _ in items:
        if len(key) > 500:
            raise ValueError(f"part name too long ({key[:60]!r}...)")
    return [(db, key, frame(key, payload)) for db, key, payload in items]
