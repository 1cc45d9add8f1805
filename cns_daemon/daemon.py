"""`cones serve`: start-up, the socket, and the service's lifetime.

Order matters: take the single-instance lock (a second `cones serve` refuses at once), make the
data folder private (umask 077, 0700/0600), open the store, settle jobs a dead process left running, load the model and rebuild the concepts, then
bind the socket (0600 in a 0700 folder; a stale one is replaced), start the worker and the inbox
watcher, serve, and tell systemd READY=1. On SIGTERM/SIGINT the running job is put back in the
queue, the socket removed and the lock released.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Callable

from cns_daemon.archive import Archive, make_private
from cns_daemon.api.errors import BadInput, Conflict, ConesError, Storage, storage_error
from cns_daemon.api.trust import RUNTIME_HINT, folder_problem
from cns_daemon.notify import Notifier
from cns_daemon.api.settings import Paths, Settings, check_text_paths

log = logging.getLogger("cones")

SUN_PATH_MAX = 107   # sockaddr_un.sun_path is 108 bytes including the terminating NUL
IDLE_TICK_SECONDS = 1.0   # how often the server loop looks whether to stop (uvicorn's: 0.1)


def make_folder(path: Path, what: str, setting: str) -> None:
    """A folder the service needs (made 0700 if missing), or an error saying which setting
    points where it cannot be: Storage (exit 12) for no permission, a read-only place or a full
    disk, BadInput (exit 2) for a file in the way."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(path, os.W_OK | os.X_OK):   # said as what it is: a read-only mount or not
            read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
            raise OSError(errno.EROFS, "Read-only file system") if read_only else \
                PermissionError(errno.EACCES, "Permission denied")
    except OSError as exc:
        kind = Storage if storage_error(exc) else BadInput
        raise kind(f"Cannot use {path} as the {what}: {exc.strerror or exc}.",
                   f"Point {setting} (config.toml, CONES_{setting.upper()} or CONES_HOME) at a "
                   "folder you can write to.") from None


def prepare_data(paths: Paths) -> None:
    """The data folder holds photos of people: everything the service writes is private to this
    user (umask 077 for the process; the unit sets UMask=0077 too), and the data folder, store,
    archive and generated images made by an older version (or loosened since) are tightened
    (folders 0700, files 0600)."""
    os.umask(0o077)
    make_folder(paths.data, "data folder", "data_dir")
    os.chmod(paths.data, 0o700)
    for root in (paths.store, paths.archive, paths.outputs):
        if root.is_dir():
            make_private(root)


def prepare_runtime(paths: Paths) -> None:
    """The socket's folder: created 0700, tightened to 0700 if it already exists, unless it is a
    shared folder (sticky, as /tmp is, or another user's): that one is refused, never stripped of
    its permissions (runtime_dir = "/tmp" made /tmp 0700)."""
    make_folder(paths.runtime, "runtime folder", "runtime_dir")
    st = os.lstat(paths.runtime)
    if stat.S_ISLNK(st.st_mode):   # chmod and the stale-socket removal would act on its target
        raise BadInput(f"The runtime folder {paths.runtime} is a link (to {os.readlink(paths.runtime)}); "
                       "cones keeps its socket in a folder of its own, not behind a link.",
                       "Point runtime_dir (config.toml or CONES_RUNTIME_DIR) at the folder itself.")
    if st.st_mode & stat.S_ISVTX or st.st_uid != os.getuid():
        mine = st.st_uid == os.getuid()
        raise BadInput(f"The runtime folder {paths.runtime} is a shared folder{'' if mine else ' of another user'}; "
                       "cones keeps its socket in a folder only it uses.",
                       f"Set runtime_dir to a folder of cones' own, e.g. {paths.runtime / 'cones'}." if mine else
                       "Set runtime_dir (config.toml or CONES_RUNTIME_DIR) to a folder of your own.")
    try:
        os.chmod(paths.runtime, 0o700)
    except OSError as exc:
        raise storage_error(exc) or BadInput(f"Cannot make {paths.runtime} private: {exc.strerror}.") from None
    problem = folder_problem(paths.runtime)
    if problem is not None:   # a folder above it another user can write to or owns
        raise BadInput(f"The runtime folder {paths.runtime} is not this user's alone: {problem}, so "
                       "another user could stand in for the service there.",
                       RUNTIME_HINT)
    if len(os.fsencode(paths.socket)) > SUN_PATH_MAX:
        raise BadInput(f"The socket path {paths.socket} is too long for a Unix socket "
                       f"(over {SUN_PATH_MAX} bytes).", "Use a shorter CONES_HOME or runtime_dir.")


# In the data folder, beside the store: held while the store is open. Its own name, so a
# runtime folder that is the data folder does not make the service lock itself out.
INBOX_LOCK = ".cones-inbox.lock"
# A request body (at most max_request_bytes, over a local socket) that has not arrived this many
# head timeouts after its head (60 s by default) never will: the connection is closed, not held.
BODY_TIMEOUT_HEADS = 6   # hidden: the inbox lists folders, and this is not one


class InstanceLock:
    """flock on a file beside the socket: held for the service's lifetime, released by the
    kernel when the process dies (so kill -9 never leaves a stale lock)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.serves: Path | None = None

    def acquire(self, socket_path: Path | None, hint: str | None = None, serves: Path | None = None) -> None:
        """`socket_path` None: the lock guards the data folder, whatever socket its holder
        serves on (another runtime folder, e.g. a shell without the service's XDG_RUNTIME_DIR).
        `hint`: what to do when it is held (default: what a second `cones serve` should do).
        The file holds the pid, and `serves` (the socket) on a second line, for a client that
        finds the service by its data folder but looks for the socket elsewhere."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = (self.path.read_text().strip().splitlines() or ["?"])[0]
            where = f"on {socket_path}" if socket_path else f"on the data folder {self.path.parent}"
            raise Conflict(f"A cones service is already running {where} (pid {owner}).",
                           hint or "Use it (`cones status`), stop it first (`systemctl --user stop "
                           "cones` or end its `cones serve`), or give this one another CONES_HOME.") from None
        self.fd, self.serves = fd, serves
        self.say("starting")

    def say(self, state: str) -> None:
        """What the holder is doing, on the file's third line ("starting", "serving",
        "stopping"): a client that finds the lock held but no socket tells a loading model from
        a service stopping, or one whose socket was removed under it."""
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"{os.getpid()}\n{self.serves or ''}\n{state}\n".encode(), 0)
            except OSError as exc:   # a full disk at the first start: say which file
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 from the start (umask), replacing a stale
    one (we hold the instance lock, so whatever socket file is there belongs to no live service)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _protocol_class(header_timeout: float):
    """uvicorn's h11 protocol, refusing connections from any other user (SO_PEERCRED) and
    closing a connection whose request head does not complete within `header_timeout` seconds
    (uvicorn's keep-alive timer stops at the first byte, so a head that never ends would hold
    the connection for ever), or whose body does not within BODY_TIMEOUT_HEADS times that."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCheckedH11(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                uid = peer_uid(sock)
                if uid != os.getuid():
                    log.warning("refused a connection from uid %d", uid)
                    transport.close()
                    return
            self._arm_head_timer()

        _body_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:   # the head is complete (or refused)
                self._disarm_head_timer()
            if self.conn.their_state is h11.SEND_BODY:
                if self._body_timer is None:
                    self._body_timer = self.loop.call_later(BODY_TIMEOUT_HEADS * header_timeout,
                                                            self._body_timed_out)
            elif self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_timed_out(self) -> None:
            self._body_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
                log.warning("closed a connection whose request body did not arrive in %g s",
                            BODY_TIMEOUT_HEADS * header_timeout)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()   # the next request on this connection gets the same time

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE:   # nothing of a response went out yet
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
            self.transport.close()

    return PeerCheckedH11


def open_store(paths: Paths):
    from cones_store import ConceptStore
    from cones_store.salvage import finish_interrupted

    moved = finish_interrupted(paths.store)
    if moved is not None:
        log.warning("a salvage of the concept store was interrupted; its copy %s is the store now", moved)
    return ConceptStore.open(paths.store)


def serve(settings: Settings, engine_factory: Callable | None = None,
          notifier: Notifier | None = None) -> None:
    """Run the service in the foreground until SIGTERM/SIGINT. Raises ConesError when it cannot
    start (the CLI prints it and exits with its code)."""
    import uvicorn

    from cns_daemon.engine import Engine
    from cns_daemon.inbox import Inbox
    from cns_daemon.server import App
    from cns_daemon.service import Service
    from cns_daemon.jobkinds import saved_before_stop

    paths = settings.paths
    check_text_paths(paths, settings.watch_inbox)
    notifier = notifier or Notifier()
    prepare_runtime(paths)
    lock = InstanceLock(paths.runtime_lock)
    lock.acquire(paths.socket)
    if paths.socket.is_dir() and not paths.socket.is_symlink():   # said now, not after the model loads
        lock.release()
        raise BadInput(f"A folder stands where the service's socket goes: {paths.socket}.",
                       "Move it away, or point runtime_dir (config.toml or CONES_RUNTIME_DIR) elsewhere.")
    sock = None
    inbox = None
    service = None
    store = None
    data_lock = InstanceLock(paths.data_lock)
    inbox_lock = InstanceLock(paths.inbox / INBOX_LOCK)
    try:
        prepare_data(paths)
        if settings.watch_inbox:   # before the model loads: a bad inbox path fails at once
            make_folder(paths.inbox, "inbox folder", "inbox_dir")
        data_lock.acquire(None, serves=paths.socket)   # one service per data folder, whatever its runtime folder
        store = open_store(paths)
        archive = Archive(paths.archive)
        engine = (engine_factory or Engine)(settings, store, archive)
        service = Service(settings, store, engine, archive)
        for job in service.worker.recover(lambda job: saved_before_stop(service, job)):
            log.warning("job %s (%s) left running by the previous process: %s", job.id, job.kind, job.state)
        service.prune_jobs()
        service.sweep()
        notifier.status("loading the model")
        engine.start()
        if notifier.enabled:   # (the line reads the job table: not built for no one)
            service.job_listeners.append(lambda job: notifier.status(_status_line(service)))
        sock = bind_socket(paths.socket)
        if settings.watch_inbox and _own_inbox(inbox_lock, paths.inbox):
            inbox = Inbox(service, paths.inbox, settings.settle_seconds)
            inbox.start()
            service.inbox_watched = True
        service.worker.start()

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                # uvicorn re-raises a caught SIGTERM after its shutdown, which would kill us
                # before our own clean-up (job back in the queue, socket removed) runs.
                with super().capture_signals():
                    yield
                    self._captured_signals.clear()

            def handle_exit(self, sig, frame) -> None:
                # A second Ctrl-C made uvicorn force its exit, which cancels the app's own
                # shutdown mid-way (a traceback in the log); the stop takes seconds at most
                # (the graceful timeout, the job's next step), so it is said instead.
                if self.should_exit:
                    log.info("already stopping (the running job is put back at its next step)")
                    return
                super().handle_exit(sig, frame)
                if self.wake is not None:
                    self.wake()

            wake: Callable[[], None] | None = None

            async def main_loop(self) -> None:
                # uvicorn looks whether to stop 10 times a second, which is most of what an idle
                # service does all day (10 wake-ups a second); once a second is its Date
                # header's resolution, and a stop's signal wakes the loop at once. on_tick
                # counts tenths of a second.
                stop_now, loop = asyncio.Event(), asyncio.get_running_loop()
                # threadsafe: a signal handler runs between the loop's own steps, and only this
                # wakes its wait for the sockets
                self.wake = lambda: loop.call_soon_threadsafe(stop_now.set)
                counter = 0
                while not await self.on_tick(counter):
                    counter = (counter + 10) % 864000
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop_now.wait(), IDLE_TICK_SECONDS)

            async def startup(self, sockets=None) -> None:
                await super().startup(sockets=sockets)
                lock.say("serving")
                notifier.ready(_status_line(service))
                log.info("cones is serving on %s", paths.socket)

            async def shutdown(self, sockets=None) -> None:
                try:
                    running = service.worker.running()
                except ConesError:   # its record unreadable: the stop goes on regardless
                    running = None
                log.info("cones is stopping" + (f" (job {running.id}, a {running.kind}, starts over "
                                                "at the next start)" if running else ""))
                lock.say("stopping")
                app.stopping.set()   # followers' streams end now, not at the graceful timeout
                await super().shutdown(sockets=sockets)

        app = App(service, settings.max_request_bytes)
        config = uvicorn.Config(app,
                                http=_protocol_class(settings.header_timeout_seconds),
                                lifespan="on", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=3, limit_concurrency=connection_limit())
        notifier.start_watchdog(alive=lambda: service.worker.alive)
        Server(config).run(sockets=[sock])
    finally:
        notifier.stopping()
        notifier.stop()
        if inbox is not None:
            inbox.stop()
        if service is not None:
            service.worker.stop()
        if sock is not None:
            sock.close()
            paths.socket.unlink(missing_ok=True)
        if store is not None and hasattr(store, "close"):
            store.close()
        inbox_lock.release()
        data_lock.release()
        lock.release()
        log.info("cones stopped")


def _own_inbox(lock: InstanceLock, inbox: Path) -> bool:
    """One service watches an inbox folder: two (another CONES_HOME, the same inbox_dir) would
    each learn every folder dropped in. The second serves without it and says why."""
    try:
        lock.acquire(None)
    except Conflict:
        owner = (lock.path.read_text().splitlines() or ["?"])[0].strip() or "?"
        log.warning("not watching the inbox %s: another cones service (pid %s) watches it", inbox, owner)
        return False
    return True


def _status_line(service) -> str:
    from cns_daemon.jobkinds import summarize

    running = service.worker.running()
    queued = len(service.worker.queued())
    head = f"running {summarize(running)}" if running else "idle"
    return f"{head}; {queued} queued"


# Connections served at once beyond the long-lived job followers a desktop has: past it a new
# request is answered 503 at once (the CLI says the service is busy) instead of the service
# running out of file handles, which once failed a generate halfway and filled the log.
MAX_CONNECTIONS = 1000
FILES_SPARE = 256   # handles kept for the store, the model's files, the photos, logs


def connection_limit() -> int:
    """Raise the soft open-files limit to the hard one (a desktop's soft 1,024 is the usual
    cap, its hard one far higher), then cap connections below what the limit leaves."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):   # kept as it was: the cap below follows it
            pass
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(32, min(MAX_CONNECTIONS, soft - FILES_SPARE))


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


__all__ = ["serve", "ConesError"]
