"""The CLI's side of the socket API: httpx over the Unix socket, typed in and out.

Every request carries the protocol header; names and job ids are checked and percent-encoded
before they go into a URL (protocol.segment), so `cones show ../jobs` is refused here instead of
reaching another route; error responses come back as the typed ConesError they were on the
service side; a missing or dead socket becomes Unavailable with one line
saying how to start the service.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from cns_daemon.api.errors import (BadInput, ConesError, Internal, Interrupted, ProtocolMismatch, Unavailable,
                                   from_code)
from cns_daemon.api.protocol import (API_PREFIX, PROTOCOL_HEADER, PROTOCOL_VERSION, AddRequest,
                                     ConceptInfo, ConceptList, EvalRequest, GenerateRequest, JobInfo,
                                     JobList, PhotosPruned, ProgressInfo, StatusInfo, segment)
from cns_daemon.api.trust import RUNTIME_HINT, socket_problem

M = TypeVar("M", bound=BaseModel)
# The service sends a job's state at least every 10 s while a follower listens (server._follow):
# a stream silent this long is a service that hangs, not a long step.
STREAM_SILENCE_S = 60.0
START_HINT = "Start it with `cones serve` (foreground) or `cones service install` (systemd user service)."


def service_starting(lock: Path) -> bool:
    """Whether a `cones serve` holds `lock` (its runtime lock: from before the model loads until
    it exits; or its data folder's)."""
    import fcntl
    import os

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _lock_owner(lock: Path) -> tuple[str, str, str]:
    """(pid, socket path or "", what it is doing or "") a service wrote in its lock file."""
    try:
        lines = lock.read_text().splitlines()
    except OSError:
        lines = []
    lines += [""] * (3 - len(lines))
    return lines[0].strip() or "?", lines[1].strip(), lines[2].strip()


SEND_CHUNK = 1 << 20


def _streamed(kwargs: dict) -> dict:
    """A large body goes out in chunks of its declared length: given whole, httpcore copied
    what was left of it after every socket write, so 200 MB of photos took minutes to send
    (past the service's body deadline) where 40 MB took a second. A fresh iterator per call:
    a request sent again must send its body again."""
    data = kwargs.get("content")
    if not isinstance(data, bytes) or len(data) <= SEND_CHUNK:
        return kwargs
    view = memoryview(data)
    chunks = (view[i:i + SEND_CHUNK] for i in range(0, len(data), SEND_CHUNK))
    return {**kwargs, "content": chunks,
            "headers": {**(kwargs.get("headers") or {}), "content-length": str(len(data))}}


def _idle_close(response: httpx.Response) -> bool:
    """The service's bare 408: it closes a kept-alive connection that stayed idle past its
    header timeout, before reading anything more from it (daemon.py), so a request that met it
    was never read and is sent again, on a fresh connection."""
    return response.status_code == 408 and not response.content


class Client:
    def __init__(self, socket_path: Path, timeout: float = 60.0, data_lock: Path | None = None):
        """`data_lock`: the data folder's lock, to tell "not running" from "running, but its
        socket is gone" (its runtime folder removed under it)."""
        self.socket_path = Path(socket_path)
        self.data_lock = data_lock
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)),
                                 base_url="http://cones", timeout=timeout,
                                 headers={PROTOCOL_HEADER: PROTOCOL_VERSION})
        self.trusted = False

    def check_socket(self) -> None:
        """Before the first request: the socket's folder is this user's alone (api/trust.py), so
        what answers there is a service of this user's, not another user's stand-in."""
        if self.trusted:
            return
        if not self.socket_path.parent.is_dir():
            # Nothing to check yet, so nothing to trust: another user who could make the folder
            # between this check and the connect would be listening there. Said as a connect
            # that found nothing is (not running, or running with its socket elsewhere).
            raise self._transport_error(httpx.ConnectError("no socket folder")) from None
        problem = socket_problem(self.socket_path)
        if problem is not None:
            raise BadInput(f"cones does not connect to {self.socket_path}: {problem}, so another user "
                           "could stand in for the service there.",
                           RUNTIME_HINT)
        self.trusted = True

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ verbs

    def status(self) -> StatusInfo:
        return self._call("GET", "/status", StatusInfo)

    def concepts(self) -> list[ConceptInfo]:
        return self._call("GET", "/concepts", ConceptList).concepts

    def concept(self, name: str) -> ConceptInfo:
        return self._call("GET", f"/concepts/{segment('name', name)}", ConceptInfo)

    def add(self, req: AddRequest) -> JobInfo:
        return self._call("POST", "/concepts", JobInfo, body=req)

    def prune_photos(self) -> PhotosPruned:
        return self._call("POST", "/photos/prune", PhotosPruned)

    def remove(self, name: str, photos: bool = False) -> JobInfo:
        path = f"/concepts/{segment('name', name)}" + ("?photos=1" if photos else "")
        return self._call("DELETE", path, JobInfo)

    def generate(self, req: GenerateRequest) -> JobInfo:
        return self._call("POST", "/generate", JobInfo, body=req)

    def evaluate(self, req: EvalRequest) -> JobInfo:
        return self._call("POST", "/eval", JobInfo, body=req)

    def jobs(self, limit: int = 50) -> list[JobInfo]:
        return self.job_list(limit).jobs

    def job_list(self, limit: int = 50) -> JobList:
        """The jobs, and the ids of job records that cannot be read."""
        return self._call("GET", f"/jobs?limit={limit}", JobList)

    def job(self, job_id: str) -> JobInfo:
        return self._call("GET", f"/jobs/{segment('id', job_id)}", JobInfo)

    def cancel(self, job_id: str) -> JobInfo:
        return self._call("POST", f"/jobs/{segment('id', job_id)}/cancel", JobInfo)

    def export(self, name: str) -> bytes:
        return self._send("GET", f"/concepts/{segment('name', name)}/export").content

    def import_file(self, data: bytes, name: str | None = None) -> JobInfo:
        params = {"name": name} if name is not None else None   # the service checks it
        return self._parse(self._send("POST", "/concepts/import", content=data, params=params,
                                      headers={"content-type": "application/octet-stream"}), JobInfo)

    def follow(self, job_id: str, _again: bool = True) -> Iterator[ProgressInfo]:
        """Progress lines of a job until its final state: no deadline (jobs take long), but a
        limit on silence (the service's heartbeat is every 10 s)."""
        url = f"{API_PREFIX}/jobs/{segment('id', job_id)}/events"
        self.check_socket()
        timeout = httpx.Timeout(None, connect=5.0, read=STREAM_SILENCE_S)
        try:
            with self.http.stream("GET", url, timeout=timeout) as response:
                if response.status_code == 408:
                    response.read()
                    if _again and _idle_close(response):   # nothing yielded yet: a fresh connection
                        yield from self.follow(job_id, _again=False)
                        return
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield ProgressInfo.model_validate_json(line)
        except httpx.ReadTimeout:
            silent = Unavailable(f"The cones service sent nothing about job {job_id} for {STREAM_SILENCE_S:g} s "
                                 "(it says how a job goes every 10 s): it may hang.",
                                 "See its log (`journalctl --user -u cones`); `systemctl --user restart "
                                 "cones` restarts it, and the job runs again after.")
            silent.silent = True   # (session.wait_for: no "come back" to wait for)
            raise silent from None
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None

    def service_state(self) -> str | None:
        """What a service holding this socket's runtime lock says it does ("starting", "serving",
        "stopping"); None where no service holds it (down, or between a crash and systemd's
        restart)."""
        lock = self.socket_path.parent / "cones.lock"
        return (_lock_owner(lock)[2] or "starting") if service_starting(lock) else None

    # ------------------------------------------------------------ plumbing

    def _call(self, method: str, path: str, model: type[M], body: BaseModel | None = None) -> M:
        content = body.model_dump_json().encode() if body is not None else None
        headers = {"content-type": "application/json"} if body is not None else None
        return self._parse(self._send(method, path, content=content, headers=headers), model)

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        self.check_socket()

        def request() -> httpx.Response:
            return self.http.request(method, f"{API_PREFIX}{path}", **_streamed(kwargs))

        try:
            response = request()
            if _idle_close(response):
                response = request()
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        except KeyboardInterrupt:
            if method == "GET":
                raise
            # the service may have the whole request already: an add or generate is queued and
            # runs, though this command never heard its job's id (it said nothing before)
            raise Interrupted("Interrupted while the request was sent or answered: the service may "
                              "have taken it (an add, generate, removal or import then goes on there).",
                              "`cones jobs` shows whether it did (and `cones cancel JOB` stops a job).") from None
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _parse(self, response: httpx.Response, model: type[M]) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError:
            raise ProtocolMismatch("The service sent an answer this CLI does not understand.") from None

    def _error(self, response: httpx.Response) -> ConesError:
        """The service's typed error. Read leniently (a field a newer service adds must not turn
        its protocol-version error into "a bug"); an answer without one (the HTTP server's own,
        e.g. its 503 past the connection cap) is said by its status."""
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("code"), str) and isinstance(body.get("message"), str):
            hint = body.get("hint")
            return from_code(body["code"], body["message"], hint if isinstance(hint, str) and hint else None)
        status = response.status_code
        if status == 503:
            return Unavailable("The cones service is too busy to take this request (too many "
                               "connections at once).", "Try again in a moment.")
        if status == 408:
            return Unavailable("The cones service gave up waiting for this request.", "Send it again.")
        if status < 500:
            return BadInput(f"The cones service could not read this request (HTTP {status}).",
                            "Send it again with this cones command; if it persists, restart the "
                            "service so the CLI and the service come from the same install.")
        return Internal(f"The service answered HTTP {status} without an error body.",
                        "See the service log (`journalctl --user -u cones`, or the terminal of "
                        "`cones serve`); this is a bug in cones: please report it with that log.")

    def _transport_error(self, exc: httpx.TransportError) -> ConesError:
        if isinstance(exc, httpx.ConnectError):
            runtime_lock = self.socket_path.parent / "cones.lock"
            if service_starting(runtime_lock):
                pid, _, state = _lock_owner(runtime_lock)
                if state == "stopping":
                    return Unavailable("The cones service is stopping.",
                                       "Once it has stopped, start it again: `cones serve` (foreground) or "
                                       "`systemctl --user start cones`.")
                if state == "serving":   # its socket removed under it (the folder is still there)
                    return Unavailable(f"A cones service (pid {pid}) runs, but its socket {self.socket_path} "
                                       "is gone (removed?).", f"Stop it (`systemctl --user restart cones`, "
                                       f"or `kill {pid}` and start `cones serve` again).")
                return Unavailable("The cones service is starting (loading the model); it will answer "
                                   f"on {self.socket_path} when ready.", "Try again in a moment.")
            if self.data_lock is not None and service_starting(self.data_lock):
                pid, serves, _ = _lock_owner(self.data_lock)
                if serves and Path(serves) != self.socket_path and Path(serves).exists():
                    return Unavailable(
                        f"A cones service (pid {pid}) runs on this data folder with its socket at "
                        f"{serves}, but this command looks for it at {self.socket_path}.",
                        "Give this command the service's runtime folder: CONES_RUNTIME_DIR="
                        f"{Path(serves).parent} (or the same CONES_HOME / XDG_RUNTIME_DIR as the service).")
                return Unavailable(f"A cones service (pid {pid}) runs on this data folder, but its socket "
                                   f"{self.socket_path} is gone (its folder was removed?).",
                                   f"Stop it (`systemctl --user restart cones`, or `kill {pid}` and "
                                   "start `cones serve` again).")
            return Unavailable(f"The cones service is not running (no live socket at {self.socket_path}).",
                               START_HINT)
        if isinstance(exc, httpx.TimeoutException):
            # (its socket is bound once the model has loaded: a service that took the
            # connection is not loading it)
            pid, _, state = _lock_owner(self.socket_path.parent / "cones.lock")
            which = f"The cones service (pid {pid})" if pid != "?" else "The cones service"
            return Unavailable(f"{which} took the connection but did not answer in "
                               f"{self.http.timeout.read or 0:.0f} s" + (f" ({state})" if state else "") + ".",
                               "It may hang: see its log (`journalctl --user -u cones`, or the "
                               "terminal of `cones serve`) and restart it (`systemctl --user "
                               "restart cones`) if it does not recover.")
        # (what broke is httpx's to say: its class name meant nothing to a person)
        # (h11's words for a service that closed mid-answer, as one killed does)
        cut = any(w in str(exc) for w in ("peer closed", "Server disconnected"))
        what = ("it was cut off" if cut or isinstance(exc, (httpx.ReadError, httpx.WriteError)) else
                "its answer was not HTTP" if isinstance(exc, httpx.RemoteProtocolError) else
                str(exc).rstrip(".") or "no reason given")
        return Unavailable(f"The connection to the cones service at {self.socket_path} broke ({what}).",
                           "It may have stopped or be another program: see the service log "
                           "(`journalctl --user -u cones`), and start it again if it is down.")
