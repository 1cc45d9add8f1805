"""The service facade: what a request (socket or inbox) can ask for, in one place.

It checks requests, archives photos, puts jobs in the queue, runs them on the worker thread
through the engine, and answers read-only questions. The HTTP layer (server.py) and the inbox
watcher (inbox.py) are thin callers of this class, so both paths behave the same.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
import uuid
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Callable

from cns_daemon import jobkinds
from cns_daemon.archive import Archive, CheckedPhoto, atomic_write, check_photos, is_digest
from cns_daemon.outputs import PARTIAL_PREFIX
from cns_daemon.api.errors import BadInput, BadPhoto, ConesError, Conflict, NotFound
from cns_daemon.api.names import validate_new_name
from cns_daemon.methods.base import CancelToken, ProgressEvent
from cns_daemon.api.protocol import (FINAL_STATES, MAX_PHOTOS, MAX_PROMPT_CHARS, MAX_SEED, MIN_PHOTOS,
                                     PROTOCOL_VERSION, TOO_MANY_HINT, AddRequest, ConceptInfo, EvalRequest,
                                     GenerateRequest, ImportJob, JobInfo, JobList, JobResult, LearnJob,
                                     QueueInfo, RemoveJob, SkippedFile, StatusInfo, learn_steps,
                                     too_many_photos)
from cns_daemon.api.settings import Settings
from cns_daemon.worker import Worker, get_job_or_404
from cones_store.jobs import newest_learns
from cones_store.records import JobRecord

log = logging.getLogger(__name__)

PRUNE_EVERY = 50   # finished jobs between two prunings (Service.prune_jobs)


class Service:
    def __init__(self, settings: Settings, store, engine, archive: Archive | None = None):
        self.settings = settings
        self.paths = settings.paths
        self.store = store
        self.engine = engine
        self.archive = archive or Archive(self.paths.archive)
        self.started = time.time()
        self.inbox_watched = False
        self.job_listeners: list[Callable[[JobRecord], None]] = []
        self.worker = Worker(store, self._run, on_change=self._job_changed)
        # Held from a request's checks of names and photos to its job being queued, and while a
        # removal decides which photos nothing uses any more and deletes them: none sees another
        # half done (two adds of one name both passed the check; a shared photo was deleted
        # between a new learn's archiving and its queueing).
        self._queue_lock = threading.Lock()
        self._finished = 0   # jobs finished since start-up (pruning runs every PRUNE_EVERY)

    # ------------------------------------------------------------ submissions

    def add(self, req: AddRequest) -> JobRecord:
        photos, skipped = check_photos([(p.filename, p.data, p.caption) for p in req.photos])
        skipped = list(req.skipped) + skipped
        return self.submit_learn(req.name, req.class_word, req.method, req.steps, req.seed,
                                 photos, skipped, source="cli", options=req.options)

    def submit_learn(self, name: str, class_word: str, method: str | None, steps: int | None,
                     seed: int, photos: list[CheckedPhoto], skipped: list[SkippedFile], *,
                     source: str, inbox_folder: str | None = None,
                     options: dict | None = None) -> JobRecord:
        """Everything a learn job could refuse is refused here, before it is queued: the name,
        too few distinct usable photos, the method's options and steps. The request's method and
        steps, where it leaves them out, are the settings' (config.toml, CONES_* environment)."""
        validate_new_name(name)
        method = method or self.settings.method
        if len(photos) > MAX_PHOTOS:   # what `cones add` is held to, the inbox too
            raise BadInput(too_many_photos(name, len(photos)), TOO_MANY_HINT)
        if "steps" in (options or {}):   # one way to set it, checked in one place
            raise BadInput("`steps` is not a method option.",
                           "Give it with --steps N (in an inbox folder: steps = N in concept.toml).")
        steps = learn_steps(steps if steps is not None else self.settings.steps)
        if len(photos) < MIN_PHOTOS:
            why = "; ".join(f"{s.file}: {s.reason}" for s in skipped) or "no other files"
            head = (f"No usable photo for {name!r}" if not photos else
                    f"Only {len(photos)} usable photo for {name!r}")
            raise BadPhoto(f"{head}; learning needs at least {MIN_PHOTOS} different photos ({why}).",
                           "Give 3-5 different photos of it (PNG, JPEG, WebP, BMP, GIF or TIFF, "
                           "at least 32x32 pixels).")
        with self._queue_lock:   # (the tokens learns hold, read and taken at once)
            self.engine.check_learn(method, steps, options or {}, class_word,
                                    [(p.filename, p.caption) for p in photos], self.pinned_tokens())
            self._check_name_free(name)
            digests = [self.archive.put(p) for p in photos]
            job = LearnJob(name=name, class_word=class_word, method=method,
                           steps=steps, seed=seed, options=options or {}, photo_digests=digests,
                           photo_names=[p.filename for p in photos],
                           photo_captions=[p.caption for p in photos],
                           skipped=skipped,
                           source=source, inbox_folder=inbox_folder)
            return self.worker.submit("learn", job)

    def generate(self, req: GenerateRequest) -> JobRecord:
        from cns_daemon.prompts import referenced_names

        for name in referenced_names(req.prompt):
            if name not in self.store and self._learning(name) is not None:
                self._stored(name)   # "not learned yet: job ... is learning it"
        self.engine.check_generate(req)
        if req.seed is None:   # "random", chosen now so the job (and a re-run after a crash) keeps it
            req = req.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 2 - req.n)})   # seed + n - 1 fits
        return self.worker.submit("generate", req)

    def evaluate(self, req: EvalRequest) -> JobRecord:
        from cns_daemon.evaluate import check_scorer, default_prompts, fill, strip_concepts

        for name in req.names:
            self._stored(name)   # NotFound now rather than from the queue
        for template in req.prompts or default_prompts():   # a bad prompt now, not mid-run
            prompt = fill(template, req.names)
            if len(prompt) > MAX_PROMPT_CHARS:   # each {} became every name: a 500 from the model below
                raise BadInput(f"Prompt {template!r} with the concepts filled in is {len(prompt)} "
                               f"characters; a prompt takes at most {MAX_PROMPT_CHARS}.",
                               "Shorten the prompt, or evaluate fewer concepts at a time.")
            strip_concepts(prompt, dict.fromkeys(req.names, ""))   # names only concepts evaluated
            self.engine.check_generate(GenerateRequest(prompt=prompt, steps=req.steps))
        self.engine.held_photos({n: self.store.meta(n) for n in req.names})
        check_scorer(req.clip, req.clip_weights)   # no open_clip, no weights file: now, not after a learn
        return self.worker.submit("eval", req)

    def remove(self, name: str, photos: bool = False) -> JobRecord:
        # NotFound now rather than from the queue; membership only, so a damaged concept (whose
        # record cannot be decoded) can still be removed.
        with self._queue_lock:
            if name not in self.store.lost():   # one a salvage left behind: its photos can go
                self._stored(name)
            pending = self._pending(name, ("remove",))
            if pending is not None:
                raise Conflict(f"{name!r} is already being removed (job {pending.id}).",
                               "Wait for it: `cones jobs` shows it.")
            # Which photos go (or stay, to learn it again) is decided now and kept in the job: a
            # removal retried after a crash finds the concept gone and still knows them.
            digests = self.concept_photos(name)
            return self.worker.submit("remove", RemoveJob(name=name, photos=photos, photo_digests=digests))

    def concept_photos(self, name: str) -> list[str]:
        """The photos a concept was learned from: its metadata's, or, where that cannot be read
        (a damaged concept), those of the newest finished learn of that name; of one a salvage
        left behind, those it kept."""
        if name not in self.store and name in (lost := self.store.lost()):
            return list(lost[name])
        try:
            return list(self.store.meta(name).photo_digests)
        except ConesError:
            pass
        newest = newest_learns(self.worker.jobs.jobs(("done",))).get(name)
        return list(newest.request.get("photo_digests", [])) if newest else []

    def forget_photos(self, digests: list[str]) -> tuple[int, int]:
        """Delete these photos from the archive, but those a stored concept (damaged ones too)
        or a queued or running learn still names: they may be needed to learn it again, or to
        run. Returns (deleted, kept); photos not in the archive count in neither."""
        with self._queue_lock:
            # The learns first: one finishing meanwhile stores its concept before it is marked
            # done, so its photos are in one of the two reads. (Concepts first, the other way
            # round, could miss them in both.)
            used = {d for job in self.worker.jobs.jobs(("queued", "running")) if job.kind == "learn"
                    for d in job.request.get("photo_digests", [])}
            readable = self.store.list()
            used |= {d for meta in readable for d in meta.photo_digests}
            # concepts a salvage could not copy: kept to learn them again
            used |= {d for digests in self.store.lost().values() for d in digests}
            used |= self.store.misfiled_photos()   # under a damaged key: salvage copies them back
            if self.store.unnamed():   # a concept whose name is damaged: which photos are its
                # is not known until salvage reads it, so every finished learn's are kept
                used |= {d for job in newest_learns(self.worker.jobs.jobs(("done",))).values()
                         for d in job.request.get("photo_digests", [])}
            for name in set(self.store.names()) - {m.name for m in readable}:
                used |= set(self.concept_photos(name))
            # (an edited concept file may name what is no photo: it is in no archive)
            wanted = [d for d in dict.fromkeys(digests) if is_digest(d)]
            kept = sum(1 for d in wanted if d in used and self.archive.has(d))
            deleted = sum(self.archive.delete(d) for d in wanted if d not in used)
        return deleted, kept

    def prune_photos(self) -> tuple[int, int]:
        """Every archived photo no concept or queued learn names, deleted (those a plain `rm`
        kept): (deleted, kept)."""
        return self.forget_photos(self.archive.digests())

    def import_file(self, data: bytes, name: str | None = None) -> JobRecord:
        """`name`: store it under this name instead of the one it was exported with."""
        from cns_daemon.transfer import decode

        record = decode(data)           # refuses a damaged file now
        if name is not None:
            validate_new_name(name)
        name = name or record.name
        staged = self.paths.data / "imports" / f"{uuid.uuid4().hex}.safetensors"
        atomic_write(staged, data)   # a full disk leaves no cut file behind
        try:
            with self._queue_lock:
                self._check_name_free(name, imported=True)
                return self.worker.submit("import", ImportJob(staged=str(staged), name=name))
        except BaseException:
            staged.unlink(missing_ok=True)
            raise

    def sweep(self) -> None:
        """Start-up: what a process that died left half made. Output folders a generate was
        still writing (the job runs again into a new one) and uploads of imports no queued
        job will run (cancelled before they started, or refused)."""
        for partial in self.paths.outputs.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(partial, ignore_errors=True)
        wanted = {job.request.get("staged") for job in self.worker.jobs.jobs(("queued", "running"))
                  if job.kind == "import"}
        for upload in (self.paths.data / "imports").glob("*.safetensors"):
            if str(upload) not in wanted:
                upload.unlink(missing_ok=True)

    def export(self, name: str) -> bytes:
        from cns_daemon.transfer import encode

        self._stored(name)
        return encode(self.engine.record(name))

    def cancel(self, job_id: str) -> JobRecord:
        return self.worker.cancel(job_id)

    def _check_name_free(self, name: str, imported: bool = False) -> None:
        if name in self.store:
            removal = self._pending(name, ("remove",))
            if removal is not None:   # "remove it first" was said of one already being removed
                raise Conflict(f"A concept named {name!r} exists until its removal (job {removal.id}) "
                               "has run.", "Wait for it (`cones jobs`), then send this again.")
            # An imported concept keeps the name it was exported under.
            raise Conflict(f"A concept named {name!r} already exists.",
                           f"Import it under another name (`cones import FILE --name NEW`), or remove "
                           f"this one first with `cones rm {name}`." if imported else
                           f"Pick another name, or remove it first with `cones rm {name}`.")
        job = self._pending(name, ("learn", "import"))
        if job is not None:
            doing = "learned" if job.kind == "learn" else "imported"
            raise Conflict(f"A concept named {name!r} is already being {doing} (job {job.id}).",
                           f"Wait for it (`cones jobs`) or cancel it with `cones cancel {job.id}`.")

    def pinned_tokens(self, but: str | None = None) -> list[str]:
        """The tokens queued learns (but job `but`) asked for with `--option token=`, and the
        running learn's: taken for every other learn and import, as a stored concept's are."""
        asked = [str(job.request["options"]["token"]) for job in self.worker.jobs.jobs(("queued", "running"))
                 if job.kind == "learn" and job.id != but and (job.request.get("options") or {}).get("token")]
        running = self.engine.learning_token
        return asked + ([running] if running else [])

    def _learning(self, name: str) -> JobRecord | None:
        """The queued or running learn of `name`, if any."""
        return self._pending(name, ("learn",))

    def _pending(self, name: str, kinds: tuple[str, ...]) -> JobRecord | None:
        """The queued or running job of one of `kinds` for the concept `name`, if any (an import
        job names its concept since protocol 6)."""
        for job in self.worker.jobs.jobs(("queued", "running")):
            if job.kind in kinds and job.request.get("name") == name and \
                    self.worker.view(job).state in ("queued", "running"):   # (not one that ended)
                return job
        return None

    def _stored(self, name: str) -> None:
        """NotFound for a concept not in the store, saying so when it is still being learned."""
        if name in self.store:
            return
        job = self._learning(name)
        if job is None:
            near = [n for n in self.store.names() if n.lower() == name.lower()]
            raise NotFound(f"No concept named {name!r}.",
                           f"Did you mean {near[0]!r}? Names are case-sensitive." if near else
                           "`cones list` shows the stored concepts.")
        raise NotFound(f"{name!r} is not learned yet: job {job.id} is learning it ({job.state}).",
                       f"Wait for it (`cones jobs`), or cancel it with `cones cancel {job.id}`.")

    # ------------------------------------------------------------ reads

    def job(self, job_id: str) -> JobRecord:
        return self.worker.view(get_job_or_404(self.worker.jobs, job_id))

    def job_info(self, job: JobRecord) -> JobInfo:
        return self.worker.info(job)

    def jobs(self, limit: int = 50) -> JobList:
        """The newest `limit` jobs, and the ids of the damaged records (one read of the table)."""
        records, damaged = self.worker.jobs.scan_jobs()
        jobs = sorted(records, key=lambda j: j.created, reverse=True)[:limit]
        return JobList(jobs=[self.worker.info(self.worker.view(j)) for j in jobs], damaged=damaged)

    def concepts(self) -> list[ConceptInfo]:
        return self.engine.concepts()

    def concept(self, name: str) -> ConceptInfo:
        self._stored(name)
        return self.engine.concept(name)

    def status(self) -> StatusInfo:
        info = self.engine.info
        health = self.engine.health()
        running = self.worker.running()
        queued, damaged = self.worker.jobs.scan_jobs(("queued",))   # (one read of the job table)
        return StatusInfo(
            protocol=PROTOCOL_VERSION, version=_version(), pid=os.getpid(),
            uptime_s=round(time.time() - self.started, 3), socket=str(self.paths.socket),
            data=str(self.paths.data), inbox=str(self.paths.inbox), inbox_watched=self.inbox_watched,
            model=info.model, device=info.device, dtype=info.dtype, fingerprint=info.fingerprint,
            concepts=len(self.store.names()) + len(self.store.unnamed()), damaged=health["damaged"],
            not_rebuilt=health["not_rebuilt"], memory=getattr(self.engine, "memory_in_effect", []),
            method=self.settings.method,
            queue=QueueInfo(queued=len(queued), running=self.worker.info(running) if running else None,
                            damaged=damaged))

    # ------------------------------------------------------------ the worker's side

    def _run(self, job: JobRecord, progress: Callable[[ProgressEvent], None],
             cancel: CancelToken) -> JobResult:
        return jobkinds.run(self, job, progress, cancel)

    def prune_jobs(self) -> int:
        """Delete the finished jobs beyond the newest `keep_jobs`, but the newest finished learn
        of each stored concept (salvage and `rm --photos` read its photos there). Returns how
        many went. Their images in outputs/ are the person's and stay."""
        # Newest by when they ended: a learn of an hour that ends now is news, whenever it was asked
        finished = sorted((j for j in self.worker.jobs.jobs() if j.state in FINAL_STATES),
                          key=lambda j: j.finished or j.created, reverse=True)
        if len(finished) <= self.settings.keep_jobs:
            return 0
        stored = set(self.store.names())
        kept = {job.id for name, job in newest_learns(finished).items() if name in stored}
        doomed = [j.id for j in finished[self.settings.keep_jobs:] if j.id not in kept]
        for job_id in doomed:
            self.store.delete_job(job_id)
        if doomed:
            log.info("pruned %d finished jobs (keeping the newest %d)", len(doomed), self.settings.keep_jobs)
        return len(doomed)

    def _job_changed(self, job: JobRecord) -> None:
        if job.kind == "import" and job.state in FINAL_STATES:   # cancelled before it ran, too
            Path(job.request.get("staged", "")).unlink(missing_ok=True)
        if job.kind == "learn" and job.state in ("failed", "cancelled"):
            # its photos came into the archive for it alone (a stored concept's and a queued
            # learn's are kept): nothing points to them any more, and a failed `cones add` of
            # 45 phone photos kept them all (a review's find). Submitted again, they come again.
            try:
                self.forget_photos(list(job.request.get("photo_digests", [])))
            except ConesError as exc:
                log.warning("the photos of learn job %s could not be let go: %s", job.id, exc.message)
        if job.state in FINAL_STATES:   # now and then, not after every job: pruning reads them all
            self._finished += 1
            if self._finished % PRUNE_EVERY == 0:
                try:
                    self.prune_jobs()
                except ConesError as exc:
                    log.warning("finished jobs could not be pruned: %s", exc.message)
        for listener in list(self.job_listeners):
            try:
                listener(job)
            except Exception:  # a listener (status line, inbox) must never stop the worker
                log.exception("job listener failed")


def _version() -> str:
    try:
        return dist_version("cones")
    except Exception:
        return "0+unknown"
