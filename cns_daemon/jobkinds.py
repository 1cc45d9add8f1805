"""Every kind of job in one table: the request its record holds, how urgent it is, whether it
pauses for or runs inside another job, how it runs and how `cones jobs` names it. The worker
reads the scheduling columns, the service runs and names jobs through it; a new kind is one row.

A handler gets the service (its engine and paths), the parsed request, the job record (its id),
the progress callback and the cancel token.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, get_args

from pydantic import BaseModel, ValidationError

from cns_daemon.api.errors import ConesError, Internal, NotFound
from cns_daemon.engine import SAVED_BEFORE_STOP
from cns_daemon.api.protocol import (EvalRequest, GenerateRequest, ImportJob, JobKind, JobResult,
                                     LearnJob, RemoveJob)
from cns_daemon.methods.base import CancelToken, ProgressFn
from cones_store.records import JobRecord

Handler = Callable[[Any, Any, JobRecord, ProgressFn, CancelToken], JobResult]


@dataclass(frozen=True)
class Kind:
    request: type[BaseModel]
    priority: int                 # higher runs first; then the oldest
    run: Handler
    summary: Callable[[Any], str]
    pausable: bool = False        # its training loop pauses between steps for interleaved jobs
    interleaved: bool = False     # runs inside a paused job (short, and it changes no state)


# -- handlers ---------------------------------------------------------------------------------

def _learn(service, req: LearnJob, job, progress, cancel) -> JobResult:
    # A retry after a crash whose first run had stored the concept: done, not "already exists"
    saved = service.engine.saved_by_first_run(req) if job.attempts > 1 else None
    return saved or service.engine.learn(req, progress, cancel, service.pinned_tokens(but=job.id))


def _generate(service, req: GenerateRequest, job, progress, cancel) -> JobResult:
    out = service.paths.outputs / f"{time.strftime('%Y%m%d-%H%M%S')}-{job.id}"
    return service.engine.generate(req, out, progress, cancel)


def _eval(service, req: EvalRequest, job, progress, cancel) -> JobResult:
    return service.engine.evaluate(req, progress, cancel)


def _remove(service, req: RemoveJob, job, progress, cancel) -> JobResult:
    if job.attempts > 1 and req.name not in service.store:
        result = JobResult(concept=req.name)   # a retry after a crash: the first run removed it
        service.store.drop_lost(req.name)      # (or, of one a salvage left behind, not yet)
    else:
        result = service.engine.remove(req.name)
    if req.photos:
        deleted, kept = service.forget_photos(req.photo_digests)
        result.metrics = {"photos_deleted": deleted, "photos_kept": kept}
    else:   # kept in the archive: said where, to learn it again
        result.photos = [str(service.archive.path(d)) for d in req.photo_digests if service.archive.has(d)]
    return result


def _import(service, req: ImportJob, job, progress, cancel) -> JobResult:
    from cns_daemon.transfer import decode

    staged = Path(req.staged)
    if not staged.is_file():
        saved = _import_saved(service, req) if job.attempts > 1 else None
        if saved is not None:   # a retry after a crash: the first run stored it, then removed the upload
            return saved
        raise NotFound(f"The uploaded file {staged} is gone.", "Run `cones import` again.")
    try:
        record = decode(staged.read_bytes())
        if req.name and req.name != record.name:   # `cones import --name`
            record = dataclasses.replace(record, meta=dataclasses.replace(record.meta, name=req.name))
        saved = service.engine.saved_by_first_run(record.meta) if job.attempts > 1 else None
        return saved or service.engine.import_record(record, service.pinned_tokens())
    finally:
        staged.unlink(missing_ok=True)   # imported or refused: the upload is not kept


# -- summaries --------------------------------------------------------------------------------

def _learn_summary(r: LearnJob) -> str:
    steps = f"{r.steps} steps, " if r.steps else ""
    if r.method == "cones" and r.options.get("values", "tuned") == "tuned":
        # --steps is its selection walk's; its values train tune_steps more ("20 steps" read as
        # a short learn, then 900 of training followed)
        from cns_daemon.methods.cones import ConesParams

        tune = r.options.get("tune_steps", ConesParams.tune_steps)
        steps = f"{r.steps or ConesParams.steps}+{tune} steps, "
    inbox = ", inbox" if r.source == "inbox" else ""
    n = len(r.photo_digests)
    return f"learn <{r.name}> ({r.class_word}, {r.method}, {steps}{n} photo{'s' * (n != 1)}{inbox})"


def _eval_summary(r: EvalRequest) -> str:
    names = " ".join(f"<{n}>" for n in r.names)
    return f"eval {names} ({r.n}x, {len(r.prompts) if r.prompts else 'default'} prompts)"


KINDS: dict[str, Kind] = {
    "learn": Kind(LearnJob, 0, _learn, _learn_summary, pausable=True),
    "generate": Kind(GenerateRequest, 10, _generate, lambda r: f"generate {r.n}x {r.prompt!r}",
                     interleaved=True),
    "eval": Kind(EvalRequest, 8, _eval, _eval_summary),
    "remove": Kind(RemoveJob, 5, _remove, lambda r: f"remove <{r.name}>{' and its photos' if r.photos else ''}"),
    "import": Kind(ImportJob, 5, _import, lambda r: f"import <{r.name}>" if r.name else "import concept"),
}
assert set(KINDS) == set(get_args(JobKind)), "every protocol JobKind has one row"
INTERLEAVED = tuple(k for k, v in KINDS.items() if v.interleaved)


def pausable(kind: str) -> bool:
    row = KINDS.get(kind)   # a record of a kind this version does not know never pauses
    return row is not None and row.pausable


def kind_of(job: JobRecord) -> Kind:
    kind = KINDS.get(job.kind)
    if kind is None:
        raise Internal(f"Unknown job kind {job.kind!r}.")
    return kind


def run(service, job: JobRecord, progress: ProgressFn, cancel: CancelToken) -> JobResult:
    kind = kind_of(job)
    return kind.run(service, kind.request(**job.request), job, progress, cancel)


def saved_before_stop(service, job: JobRecord) -> JobResult | None:
    """Of a learn or import the service stopped under for good (cancelled, or crashed on its
    last attempt): its result where its run had stored the concept before the stop, so start-up
    records it done, not failed beside a stored concept (a review's find: an inbox folder then got
    a note saying it failed, and touched, "already exists"). None for other kinds and cases."""
    try:
        if job.kind == "learn":
            return service.engine.saved_by_first_run(LearnJob(**job.request))
        if job.kind == "import":
            return _import_saved(service, ImportJob(**job.request))
    except (ValidationError, ConesError):   # a record it cannot read is settled as before
        return None
    return None


def _import_saved(service, req: ImportJob) -> JobResult | None:
    """An import whose run stored its concept and removed the upload before the service stopped."""
    if req.name and req.name in service.store and not Path(req.staged).is_file():
        return JobResult(concept=req.name, metrics={"note": SAVED_BEFORE_STOP})
    return None


def summarize(job: JobRecord) -> str:
    """One line saying what a job is, for `cones jobs` (the kind alone for a record this
    version cannot read)."""
    kind = KINDS.get(job.kind)
    if kind is None:
        return job.kind
    try:
        return kind.summary(kind.request.model_validate(job.request))
    except ValidationError:
        return job.kind
