"""The persistent job queue, kept in the store's `jobs` database so a job survives a restart.
Mixed into ConceptStore (it shares the store's environment and locking)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

from cns_daemon.api.errors import BadInput, Conflict, Corrupt, Internal, NotFound

from . import serialize as ser
from .codec import CodecError
from .envelope import frame, unframe
from .records import JobRecord

log = logging.getLogger("cones.store")


def newest_learns(jobs: Iterable[JobRecord]) -> dict[str, JobRecord]:
    """The newest finished learn of each concept name among `jobs`: what a concept whose own
    record cannot be read was learned from (salvage, `rm --photos`), and what pruning keeps."""
    newest: dict[str, JobRecord] = {}
    for job in jobs:
        name = job.request.get("name")
        if job.kind == "learn" and job.state == "done" and name and (
                name not in newest or job.created > newest[name].created):
            newest[name] = job
    return newest


class JobQueue:
    """Needs `self._env` (cones_store.env.Env) and `self._db` (its databases)."""

    def put_job(self, job: JobRecord) -> None:
        key = _job_key(job.id)
        value = frame(key, ser.encode_job(job))
        self._env.write(lambda txn: txn.put(key, value, db=self._db["jobs"]))

    def get_job(self, job_id: str) -> JobRecord:
        key = _job_key(job_id)
        return self._env.read(lambda txn: self._read_job(txn, key))

    def damaged_jobs(self) -> list[str]:
        """The ids of job records that do not read (`jobs` skips them): said by `cones jobs` and
        `cones status`, not lost without a word."""
        return self.scan_jobs()[1]

    def jobs(self, states: Iterable[str] | None = None) -> list[JobRecord]:
        """Jobs (in `states`, or all), highest priority first, then oldest first. Damaged job
        records are skipped with a warning."""
        return self.scan_jobs(states)[0]

    def scan_jobs(self, states: Iterable[str] | None = None) -> tuple[list[JobRecord], list[str]]:
        """One read of the job table (every record decoded): the jobs in `states` (or all), as
        `jobs` orders them, and the ids of the damaged records."""
        wanted = set(states) if states is not None else None

        def txn_fn(txn):
            out, damaged = [], []
            for key, raw in txn.cursor(db=self._db["jobs"]):
                try:
                    job = ser.decode_job(unframe(key, raw)[1])
                except CodecError as exc:
                    log.warning("skipping damaged job %r: %s", key.decode(errors="replace"), exc)
                    damaged.append(key.decode(errors="replace"))
                    continue
                if wanted is None or job.state in wanted:
                    out.append(job)
            return sorted(out, key=lambda j: (-j.priority, j.created, j.id)), damaged
        return self._env.read(txn_fn)

    def update_job(self, job_id: str, expect_state: str | None = None, **changes) -> JobRecord:
        """Atomic read-modify-write of one job. With `expect_state`, Conflict unless the job is
        in that state (so two workers never both claim a queued job)."""
        key = _job_key(job_id)
        unknown = set(changes) - {f.name for f in dataclasses.fields(JobRecord)} | (
            set(changes) & {"id"})
        if unknown:
            raise Internal(f"Unknown job field(s): {', '.join(sorted(unknown))}.")

        def txn_fn(txn):
            job = self._read_job(txn, key)
            if expect_state is not None and job.state != expect_state:
                raise Conflict(f"Job '{job_id}' is {job.state}, not {expect_state}.",
                               "Check `cones jobs`.")
            job = dataclasses.replace(job, **changes)
            txn.put(key, frame(key, ser.encode_job(job)), db=self._db["jobs"])
            return job
        return self._env.write(txn_fn)

    def delete_job(self, job_id: str) -> None:
        key = _job_key(job_id)

        def txn_fn(txn):
            if not txn.delete(key, db=self._db["jobs"]):
                raise NotFound(f"No job '{job_id}'.")
        self._env.write(txn_fn)

    def _read_job(self, txn, key: bytes) -> JobRecord:
        raw = txn.get(key, db=self._db["jobs"])
        if raw is None:
            raise NotFound(f"No job '{key.decode()}'.")
        try:
            return ser.decode_job(unframe(key, raw)[1])
        except CodecError as exc:
            raise Corrupt(f"Job '{key.decode()}' is damaged ({exc}).",
                          f"`cones cancel {key.decode()}` removes it; then submit it again.") from None


def _job_key(job_id: str) -> bytes:
    if not isinstance(job_id, str) or not 0 < len(job_id) <= 128 or "\0" in job_id:
        raise BadInput(f"Invalid job id {job_id!r}.", "`cones jobs` lists the job ids.")
    return job_id.encode()
