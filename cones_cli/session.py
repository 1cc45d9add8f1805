"""What every command that talks to the service shares: the client for this shell's settings,
following a job to its end, and request models built from flags (a refused value named by its
flag)."""
from __future__ import annotations

import time

from rich.markup import escape

from cones_cli.client import Client
from cones_cli.config import settings
from cones_cli.views import err_console, follow, shorten
from cns_daemon.api.errors import BadInput, Interrupted, Unavailable
from cns_daemon.api.protocol import JobInfo

QUEUED_GRACE_S = 1.0   # how long a job may sit queued before the CLI says what it waits for
# A followed job's service that went away: how long to wait for it to answer again. With no
# service holding its lock, a restart by systemd (RestartSec=5, then its imports) is due within
# the grace; one loading its model, as long as the unit's TimeoutStartSec allows (900 s).
REJOIN_GRACE_S = 30.0
REJOIN_LIMIT_S = 900.0
REJOIN_POLL_S = 1.0
MAX_REJOINS = 5   # each restart takes an attempt of the job: a crashing job fails long before


def client() -> Client:
    paths = settings().paths
    return Client(paths.socket, data_lock=paths.data_lock)


def wait_for(c: Client, job: JobInfo, quiet: bool = False, tell_wait: bool = True,
             left_behind: str = "") -> JobInfo:
    """Follow a job to its end; Ctrl-C stops following, not the job (`left_behind`: what the
    command will then not do, said with it). A job still queued after a moment waits for
    another: say which (on stderr; `tell_wait` False for --json output). Where the service goes
    away meanwhile (a crash systemd restarts, `systemctl --user restart cones`), wait for it and
    follow the job on: it was queued again and runs there."""
    try:
        if tell_wait and job.state == "queued":
            _tell_what_runs(c, job)
        for rejoin in range(MAX_REJOINS + 1):
            try:
                follow(c.follow(job.id), quiet=quiet)
                break
            except Unavailable as exc:
                if getattr(exc, "job_ended", False):   # it failed so itself (an extra not installed)
                    raise
                hung = getattr(exc, "silent", False)   # it did not go away: nothing to wait for
                if hung and rejoin < MAX_REJOINS and _answers(c, job):
                    continue   # only its stream fell silent: followed anew
                if hung or rejoin == MAX_REJOINS or not _service_back(c, job, exc):
                    # (a job a stop or crash cut off is queued again when the service starts: it is kept)
                    kept = "" if hung or "when the service is back" in exc.message else \
                        ", kept: it runs when the service is back"
                    raise Unavailable(f"{exc.message.rstrip('.')} (job {job.id}{kept}){left_behind}.",
                                      exc.hint) from None
    except KeyboardInterrupt:   # exit 130; with --json the error document says it too
        raise Interrupted(f"Stopped following; job {job.id} goes on in the service{left_behind}.",
                          f"`cones jobs` shows it; `cones cancel {job.id}` stops it.") from None
    return c.job(job.id)


def _tell_what_runs(c: Client, job: JobInfo) -> None:
    """A job still queued after a moment waits for another: say which, and how many more (a
    service gone meanwhile is the follow's to tell, and wait for)."""
    try:
        _tell_queue(c, job)
    except Unavailable:
        pass


def _tell_queue(c: Client, job: JobInfo) -> None:
    running = c.status().queue.running
    # A generate runs inside a running learn at its next step: that is no wait to tell.
    if running is None or running.id == job.id or (job.kind == "generate" and running.kind == "learn"):
        return
    time.sleep(QUEUED_GRACE_S)
    if c.job(job.id).state == "queued" and c.job(running.id).state == "running":
        what = escape(shorten(running.summary))
        others = c.status().queue.queued - 1   # ahead or not: generates go first
        more = f", with {others} other job{'s' if others != 1 else ''} queued" if others > 0 else ""
        err_console.print(f"Job {job.id} is queued: job {running.id} runs ({what}){more}; "
                          "`cones jobs` shows the queue. Ctrl-C stops waiting, not the job.",
                          highlight=False)


def _answers(c: Client, job: JobInfo) -> bool:
    try:
        c.job(job.id)
        return True
    except Unavailable:
        return False


def _service_back(c: Client, job: JobInfo, gone: Unavailable) -> bool:
    """Wait for the service to answer again after it went away while `job` ran; False when it
    does not come back. A service that holds its lock (loading its model, or stopping to
    restart) is waited for up to REJOIN_LIMIT_S; none at all, for REJOIN_GRACE_S (systemd
    restarts a crashed one after RestartSec=5; a stopped one does not come back)."""
    err_console.print(f"{escape(gone.message)} Waiting for it to come back to follow job {job.id} on "
                      "(Ctrl-C stops waiting, not the job).", highlight=False)
    start = last_seen = time.monotonic()
    while not _answers(c, job):
        now = time.monotonic()
        if c.service_state() in ("starting", "stopping"):
            last_seen = now
        if now - last_seen > REJOIN_GRACE_S or now - start > REJOIN_LIMIT_S:
            return False
        time.sleep(REJOIN_POLL_S)
    return True


# A request field as the person gave it: the flag or argument (not "class_word" or "guidance_scale")
ARGUMENTS = {"class_word": "--class", "method": "--method", "steps": "--steps", "seed": "--seed",
             "options": "--option", "n": "-n", "boxes": "--box", "negative_prompt": "--negative",
             "guidance_scale": "--guidance-scale", "width": "--width", "height": "--height", "clip": "--clip",
             "clip_weights": "--clip-weights", "prompts": "--prompts", "name": "NAME", "names": "NAMES",
             "prompt": "PROMPT", "photos": "PHOTOS"}


def request(model, **fields):
    """Build a request model; a bad value becomes BadInput naming the flag it came from."""
    from pydantic import ValidationError

    from cns_daemon.api.protocol import describe_validation_error

    try:
        return model(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise BadInput(f"Invalid value: {describe_validation_error(exc, ARGUMENTS)}.") from None
