"""The inbox: a watched folder where a person drops photos, one sub-folder per concept.

    inbox/rex/            photos of rex; class from concept.toml
    inbox/rex.dog/        the class may also be given in the folder name
    inbox/rex/concept.toml   class = "dog", method = "cns", steps = 400 (all optional but class),
                             and an [options] table of method hyper-parameters

A folder is taken once nothing in it changed for `settle` seconds (watchdog events and file
mtimes both count). Bad files are skipped and listed; a folder that cannot be learned from gets
an ERROR.txt saying why and what to do. Taken photos are copied into the content-addressed
archive before the job is queued; when the job succeeds the folder goes away (photos are in the
archive, anything else is moved to archive/inbox-leftovers/), when it fails the folder stays, with
an ERROR.txt, and when the person cancels it, with a CANCELLED.txt. Nothing dropped in is ever
deleted unread.

A folder with a note (ERROR.txt or CANCELLED.txt) is not taken again until its inputs change:
each note ends with a signature of the inputs it speaks of (the folder's name; name, size and
mtime of every photo, caption and concept.toml), and the folder is taken again only when the
inputs no longer match it. The service's own notes are no input: writing one never counts as a change, so a failed
folder is not retried in a loop, and the rule holds across restarts.

A folder renamed while its job is queued or running is the same folder under a new name (the
same directory on disk, still holding the job's photos): it is not taken a second time, and the
job's clean-up or note goes to it under its new name.

What one folder holds, and the notes written into it, are inbox_folder.py's; this module watches
the inbox, takes folders and clears them.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from cns_daemon.archive import make_private
from cns_daemon.api.errors import BadInput, ConesError, Internal, storage_error
from cns_daemon.api.protocol import FINAL_STATES, SkippedFile, describe_validation_error
from cns_daemon.inbox_folder import (CONFIG_FILE, ERROR_FILE, NOTE_FILES, drop_notes, holds_photos_of,
                                     inputs_signature, inputs_signatures, latest_change, left_uncleared,
                                     noted_signature,
                                     ours, read_photos, read_spec, shown, taken_photos, write_cancelled,
                                     write_error, write_uncleared)
from cns_daemon.worker import CANCELLED_AT_STOP, CRASH_REASON
from cones_store.env import file_identity
from cones_store.records import JobRecord

log = logging.getLogger(__name__)

# With no folder settling, the inbox is looked at this often even without an event: inotify does
# not see inside a linked folder (the README's "a link to your own photo folder") or on some
# network file systems. Every scan stats every file of every folder left in the inbox (a failed
# folder of 2,000 linked photos: 19 % of a core at the settling rate), so it is not the 0.5 s the
# settling folders get. What wakes it sooner: inbox_watch.py.
RESCAN_SECONDS = 30.0


def folder_error(folder: Path, exc: Exception) -> ConesError | None:
    """What a folder's ERROR.txt says when taking it failed; None for a file that vanished or
    could not be read (the next scan looks again). A request the protocol refuses is a bad folder
    too (read_spec checks what it knows); anything else is a bug in cones, said once in the note
    and the log rather than in a traceback on every scan."""
    if isinstance(exc, ConesError):
        return exc
    if isinstance(exc, OSError):
        return storage_error(exc)
    if isinstance(exc, ValidationError):
        return BadInput(f"Invalid value: {describe_validation_error(exc)}.")
    log.error("inbox folder %s could not be taken", folder.name, exc_info=exc)
    return Internal(f"Taking this folder failed unexpectedly: {type(exc).__name__}: {exc}")


class Inbox:
    def __init__(self, service, root: Path, settle: float, poll: float = 0.5,
                 rescan: float = RESCAN_SECONDS):
        self.service = service
        self.root = Path(root)
        self.settle = settle
        self.poll = poll        # how often a folder that is settling is looked at
        self.rescan = rescan    # how often the inbox is looked at with none settling
        self._events: dict[str, float] = {}     # folder name -> wall time of its last event
        self._in_flight: dict[str, str] = {}    # folder name -> learn job id
        self._taken: dict[str, str] = {}        # folder name -> inputs signature when taken
        self._idents: dict[str, tuple[int, int]] = {}   # in-flight folder name -> (st_dev, st_ino)
        self._moved: dict[str, str] = {}        # in-flight folder name -> the name it has now
        self._unwritable: dict[str, str] = {}   # folder name -> inputs signature of a failure
                                                # whose ERROR.txt could not be written
        self._loose: set[str] = set()           # files put in the inbox itself, said once
        self._failed: set[str] = set()          # folders whose look failed, logged once
        self._retry: set[str] = set()           # folders a file vanished from while taken
        self._first_seen: dict[str, float] = {}  # folder name -> when a scan first saw it
        self._future: dict[str, tuple[float, float]] = {}   # folder name -> (a newest time in
                                                # the future, when it was first seen)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._watch = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from cns_daemon.inbox_watch import InboxWatch

        self.root.mkdir(parents=True, exist_ok=True)
        jobs = self.service.worker.jobs.jobs()   # read once: the job list only grows
        for job in jobs:
            folder = job.request.get("inbox_folder") if job.kind == "learn" else None
            if not folder or job.state not in ("queued", "running", "done"):
                continue
            if job.state == "done":   # learned, but the process died before the clean-up
                self._clear_at_start(self.root / folder, job)
            else:
                self._in_flight[folder] = job.id
                self._remember(self.root / folder)
                if not (self.root / folder).exists():   # renamed while the service was down or
                    self._follow_at_start(folder, job)  # before it stopped: the rename is not kept
        self._note_ended_at_start(jobs)
        self.service.job_listeners.append(self._job_changed)

        self._watch = InboxWatch(self.root, self._note)
        self._watch.start()
        self._thread = threading.Thread(target=self._loop, name="cones-inbox", daemon=True)
        self._thread.start()
        log.info("watching the inbox %s (settle %.1fs)", self.root, self.settle)

    def _clear_at_start(self, folder: Path, job: JobRecord) -> None:
        """The clean-up a learn's process did not live to do; one folder that cannot be
        cleared is said in the log and left, never a service that does not start."""
        staged = folder.with_name(clearing_name(folder.name, job.id))
        if staged.is_dir():   # its clean-up began: finished now
            try:
                self._finish_clearing(staged, folder.name, job)
            except OSError as exc:
                log.warning("inbox folder %s: cannot finish its clean-up: %s", staged.name, exc)
            return
        try:
            if not (folder.is_dir() and job.request.get("name") in self.service.store
                    and left_uncleared(folder, job)):   # not a folder so named dropped again
                return
        except OSError as exc:   # one it may not read: the scan says what is wrong with it
            log.warning("inbox folder %s: cannot look into it: %s", folder.name, exc)
            return
        log.info("inbox folder %s: clearing what learn job %s left (the service stopped before its "
                 "clean-up)", folder.name, job.id)
        self._clear(folder, job)

    def _renamed_folder(self, job: JobRecord, ident: tuple[int, int] | None = None) -> Path | None:
        """The inbox folder, under another name than the job's, that holds this job's photos
        (and, where `ident` is known, is that directory: not a copy, nor a new folder on a freed
        inode number)."""
        taken = job.request.get("inbox_folder")
        try:
            entries = sorted(self.root.iterdir())
        except OSError:   # the inbox itself is gone
            return None
        return next((p for p in entries if p.is_dir() and p.name != taken and not p.name.startswith(".")
                     and (ident is None or file_identity(p) == ident) and holds_photos_of(p, job)), None)

    def _follow_at_start(self, folder_name: str, job: JobRecord) -> None:
        """An in-flight folder not under its name at start-up: the one holding its photos is it,
        renamed (the previous process followed the rename in memory only); its clean-up goes
        there and it is not taken again as a new folder."""
        renamed = self._renamed_folder(job)
        if renamed is not None:
            log.info("inbox folder %s is %s now; job %s's clean-up follows it", folder_name,
                     renamed.name, job.id)
            self._moved[folder_name] = renamed.name
            ident = file_identity(renamed)
            if ident is not None:
                self._idents[folder_name] = ident

    def _note_ended_at_start(self, jobs: list[JobRecord]) -> None:
        """A folder whose learn ended at start-up (no inbox listened then) gets its note now, so
        it is not taken again as if new: failed because the service stopped under it twice (a
        learn that brings the service down must not loop through restarts), or cancelled just
        before the service stopped. Only where the folder still holds that job's photos: a new
        folder of the same name is new."""
        newest: dict[str, JobRecord] = {}
        for job in jobs:
            folder = job.request.get("inbox_folder") if job.kind == "learn" else None
            if folder and (folder not in newest or job.created > newest[folder].created):
                newest[folder] = job
        for folder_name, job in newest.items():
            if (job.error or {}).get("message") not in (CRASH_REASON, CANCELLED_AT_STOP):
                continue
            folder = self.root / folder_name
            if not folder.is_dir():   # renamed before the service came back: the note goes there
                folder = self._renamed_folder(job)
                if folder is None:
                    continue
                self._moved[folder_name] = folder.name
            if noted_signature(folder) is None and holds_photos_of(folder, job):
                self._job_changed(job)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(5)

    def _note(self, parts: tuple[str, ...]) -> None:
        """A change at `parts` inside the inbox (the watch's); `()`: look at everything now."""
        if parts and parts[-1] in NOTE_FILES:
            return   # the service's own notes are no change
        if parts and not parts[0].startswith("."):   # (hidden: staging, a clean-up under way)
            with self._lock:
                self._events[parts[0]] = time.time()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            settling = watched = False
            try:
                # an inbox not watched (not there, or its watch not made) is looked at as often
                # as a folder settling: there is nothing in it to stat, or no event to wait for
                watched = self._watch is None or self._watch.check()
                settling = self.scan()
            except Exception:  # the watcher must outlive any one odd folder
                log.exception("inbox scan failed")
            # An event wakes it at once either way
            self._wake.wait(self.poll if settling or not watched else self.rescan)
            self._wake.clear()

    def scan(self) -> bool:
        """Take every settled folder that is not in flight and not waiting for a fix. Returns
        whether a folder is still settling (to be looked at again soon)."""
        if not self.root.is_dir():
            return False
        now = time.time()
        self._tell_loose_files()
        settling = False
        entries = list(self.root.iterdir())
        folders = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
        self._failed &= {p.name for p in folders}   # a folder that went and came back is new
        # what is known of names no longer there goes (a camera-sync or download folder as the
        # inbox sees names by the thousand; these only grew): a folder in flight is the job's
        present = {p.name for p in entries}
        with self._lock:
            for known in (self._events, self._first_seen, self._future, self._unwritable):
                for name in [n for n in known if n not in present and n not in self._in_flight]:
                    del known[name]
        for folder in folders:
            try:
                settling |= self._scan_one(folder, now)
            except Exception:   # noqa: BLE001 - one odd folder must not keep the others waiting
                if not folder.is_dir():   # removed while it was looked at: nothing to say
                    continue
                if folder.name not in self._failed:   # said once, not on every scan
                    log.exception("inbox folder %s could not be looked at", shown(folder.name))
                self._failed.add(folder.name)
        return settling

    def _scan_one(self, folder: Path, now: float) -> bool:
        """One folder: taken if settled, not in flight and not waiting for a fix. Returns
        whether it is still settling."""
        with self._lock:
            if folder.name in self._in_flight:
                if self._idents.get(folder.name) == file_identity(folder):
                    self._moved.pop(folder.name, None)   # renamed back: it is here again
                return False
            candidate = self._renamed_from(folder)
        if candidate is not None and self._follows(folder, *candidate):
            return False
        with self._lock:
            # Settled counts from when this service first saw the folder too: at start-up a
            # folder still being copied in with its files' old times kept (`cp -p`, rsync -a,
            # an archive) was taken at once, and the photos that came after were set aside.
            first = self._first_seen.setdefault(folder.name, now)
            event = self._events.get(folder.name, 0.0)
            last = max(event, latest_change(folder))
            if last > now:
                # A time in the future (a camera's wrong clock, `cp -p`, an unzipped archive)
                # never grew old enough: the folder waited for good, without a word. Settled
                # counts from when that newest time was first seen instead, and from the
                # folder's latest event (files still coming in keep their old times).
                seen, since = self._future.get(folder.name, (None, now))
                if seen != last:
                    self._future[folder.name] = (last, since := now)
                last = max(since, event)
            last = max(last, first)
        if now - last < self.settle:
            return True
        noted = noted_signature(folder) or self._unwritable.get(folder.name)
        if noted is not None and noted in inputs_signatures(folder):
            return False   # already told the person; wait for them to change something
        if self.take(folder) is None and folder.name in self._retry:
            self._retry.discard(folder.name)
            return True        # looked at again soon, as a folder settling
        return False

    def _tell_loose_files(self) -> None:
        """Photos dropped in the inbox itself, not in a folder of their own: the log says once
        what to do with them (a folder per concept, named after it)."""
        loose = {p.name for p in self.root.iterdir() if not p.name.startswith(".")
                 and (p.is_file() or (p.is_symlink() and not p.exists()))}
        new = sorted(loose - self._loose)
        if new:
            listed = ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            log.warning("inbox: %s %s in the inbox itself and %s not learned: put a concept's "
                        "photos in a folder of their own named after it, e.g. %s/rex.dog/ (a link "
                        "to a folder that is not there counts here too)",
                        listed, *(("lies", "is") if len(new) == 1 else ("lie", "are")), self.root)
        self._loose = loose

    def take(self, folder: Path) -> JobRecord | None:
        skipped: list[SkippedFile] = []
        signature = inputs_signature(folder)   # before reading: a change meanwhile means a retry
        try:
            spec = read_spec(folder)
            photos, skipped = read_photos(folder, spec.name)
            # Held from the submit until the folder is recorded in flight and its old note gone:
            # a learn that ends at once (refused in its first step) tells _job_changed, which
            # waits here, then finds the entries to clear and writes its note after. (The entries
            # stayed until a restart, and a new folder of the name was never taken; the note was
            # deleted.) _job_changed returns before taking the lock for the queued job.
            with self._lock:
                job = self.service.submit_learn(spec.name, spec.class_word, spec.method, spec.steps,
                                                spec.seed, photos, skipped, source="inbox",
                                                inbox_folder=folder.name, options=spec.options)
                self._in_flight[folder.name] = job.id
                self._taken[folder.name] = signature
                self._future.pop(folder.name, None)
                self._first_seen.pop(folder.name, None)
                self._remember(folder)
                try:   # the last try's note; in the lock, as the job's end may write the next
                    drop_notes(folder)
                except OSError as exc:   # replaced when the job ends
                    log.warning("inbox folder %s: cannot remove its old note: %s", folder.name, exc)
        except Exception as exc:   # noqa: BLE001 - see folder_error
            error = folder_error(folder, exc)
            if error is None:   # a file vanished or could not be read: the next scan looks again
                log.warning("inbox folder %s: %s", folder.name, exc)
                self._retry.add(folder.name)
                return None
            log.warning("inbox folder %s: %s", folder.name, error.message)
            try:
                write_error(folder, error, skipped, signature)
            except OSError as note_exc:   # the inbox's disk is full too: do not retry in a loop
                log.warning("inbox folder %s: cannot write its %s: %s", folder.name, ERROR_FILE, note_exc)
                self._unwritable[folder.name] = signature
            return None
        log.info("inbox folder %s taken as job %s (%d photos, %d skipped%s)", folder.name, job.id,
                 len(photos), len(skipped), "".join(f"; {s.file}: {s.reason}" for s in skipped))
        return job

    def _job_changed(self, job: JobRecord) -> None:
        folder_name = job.request.get("inbox_folder") if job.kind == "learn" else None
        if not folder_name or job.state not in FINAL_STATES:
            return
        with self._lock:
            signature = self._taken.pop(folder_name, None)
            moved = self._moved.pop(folder_name, None)
            ident = self._idents.pop(folder_name, None)
        folder = self.root / (moved or folder_name)
        if not moved and ident is not None and file_identity(folder) != ident:
            renamed = self._renamed_folder(job, ident)   # renamed, no scan before the job ended
            if renamed is not None:
                log.info("inbox folder %s was renamed to %s while its job ran; its clean-up follows it",
                         folder_name, renamed.name)
                folder, moved = renamed, renamed.name
        if moved:
            signature = None   # taken under another name: its inputs as they are now
        try:
            if ident is not None and folder.is_dir() and (
                    file_identity(folder) != ident or not holds_photos_of(folder, job)):
                # The folder this job took was removed and another dropped under its name (on a
                # new inode, or the freed one): that one is new, and the next scan takes it (it
                # was swallowed into the leftovers).
                log.info("inbox folder %s is a new folder of that name: left to be taken", folder.name)
                return
            if job.state == "done":
                self._clear(folder, job)
            elif folder.is_dir():
                # the inputs as they were taken (after a restart: as they are now)
                signature = signature or inputs_signature(folder)
                name = job.request.get("name", folder_name)
                try:
                    if job.state == "cancelled":
                        write_cancelled(folder, name, job.id, signature)
                    else:
                        error = _as_error(job.error or {})
                        write_error(folder, error,
                                    [SkippedFile(**s) for s in job.request.get("skipped", [])], signature)
                except OSError as exc:   # a full or read-only inbox: remembered instead, no loop
                    log.warning("inbox folder %s: cannot write its note: %s", folder.name, exc)
                    with self._lock:
                        self._unwritable[folder.name] = signature
        finally:
            with self._lock:
                self._in_flight.pop(folder_name, None)
            self._wake.set()   # a new folder of its name, held back while it ran, is taken now

    def _cannot_clear(self, folder: Path, job: JobRecord, exc: OSError) -> None:
        """A learned folder whose photos may not be removed (a file of root's, a read-only
        folder): its note says the concept is learned and the folder is the person's to remove.
        Without it the next scan took the folder again, and its note said the name was taken."""
        log.warning("inbox folder %s: learned, but cannot clear it: %s", folder.name, exc)
        if not folder.is_dir():
            return
        signature = inputs_signature(folder)
        why = f"{exc.strerror or exc} ({shown(Path(exc.filename or folder).name)})"
        try:
            write_uncleared(folder, job.request.get("name", folder.name), job.id, why, signature)
        except OSError:
            with self._lock:
                self._unwritable[folder.name] = signature

    def _remember(self, folder: Path) -> None:
        """Note which directory an in-flight folder is, to know it again if it is renamed."""
        ident = file_identity(folder)
        if ident is not None:
            self._idents[folder.name] = ident

    def _renamed_from(self, folder: Path) -> tuple[str, str] | None:
        """(in-flight folder name, its job id) when `folder` is the same directory under another
        name. Called with the lock."""
        ident = file_identity(folder)
        for name, known in self._idents.items():
            job_id = self._in_flight.get(name)
            if ident is not None and known == ident and name != folder.name and job_id:
                return name, job_id
        return None

    def _follows(self, folder: Path, name: str, job_id: str) -> bool:
        """Whether `folder`, the directory in-flight folder `name` was, is that folder renamed
        (it still holds one of the job's photos, not a new folder on a freed inode number); if
        so the job's clean-up is sent to it. Reads the photos without the lock held."""
        with self._lock:
            if self._moved.get(name) == folder.name:
                return True
        try:
            job = self.service.worker.jobs.get_job(job_id)
        except ConesError:
            return False
        if not holds_photos_of(folder, job):
            return False
        log.info("inbox folder %s was renamed to %s while its job ran; its clean-up follows it",
                 name, folder.name)
        with self._lock:
            if name in self._in_flight:
                self._moved[name] = folder.name
        return True

    def _clear(self, folder: Path, job: JobRecord) -> None:
        """Learned: photos are in the archive, so they go; anything else is moved aside. A
        folder that is a link to one elsewhere is the person's own: only the link goes. One
        that cannot be cleared says so in a note (and is not taken again as new)."""
        try:
            self._clear_now(folder, job)
        except OSError as exc:
            self._cannot_clear(folder, job, exc)

    def _clear_now(self, folder: Path, job: JobRecord) -> None:
        if folder.is_symlink():
            folder.unlink()
            return
        if not folder.is_dir():
            return
        # Out of the watched names in one step first: a process that died while the photos went
        # one by one left a folder of captions that the next scan took as new, and refused with a
        # note saying the concept could not be learned (a review's find). Hidden, the rest is
        # finished at the next start (`_clear_at_start`).
        staged = folder.with_name(clearing_name(folder.name, job.id))
        folder.rename(staged)
        try:
            self._finish_clearing(staged, folder.name, job)
        except OSError:   # back under its own name, where its note says it could not be cleared
            if staged.is_dir() and not folder.exists():
                staged.rename(folder)
            raise

    def _finish_clearing(self, folder: Path, name: str, job: JobRecord) -> None:
        """Delete the archived photos of a cleared folder (renamed hidden), move what else it
        holds aside under its own `name`, or remove it."""
        archive = self.service.archive
        for p, digest in taken_photos(folder, job):
            if p.name != CONFIG_FILE and p.name not in NOTE_FILES and archive.has(digest):
                p.unlink()
        # The service's own notes go with the folder; a file of the person's that happens to be
        # called ERROR.txt is a leftover like any other (it was deleted with the folder).
        leftovers = [p for p in folder.iterdir() if p.name not in NOTE_FILES or not ours(p)]
        if leftovers:
            dest = archive.root / "inbox-leftovers" / f"{name}-{job.id}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(folder), str(dest))
            make_private(dest)   # in the data folder now: as private as the rest of it
        else:
            shutil.rmtree(folder)


def clearing_name(name: str, job_id: str) -> str:
    """The hidden name a learned inbox folder is cleared under (the scan skips hidden names)."""
    return f".{name}.clearing-{job_id}"


def _as_error(body: dict) -> ConesError:
    from cns_daemon.api.errors import from_code

    return from_code(body.get("code", "internal"), body.get("message", "The job failed."), body.get("hint"))
