"""What every command that talks to the service shares: the client for this shell's settings,
following a job to its end, and request models built from flags (a refused value named by its
flag)."""
from __future__ import annotations

import time

from rich.markup import escape

from cli.client import Client
from cli.config import settings
from cli.views import err_console, follow, shorten
from cns_daemon.api.errors import BadInput, Interrupted, Unavailable
from cns_daemon.api.protocol import JobInfo

QUEUED_GRACE_S = 1.0   # how long a job may sit queued before the CLI says what it waits for


def client() -> Client:
    paths = settings().paths
    return Client(paths.socket, data_lock=paths.data_lock)


def wait_for(c: Client, job: JobInfo, quiet: bool = False, tell_wait: bool = True,
             left_behind: str = "") -> JobInfo:
    """Follow a job to its end; Ctrl-C stops following, not the job (`left_behind`: what the
    command will then not do, said with it). A job still queued after a moment waits for
    another: say which (on stderr; `tell_wait` False for --json output)."""
    try:
        running = c.status().queue.running if tell_wait and job.state == "queued" else None
        # A generate runs inside a running learn at its next step: that is no wait to tell.
        if running is not None and running.id != job.id and not (
                job.kind == "generate" and running.kind == "learn"):
            time.sleep(QUEUED_GRACE_S)
            if c.job(job.id).state == "queued" and c.job(running.id).state == "running":
                what = escape(shorten(running.summary))
                others = c.status().queue.queued - 1   # ahead or not: generates go first
                more = f", with {others} other job{'s' if others != 1 else ''} queued" if others > 0 else ""
                err_console.print(f"Job {job.id} is queued: job {running.id} runs ({what}){more}; "
                                  "`cones jobs` shows the queue. Ctrl-C stops waiting, not the job.",
                                  highlight=False)
        follow(c.follow(job.id), quiet=quiet)
    except KeyboardInterrupt:   # exit 130; with --json the error document says it too
        raise Interrupted(f"Stopped following; job {job.id} goes on in the service{left_behind}.",
                          f"`cones jobs` shows it; `cones cancel {job.id}` stops it.") from None
    except Unavailable as exc:   # the service went away under us: which job to look for later
        # (a job a stop or crash cut off is queued again when the service starts: it is kept);
        # a job that failed so itself (an optional extra not installed) is not kept
        if getattr(exc, "job_ended", False):
            raise
        raise Unavailable(f"{exc.message.rstrip('.')} (job {job.id}, kept: it runs when the service is "
                          f"back){left_behind}.", exc.hint) from None
    return c.job(job.id)


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
