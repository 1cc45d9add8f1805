"""`cones store check` and `cones store salvage`: what is damaged in a store, and a fresh store
with everything that is not.

LMDB's own answer to a damaged file is a copy with compaction (`mdb_env_copy2`), but that walks
every B-tree and stops at the first bad page. So salvage copies record by record instead: each
concept's values are read and checked (checksums, page errors) in a read transaction of their
own, and the ones that read whole are written, byte for byte, into a new environment; jobs the
same way. The damaged store is kept aside, never deleted. Both work on the files directly,
without the service (a store that stops the service from starting must still be repairable).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from cns_daemon.api.errors import BadInput, ConesError, Corrupt

from .env import DB_NAMES, other_meta_page
from .jobs import newest_learns
from .records import JobRecord
from .store import SEP, ConceptStore

COMPLETE = "SALVAGED"   # written into the copy once it holds everything salvage could read


@dataclass
class CheckReport:
    path: str
    databases: dict[str, str] = field(default_factory=dict)   # database -> why its walk stopped
    concepts: list[str] = field(default_factory=list)         # readable concepts
    damaged: dict[str, str] = field(default_factory=dict)     # concept -> what is damaged
    jobs: int = 0                                             # readable jobs
    damaged_jobs: dict[str, str] = field(default_factory=dict)
    # The store is too damaged to open at all (why). A store that cannot be opened for another
    # reason (none there, no permission, a newer schema) is that reason's error, not damage.
    open_error: str = ""
    refiled: dict[str, str] = field(default_factory=dict)    # concept -> the damaged key it is under
    damaged_records: dict[str, str] = field(default_factory=dict)   # the store's own (schema, ...)

    @property
    def ok(self) -> bool:
        return not (self.databases or self.damaged or self.damaged_jobs or self.open_error or self.refiled
                    or self.damaged_records)


@dataclass
class LostConcept:
    """What is known of a concept salvage could not copy, to learn it again as it was: its
    class, the photos it was learned from and what it was learned with (from its metadata when
    that still reads, else from the newest learn job that made it; empty when neither does)."""
    class_word: str = ""
    photo_digests: list[str] = field(default_factory=list)
    method: str = ""
    steps: int | None = None
    seed: int | None = None
    options: dict = field(default_factory=dict)
    photo_captions: list = field(default_factory=list)   # one per digest where known


@dataclass
class SalvageReport:
    check: CheckReport
    copied: list[str]
    jobs_copied: int
    kept_at: str      # where the damaged store now is
    lost: dict[str, LostConcept] = field(default_factory=dict)
    other_meta_page: bool = False   # read as LMDB's other meta page describes it (one garbled)


def _names(store: ConceptStore, report: CheckReport) -> list[str]:
    """Concept names from the concepts database and, where a walk stopped early, from the
    key prefixes of every other database too (a name whose metadata is unreachable is still
    reported, as damaged)."""
    names: dict[str, None] = {}
    for db in DB_NAMES:
        if db in ("meta", "jobs"):
            continue
        keys, stopped = store.scan_keys(db)
        if stopped:
            report.databases[db] = stopped
        for key in keys:
            names.setdefault(key.split(SEP, 1)[0].decode(errors="backslashreplace"), None)
    return list(names)


def check(path: Path) -> CheckReport:
    """Read every record of the store at `path` (read-only) and say what is damaged."""
    report = CheckReport(path=str(path))
    try:
        store = ConceptStore.open(path, create=False, readonly=True)
    except Corrupt as exc:
        report.open_error = exc.message
        return report
    with store:
        report.damaged_records = store.damaged_records()
        misfiled = store.misfiled()   # keys with a flipped byte, known by what they hold
        under = {key for key, _ in misfiled.values()}
        for name in dict.fromkeys([*_names(store, report), *misfiled]):
            if name in under:
                continue   # read under the name its metadata was written under
            try:
                store.raw_concept(name, misfiled[name][1] if name in misfiled else None)
                report.concepts.append(name)
                if name in misfiled:
                    report.refiled[name] = misfiled[name][0]
            except BadInput:   # no name at all: its key's bytes changed
                report.damaged[name] = ConceptStore.UNNAMED
            except ConesError as exc:
                report.damaged[name] = exc.message
        keys, stopped = store.scan_keys("jobs")
        if stopped:
            report.databases["jobs"] = stopped
        for key in keys:
            try:
                store.get_job(key.decode(errors="replace"))
                report.jobs += 1
            except ConesError as exc:
                report.damaged_jobs[key.decode(errors="replace")] = exc.message
    return report


def salvage(path: Path) -> SalvageReport:
    """Copy every readable concept and job of the store at `path` into a fresh store, move the
    damaged one to `<path>.damaged-<time>` and put the fresh one in its place."""
    path = Path(path)
    report = check(path)
    stand_in = None
    if report.open_error:   # one meta page garbled: the store the other describes may read
        stand_in = other_meta_page(path)
        again = check(stand_in) if stand_in is not None else report
        if again.open_error:
            if stand_in is not None:
                shutil.rmtree(stand_in, ignore_errors=True)
            raise Corrupt(f"The concept store at {path} cannot be opened to salvage it: {report.open_error}",
                          "Restore the store folder from a backup, or move it aside to start a new store.")
        report = dataclasses.replace(again, path=str(path))
    try:
        done = _copy(path, stand_in or path, report)
    finally:
        if stand_in is not None:
            shutil.rmtree(stand_in, ignore_errors=True)
    done.other_meta_page = stand_in is not None
    return done


def _copy(path: Path, source: Path, report: CheckReport) -> SalvageReport:
    """Salvage's copy from `source` (the store, or a copy read through its other meta page), and the
    fresh store put at `path`."""
    fresh = _unused(path.with_name(f"{path.name}.salvage-{time.strftime('%Y%m%d-%H%M%S')}"))
    copied: list[str] = []
    jobs = 0
    with ConceptStore.open(source, create=False, readonly=True) as old, ConceptStore.open(fresh) as new:
        fingerprint = _readable(lambda: old.fingerprint) or _concepts_model(old, report.concepts)
        if fingerprint:   # a damaged record of the store's own is left behind, or made anew
            base_model = _readable(lambda: old._meta_value(b"base_model"))   # for a refusal's words
            new.bind(fingerprint, base_model if isinstance(base_model, dict) else None,
                     aliases=_readable(lambda: old.aliases) or [])
        misfiled = old.misfiled() if report.refiled else {}
        for name in report.concepts:   # a misfiled one under the name it was written under
            new.put_raw(old.raw_concept(name, misfiled[name][1] if name in misfiled else None))
            copied.append(name)
        new.forget(report.damaged)
        keys, _ = old.scan_keys("jobs")
        finished = []
        for key in keys:
            job_id = key.decode(errors="replace")
            if job_id not in report.damaged_jobs:
                job = old.get_job(job_id)
                new.put_job(job)
                jobs += 1
                finished.append(job)
        learns = newest_learns(finished)
        lost = {name: _what_is_known(old, name, learns.get(name)) for name in report.damaged}
        # their photos stay in the archive until they are learned again (`cones prune-photos`
        # would delete them: no concept of the fresh store names them)
        new.set_lost({**_old_lost(old), **{n: k.photo_digests for n, k in lost.items() if k.photo_digests}})
    # Whole from here: a crash between the two renames leaves no store at `path`, and
    # `finish_interrupted` puts this one there (the next start would have made an empty one).
    (fresh / COMPLETE).write_text(f"salvaged from {path}\n")
    # two salvages in one second: the second's rename failed on the first's folder, and left
    # its whole copy beside the store without a word
    kept = _unused(path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"))
    try:
        path.rename(kept)
    except OSError:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    fresh.rename(path)
    (path / COMPLETE).unlink(missing_ok=True)
    return SalvageReport(report, copied, jobs, str(kept), lost)


def _old_lost(store: ConceptStore) -> dict[str, list[str]]:
    """What an earlier salvage of this store left behind, where that still reads."""
    return _readable(store.lost) or {}


def _readable(read):
    """`read()`, or None where the record it reads is damaged."""
    try:
        return read()
    except ConesError:
        return None


def _concepts_model(store: ConceptStore, names: list[str]) -> str | None:
    """The base model a store's concepts were learned on, from their own metadata: what its
    damaged fingerprint record said (every concept's matched it when it was stored)."""
    for name in names:
        fingerprint = _readable(lambda: store.meta(name).fingerprint)
        if fingerprint:
            return fingerprint
    return None


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : the first that is not there."""
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def finish_interrupted(path: Path) -> Path | None:
    """No store at `path`, but a whole salvaged copy beside it (a salvage stopped between moving
    the damaged store aside and putting the copy in its place): put the newest there. Returns
    the copy it moved, or None."""
    path = Path(path)
    if path.exists():
        return None
    whole = sorted(p for p in path.parent.glob(f"{path.name}.salvage-*") if (p / COMPLETE).is_file())
    if not whole:
        return None
    whole[-1].rename(path)
    (path / COMPLETE).unlink(missing_ok=True)
    return whole[-1]


def _what_is_known(old: ConceptStore, name: str, learn: JobRecord | None) -> LostConcept:
    """A damaged concept's class and photos: its metadata is a record of its own, often whole
    when its values are not; otherwise the newest finished learn of that name says them."""
    try:
        meta = old.meta(name)
        if meta.photo_digests:
            hp = meta.hparams
            return LostConcept(meta.class_word, list(meta.photo_digests), meta.method,
                               hp.get("steps"), hp.get("seed"), dict(hp.get("options_given", {})),
                               list(meta.photo_captions))
    except ConesError:
        pass
    req = learn.request if learn is not None else {}
    if req.get("photo_digests"):
        return LostConcept(str(req.get("class_word", "")), [str(d) for d in req["photo_digests"]],
                           str(req.get("method", "")), req.get("steps"), req.get("seed"),
                           dict(req.get("options", {})), list(req.get("photo_captions", [])))
    return LostConcept()
