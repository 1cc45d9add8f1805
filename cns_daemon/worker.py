"""The job queue and the one worker thread that owns the pipeline.

Jobs live in the store's persistent `jobs` table (JobRecord); this module decides which runs
next (higher priority first, then oldest: generate jobs go ahead of queued learn jobs), runs it
on the worker thread, streams its progress to any number of followers, cancels it
cooperatively, and on start-up settles jobs a dead process left behind: a job that was running
is re-queued once, then failed with the reason.

A learn job takes minutes to an hour, so a generate job submitted while one runs does not wait
for it: the learn's token asks its training loop to pause at the next step boundary, and the
generate runs there, on this same thread, against the model with the learn's in-progress
changes set aside (CancelToken.pause_point); then the learn resumes. `_running` is therefore a
stack: the learn below, the generate on top.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import sys
import threading
import time
import uuid
from typing import Callable, Iterable, Protocol

from pydantic import BaseModel

from cns_daemon.api.errors import Cancelled, ConesError, Corrupt, Internal, NotFound, os_error
from cns_daemon.jobkinds import INTERLEAVED, KINDS, pausable, summarize
from cns_daemon.methods.base import CancelToken, ProgressEvent
from cns_daemon.api.protocol import FINAL_STATES, PAUSED_FOR, ErrorBody, JobInfo, JobResult, ProgressInfo
from cones_store.records import JobRecord

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first run plus one re-run after a crash
# Every job comes in through submit(), which wakes the worker; the queue is re-read without one
# only this seldom, as a safety net. Each read opens an LMDB read transaction, which writes the
# store's lock file: at 10 s an idle service wrote 18 MB a day to disk.
IDLE_POLL_SECONDS = 600.0
UNRECORDED_RETRY_SECONDS = 15.0   # how soon an end the store could not take is tried again
CANCELLED_AT_STOP = "Cancelled; the service stopped before the job ended."
CRASH_REASON = ("The service stopped while this job was running, twice; it was not tried again.")
RESTARTED = "restarted after the service stopped"


class JobStore(Protocol):
    """The part of cones_store.ConceptStore the queue uses."""

    def put_job(self, job: JobRecord) -> None: ...
    def get_job(self, job_id: str) -> JobRecord: ...
    def jobs(self, states: Iterable[str] | None = None) -> list[JobRecord]: ...
    def delete_job(self, job_id: str) -> None: ...


JobRunner = Callable[[JobRecord, Callable[[ProgressEvent], None], CancelToken], JobResult]


def error_body(exc: ConesError) -> dict:
    return ErrorBody(code=exc.code.value, message=exc.message, hint=exc.hint).model_dump()


class ProgressHub:
    """Latest progress per running job, fanned out to async followers from the worker thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latest: dict[str, ProgressInfo] = {}
        self._subs: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}

    def publish(self, info: ProgressInfo) -> None:
        with self._lock:
            if info.state in FINAL_STATES:
                self._latest.pop(info.job, None)
            else:
                self._latest[info.job] = info
            subs = list(self._subs.get(info.job, ()))
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, info)
            except RuntimeError:  # that follower's loop is gone (service shutting down)
                pass

    def latest(self, job_id: str) -> ProgressInfo | None:
        with self._lock:
            return self._latest.get(job_id)

    def subscribe(self, job_id: str) -> asyncio.Queue:
        """Call from the event loop; pair with `unsubscribe`."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subs.setdefault(job_id, []).append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            subs = [s for s in self._subs.get(job_id, []) if s[1] is not queue]
            if subs:
                self._subs[job_id] = subs
            else:
                self._subs.pop(job_id, None)


def out_of_memory(exc: BaseException, kind: str) -> Internal | None:
    """The machine's memory, not a bug: said with what to change. CUDA's allocator raises
    torch.OutOfMemoryError; the CPU's, MemoryError or a RuntimeError that says so."""
    import torch

    said = str(exc).lower()
    if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (isinstance(exc, RuntimeError) and (
            "out of memory" in said or "can't allocate memory" in said))):   # CPU: DefaultCPUAllocator
        return None
    what = ("Generate fewer images at a time (-n) or smaller ones" if kind in ("generate", "eval")
            else "Free memory for it (other programs on the GPU or in RAM)")
    return Internal(f"The {kind} ran out of memory ({type(exc).__name__}).",
                    f"{what}, or turn on the memory options (gradient_checkpointing, offload, "
                    "vae_tiling in config.toml or CONES_* variables; `cones status` shows them), "
                    "and try again.")


def requeued(job: JobRecord) -> JobRecord:
    """`job`, stopped by no fault of its own (a clean stop, a crash while it was paused): back
    in the queue to start over, its attempt given back."""
    job.state, job.started, job.paused = "queued", None, False
    job.attempts, job.interrupted = max(0, job.attempts - 1), job.interrupted + 1
    return job


class Worker:
    def __init__(self, jobs: JobStore, run: JobRunner,
                 on_change: Callable[[JobRecord], None] | None = None):
        self.jobs = jobs
        self.run = run
        self.on_change = on_change or (lambda job: None)
        self.hub = ProgressHub()
        self._lock = threading.Lock()          # job state transitions (submit/cancel vs start)
        self._wake = threading.Condition()
        self._kicked = False   # a job was submitted (or a stop asked) since the queue was last read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: list[tuple[JobRecord, CancelToken]] = []   # outermost first
        # Ends the store could not take (a full disk): job id -> (state, error, result), recorded
        # before the next job starts, or by a cancel; until then the record reads "running".
        self._unrecorded: dict[str, tuple[str, dict | None, JobResult | None]] = {}

    # ------------------------------------------------------------ start-up and shutdown

    def recover(self, saved: Callable[[JobRecord], JobResult | None] = lambda job: None) -> list[JobRecord]:
        """Settle what a dead process left: running -> queued (once) or failed; done where
        `saved` finds that a job to be failed or cancelled had stored its result before the stop
        (jobkinds.saved_before_stop). Returns the jobs it changed."""
        changed = []
        for job in self.jobs.jobs():
            if job.state != "running":
                continue
            final = job.cancel_requested or (not job.paused and job.attempts >= MAX_ATTEMPTS)
            result = saved(job) if final else None
            if result is not None:
                job.state, job.finished, job.error = "done", time.time(), None
                job.result = result.model_dump(mode="json")
            elif job.cancel_requested:   # cancelled, and the service stopped before it ended
                job.state, job.finished = "cancelled", time.time()
                job.error = error_body(Cancelled(CANCELLED_AT_STOP))
            elif job.paused:   # a generate it paused for was running: that one takes the count
                requeued(job)
            elif job.attempts >= MAX_ATTEMPTS:
                job.state, job.finished = "failed", time.time()
                job.error = error_body(Internal(
                    CRASH_REASON, "Look at the service log (`journalctl --user -u cones`, or what "
                    "`cones serve` printed) for why it "
                    "stopped, then submit it again (an inbox folder: rename it or change a file in it)."))
            else:
                job.state, job.started = "queued", None
            self.jobs.put_job(job)
            changed.append(job)
            log.warning("job %s was running when the service stopped: now %s", job.id, job.state)
        return changed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cones-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: the running job is cancelled at its next step and put back in the
        queue without counting the attempt (it was not the job's fault)."""
        self._stop.set()
        with self._lock:
            for _, token in self._running:
                token.cancel()
        self._kick()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._requeue_running()

    def _requeue_running(self) -> None:
        """The running job did not reach its next step in time (a slow step: a class-image batch
        or a large generate on a CPU) and the process exits under it: back in the queue now,
        its attempt returned, or the next start would count a clean stop as a crash."""
        with self._lock:
            for running, _ in self._running:
                try:
                    job = self.jobs.get_job(running.id)
                    if job.state != "running":
                        continue
                    self.jobs.put_job(requeued(job))
                    log.warning("job %s did not stop in time; it starts over at the next start", job.id)
                except ConesError as exc:
                    log.warning("job %s: its stop could not be recorded: %s", running.id, exc.message)

    @property
    def alive(self) -> bool:
        """The worker thread runs (what the systemd watchdog vouches for)."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ client side

    def submit(self, kind: str, request: BaseModel) -> JobRecord:
        job = JobRecord(id=uuid.uuid4().hex[:12], kind=kind, request=request.model_dump(mode="json"),
                        priority=KINDS[kind].priority)
        with self._lock:
            self.jobs.put_job(job)
            if KINDS[kind].interleaved:   # a running learn pauses for it at its next step
                for running, token in self._running:
                    if pausable(running.kind):
                        token.request_pause()
        self.on_change(job)
        self._kick()
        return job

    def _kick(self) -> None:
        with self._wake:
            self._kicked = True
            self._wake.notify_all()

    def cancel(self, job_id: str) -> JobRecord:
        """A queued job is cancelled at once; a running one at its next step."""
        with self._lock:
            try:
                job = get_job_or_404(self.jobs, job_id)
            except Corrupt as exc:   # it can never run (`cones jobs` lists its id as damaged)
                self.jobs.delete_job(job_id)
                self._unrecorded.pop(job_id, None)
                log.warning("job %s was damaged and is removed: %s", job_id, exc.message)
                raise Corrupt(f"{exc.message.rstrip('.')}; it could not run, and it is removed now.",
                              "Submit it again.") from None
            ended = job.state == "queued"
            if ended:
                self._finish(job, "cancelled", error=error_body(Cancelled("Cancelled before it started.")))
            elif job.state == "running" and job_id in self._unrecorded:
                self._record_end(job)   # it ended, the store could not take it then (full still: said)
                ended = True
            elif job.state == "running":
                # Kept in the record: neither a stop nor a crash before the job's next step
                # may bring it back.
                job.cancel_requested = True
                self.jobs.put_job(job)
                for running, token in self._running:
                    if running.id == job_id:
                        token.cancel()
        if ended:
            self.on_change(job)
        return job

    def view(self, job: JobRecord) -> JobRecord:
        """The job as it is: one whose end the store could not take yet reads that end (a
        follower of it waited for good on the record's "running", a review's find)."""
        ended = self._unrecorded.get(job.id)
        if ended is None or job.state != "running":
            return job
        state, error, result = ended
        return dataclasses.replace(job, state=state, error=error, finished=job.finished or time.time(),
                                   result=result.model_dump(mode="json") if result is not None else None)

    def info(self, job: JobRecord) -> JobInfo:
        return JobInfo(id=job.id, kind=job.kind, state=job.state, summary=summarize(job),
                       created=job.created, started=job.started, finished=job.finished,
                       attempts=job.attempts, error=job.error, result=job.result,
                       progress=self.hub.latest(job.id), skipped=job.request.get("skipped", []),
                       note=restart_note(job))

    def running(self) -> JobRecord | None:
        """The job computing now (a generate inside a paused learn is the generate)."""
        with self._lock:
            current = self._running[-1][0] if self._running else None
        return self.jobs.get_job(current.id) if current else None

    def queued(self) -> list[JobRecord]:
        """The queued jobs, highest priority first, then oldest (the order `jobs` gives)."""
        return self.jobs.jobs(("queued",))

    # ------------------------------------------------------------ worker thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as exc:   # whatever it was, the queue must go on being served:
                # a worker thread that died left the service answering while no job ever ran
                # (and `cones generate` waiting for good), as out of file handles once did
                known = os_error(exc)
                if known is not None:
                    log.error("the job queue stalled: %s; retrying", known.message)
                else:
                    log.exception("the job queue stalled; retrying")
                with self._wake:
                    self._wake.wait(timeout=5.0)

    def _turn(self) -> None:
        """Take the next job and run it, or wait for one."""
        self._record_unrecorded()
        try:
            job = self._take_next()
        except ConesError as exc:   # the store cannot take the job's start: say, wait, retry
            log.error("the next job cannot start: %s", exc.message)
            with self._wake:
                self._wake.wait(timeout=30.0)
            return
        if job is None:
            # Woken by a submit (or a stop); the timeout only re-reads the queue now and then,
            # since reading it decodes every job record.
            with self._wake:
                if not self._kicked:   # (soon again while an end waits to be recorded)
                    self._wake.wait(timeout=UNRECORDED_RETRY_SECONDS if self._unrecorded else IDLE_POLL_SECONDS)
                self._kicked = False
            return
        self._run_one(job)
        release_freed()   # between jobs: a service idles for days after its largest job

    def _record_unrecorded(self) -> None:
        """Record the ends the store could not take when their jobs ended, and tell the
        listeners (an inbox folder is cleared or noted then, an upload removed)."""
        recorded = []
        with self._lock:
            for job_id in list(self._unrecorded):
                try:
                    job = self.jobs.get_job(job_id)
                    if job.state != "running":   # settled otherwise meanwhile
                        del self._unrecorded[job_id]
                        continue
                    self._record_end(job)
                    recorded.append(job)
                except (NotFound, Corrupt):   # its record gone (a cancel removed a damaged one)
                    del self._unrecorded[job_id]
                except ConesError:
                    break   # the store still cannot: tried again before the next job
        for job in recorded:
            self.on_change(job)

    def _record_end(self, job: JobRecord) -> None:
        """Record the end of `job` kept in `_unrecorded`, as it was (caller holds self._lock)."""
        state, error, result = self._unrecorded[job.id]
        self._finish(job, state, error=error, result=result)
        del self._unrecorded[job.id]
        log.info("job %s: its end (%s) is recorded now", job.id, state)

    def _take_next(self, kinds: tuple[str, ...] | None = None) -> JobRecord | None:
        with self._lock:
            if self._stop.is_set():
                return None
            queue = [j for j in self.queued() if kinds is None or j.kind in kinds]
            if not queue:
                return None
            job = queue[0]
            job.state, job.started, job.attempts = "running", time.time(), job.attempts + 1
            self.jobs.put_job(job)
            interleave = (lambda: self._interleave(job)) if pausable(job.kind) else None
            self._running.append((job, CancelToken(interleave)))
        self.on_change(job)
        return job

    def _interleave(self, learn: JobRecord) -> None:
        """Inside a paused learn job (its changes set aside): run the waiting generate jobs."""
        paused = self.hub.latest(learn.id)
        marked = False
        while True:
            self._record_unrecorded()   # (a learn runs for hours: not only between jobs)
            job = self._take_next(INTERLEAVED)
            if job is None:
                break
            if not marked:
                marked = self._mark_paused(learn.id, True)
            if paused is not None:
                self.hub.publish(paused.model_copy(update={"message": PAUSED_FOR + job.id}))
            self._run_one(job)
        if marked:
            self._mark_paused(learn.id, False)
        if paused is not None:
            self.hub.publish(paused)

    def _mark_paused(self, job_id: str, paused: bool) -> bool:
        """Record that a learn is paused (or no longer): a crash while it is paused is the
        generate's, so start-up re-queues the learn without counting it a failed run."""
        with self._lock:
            try:
                job = self.jobs.get_job(job_id)
                job.paused = paused
                self.jobs.put_job(job)
                return True
            except ConesError as exc:   # not recorded: a crash now counts against the learn
                log.warning("job %s: its pause could not be recorded: %s", job_id, exc.message)
                return False

    def _run_one(self, job: JobRecord) -> None:
        token = self._running[-1][1]

        def progress(ev: ProgressEvent) -> None:
            self.hub.publish(ProgressInfo(job=job.id, state="running", phase=ev.phase, step=ev.step,
                                          total=ev.total, loss=ev.loss, eta_s=ev.eta_s,
                                          message=ev.message))

        self.hub.publish(ProgressInfo(job=job.id, state="running", phase="start"))
        try:
            result = self.run(job, progress, token)
            state, error = "done", None
        except Cancelled as exc:
            result = None
            if self._stop.is_set() and not self.jobs.get_job(job.id).cancel_requested:
                state, error = "queued", None   # shutdown, not the user: back in the queue
            else:
                state, error = "cancelled", error_body(exc)
        except ConesError as exc:   # said to whoever follows the job, and kept in the log
            result, state, error = None, "failed", error_body(exc)
            log.warning("job %s (%s) failed: %s", job.id, job.kind, exc.message)
        except Exception as exc:  # a full disk, or a bug: keep serving, tell the user in typed form
            result, state = None, "failed"
            known = os_error(exc) or out_of_memory(exc, job.kind)
            if known is not None:
                log.warning("job %s failed: %s", job.id, known.message)
            else:
                log.exception("job %s failed", job.id)
            error = error_body(known or Internal(f"The job failed unexpectedly: {type(exc).__name__}: {exc}"))
        with self._lock:
            try:
                job = self.jobs.get_job(job.id)
                if state == "queued":
                    if job.state == "running":   # not already put back by a stop that timed out
                        self.jobs.put_job(requeued(job))
                else:
                    self._finish(job, state, error=error, result=result)
            except ConesError as exc:
                # The store cannot record the end (its folder removed, its disk full): the job's
                # followers still hear of it, and the worker lives on to say so to the next and
                # to record it once the store takes it (before the next job, or at a cancel).
                log.error("job %s: its end could not be recorded: %s", job.id, exc.message)
                if state != "queued":
                    self._unrecorded[job.id] = (state, error, result)
                ended = {"done": "it ended", "failed": "it failed", "cancelled": "it was cancelled",
                         "queued": "it was to start over at the next start"}[state]
                said = type(exc)(f"{exc.message.rstrip('.')}: {ended}, but that could not be "
                                 "recorded.", exc.hint)
                self.hub.publish(ProgressInfo(job=job.id, state="failed", error=ErrorBody(**error_body(said))))
                return
            finally:
                self._running.pop()
        self.on_change(job)

    def _finish(self, job: JobRecord, state: str, *, error: dict | None = None,
                result: JobResult | None = None) -> None:
        """Record a final state and tell followers (caller holds self._lock)."""
        job.state, job.finished, job.error = state, time.time(), error
        job.result = result.model_dump(mode="json") if result is not None else None
        self.jobs.put_job(job)
        self.hub.publish(ProgressInfo(job=job.id, state=state,
                                      error=ErrorBody(**error) if error else None))


def restart_note(job: JobRecord) -> str:
    """Says so when a job runs (or ran, or waits to run) again because the service stopped while
    it was running. `attempts` counts starts; a clean shutdown gives its start back, so only a
    crash leaves a count above the runs a job has had."""
    if job.state == "queued" and job.attempts >= 1:
        return f"{RESTARTED}; attempt {job.attempts + 1} of {MAX_ATTEMPTS} next"
    if job.attempts >= 2 and not (job.error and job.error.get("message") == CRASH_REASON):
        return f"{RESTARTED}, attempt {job.attempts} of {MAX_ATTEMPTS}"
    if job.error and job.error.get("message") == CRASH_REASON:
        return ""   # its error says it all (a clean stop before the crashes read as a contradiction)
    if job.interrupted:   # a clean shutdown gave its start back: it starts over, uncounted
        times = "" if job.interrupted == 1 else f" ({job.interrupted} times)"
        when = "; it starts over when it runs" if job.state == "queued" else "; it started over"
        return f"{RESTARTED} while it ran{times}{when}"
    return ""


def get_job_or_404(jobs: JobStore, job_id: str) -> JobRecord:
    try:
        return jobs.get_job(job_id)
    except (KeyError, NotFound):
        raise NotFound(f"No job {job_id!r}.", "`cones jobs` lists the jobs.") from None


def release_freed() -> None:
    """Give the memory a finished job freed back to the system. glibc keeps freed heap pages for
    reuse, so a service that generated at several sizes kept the largest size's peak for good
    (measured on the toy world, 8 images at 32, 64, 96 and 128 px: 463 MB loaded, 666 MB after,
    483 MB after a trim). The GPU's cache too: a service idling on a desktop kept its largest
    learn's peak (for Cones 2 on SD 1.5 the text encoder's copy, gradients and optimizer state)
    reserved from other programs."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    torch = sys.modules.get("torch")   # loaded by the engine; not imported here for a fake one
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (find_library runs ldconfig: only where the usual
    name does not load, and not after every job)."""
    for name in ("libc.so.6", None):
        try:
            name = name or ctypes.util.find_library("c")
            return ctypes.CDLL(name).malloc_trim if name else None
        except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to ask
            continue
    return None
