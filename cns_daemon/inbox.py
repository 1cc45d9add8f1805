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
"""
from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from cns_daemon.archive import (CheckedPhoto, caption_file, check_photos, make_private, sidecar_caption,
                                 sniff)
from cns_daemon.api.errors import BadInput, ConesError, storage_error
from cns_daemon.api.protocol import (CLASS_PATTERN, FINAL_STATES, MAX_SEED, SkippedFile,
                                     describe_validation_error, learn_steps)
from cns_daemon.api.names import METHODS, validate_name
from cns_daemon.worker import CANCELLED_AT_STOP, CRASH_REASON
from store.env import file_identity
from store.records import JobRecord

log = logging.getLogger(__name__)

CONFIG_FILE = "concept.toml"
ERROR_FILE = "ERROR.txt"
CANCELLED_FILE = "CANCELLED.txt"
NOTE_FILES = (ERROR_FILE, CANCELLED_FILE)   # written by the service, never read as input
CONFIG_KEYS = {"class", "method", "steps", "seed", "options"}
_SIGNATURE_RE = re.compile(r"\(cones: inputs ([0-9a-f]{16})\)")


@dataclass
class FolderSpec:
    name: str
    class_word: str
    method: str | None
    steps: int | None
    seed: int
    options: dict


def read_spec(folder: Path) -> FolderSpec:
    """Name, class and options of one inbox folder, or BadInput saying what to fix."""
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    # A folder of concept folders, one level too deep (one named NAME.CLASS is a concept's own,
    # its photos in a sub-folder: read_photos says to move them up)
    if subfolders and not input_files(folder) and "." not in folder.name:
        raise BadInput(f"{folder.name} holds folders ({', '.join(subfolders[:3])}"
                       f"{', ...' if len(subfolders) > 3 else ''}), not photos; sub-folders are not read.",
                       f"Give each concept a folder of its own directly in the inbox: move "
                       f"{folder.name}/{subfolders[0]} up one level, named NAME.CLASS (e.g. rex.dog).")
    name, _, dotted_class = folder.name.partition(".")
    config: dict = {}
    cfg = folder / CONFIG_FILE
    if cfg.is_file():
        try:
            config = tomllib.loads(cfg.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{CONFIG_FILE} is not valid TOML ({exc}).",
                           'Write it like:  class = "dog"   (optional: method = "cns", steps = 400)') from None
        unknown = set(config) - CONFIG_KEYS
        if unknown:
            raise BadInput(f"{CONFIG_FILE} has unknown keys: {', '.join(sorted(unknown))}.",
                           f"Allowed keys: {', '.join(sorted(CONFIG_KEYS))}.")
    validate_name(name)
    given = config.get("class")
    if given is not None and not isinstance(given, str):
        raise BadInput(f"class in {CONFIG_FILE} must be a word in quotes, not {given!r}.",
                       'For example:  class = "dog"')
    if given and given.strip() and dotted_class and " ".join(given.split()).casefold() != " ".join(
            dotted_class.split()).casefold():
        raise BadInput(f"The folder name says {name!r} is a {dotted_class!r}, its {CONFIG_FILE} says "
                       f"class = {given!r}: which is it?",
                       f"Rename the folder to {name} (and keep the class in {CONFIG_FILE}), or remove "
                       f"the class line.")
    class_word = (given or dotted_class or "").strip()
    if not class_word:
        raise BadInput(f"No class word for {name!r}: what is it (dog, mug, star …)?",
                       f'Add a {CONFIG_FILE} with  class = "dog"  or rename the folder to {name}.dog')
    if not re.fullmatch(CLASS_PATTERN, class_word):
        where = f"class in {CONFIG_FILE}" if given else f"the folder name's class ({name}.{dotted_class})"
        raise BadInput(f"{where} is {class_word!r}: a class word is what the concept is, in letters, "
                       "spaces or hyphens (up to 64), such as dog or coffee mug.",
                       f'Write it as  class = "dog"  (or "golden retriever") in {CONFIG_FILE}.' if given
                       else f"Rename the folder, e.g. to {name}.dog.")
    method = config.get("method")
    if method is not None and method not in METHODS:
        raise BadInput(f"Unknown method {method!r} in {CONFIG_FILE}.", f"Use one of: {', '.join(METHODS)}.")
    steps = learn_steps(config.get("steps"), f"steps in {CONFIG_FILE}")
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise BadInput(f"seed in {CONFIG_FILE} must be a whole number from 0 to {MAX_SEED}, not {seed!r}.")
    options = config.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(v, (bool, int, float, str)) for v in options.values()):
        raise BadInput(f"[options] in {CONFIG_FILE} must be a table of plain values.",
                       "For example:\n[options]\ntop_p = 5.0")
    return FolderSpec(name, class_word, method, steps, seed, options)


def input_files(folder: Path) -> list[Path]:
    """What the person put in the folder: every file but hidden ones and the service's notes."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in NOTE_FILES)


def inputs_signature(folder: Path, *, named: bool = True) -> str:
    """The folder's name (it can say the concept's name and class, and ERROR.txt may say to
    rename it), then name, size and mtime of every input file: changes whenever the folder is
    renamed or a photo, caption or concept.toml is added, removed, replaced or touched.
    `named` False: the form notes written before the name counted (read, never written)."""
    digest = hashlib.sha256(f"{folder.name}\0\0\n".encode() if named else b"")
    for p in input_files(folder):
        try:
            st = p.stat()
        except FileNotFoundError:   # removed while we looked: a change either way
            continue
        digest.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def noted_signature(folder: Path) -> str | None:
    """The inputs signature the folder's note speaks of (None: no note, or a note without one)."""
    for name in NOTE_FILES:
        try:
            m = _SIGNATURE_RE.search((folder / name).read_text(encoding="utf-8", errors="replace"))
        except (FileNotFoundError, IsADirectoryError):
            continue
        if m:
            return m.group(1)
    return None


def read_photos(folder: Path) -> tuple[list[CheckedPhoto], list[SkippedFile]]:
    """Every input file except the config and caption sidecars is a candidate photo; a
    `photo.txt` beside `photo.png` is that photo's caption."""
    files = input_files(folder)
    # (names compared in lower case: on a case-insensitive disk IMG.TXT is found as IMG.txt)
    captions = {c.name.lower() for p in files if p.suffix.lower() != ".txt"
                and (c := caption_file(p, NOTE_FILES)) is not None}
    candidates = [p for p in files if p.name != CONFIG_FILE and p.name.lower() not in captions]
    not_images = {p: why for p in candidates if (why := sniff(p)) is not None}
    good, skipped = check_photos([(p.name, p.read_bytes(), sidecar_caption(p, NOTE_FILES))
                                  for p in candidates if p not in not_images])
    broken = sorted(p.name for p in folder.iterdir() if p.is_symlink() and not p.exists())
    nested = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    skipped += [SkippedFile(file=f"{n}/", reason="a folder: photos in sub-folders are not read; move them up "
                            f"into {folder.name}") for n in nested]
    return good, skipped + list(not_images.values()) + [
        SkippedFile(file=n, reason="a link to a file that is not there") for n in broken]


def ours(path: Path) -> bool:
    """Whether a note file is one the service wrote (it carries the inputs signature): a file of
    the person's that happens to be called ERROR.txt is never removed or written over (a folder
    may be a link to their own)."""
    try:
        return bool(_SIGNATURE_RE.search(path.read_text(encoding="utf-8", errors="replace")))
    except (FileNotFoundError, IsADirectoryError):
        return False


def drop_notes(folder: Path, keep: str | None = None) -> None:
    """Remove the service's own notes from a folder (but `keep`)."""
    for name in NOTE_FILES:
        if name != keep and ours(folder / name):
            (folder / name).unlink(missing_ok=True)


def write_note(folder: Path, note: str, lines: list[str], signature: str) -> None:
    """Write one of the service's notes (and drop the other kind): what happened, what to do,
    and the signature of the inputs it speaks of. OSError where a file of the person's holds
    its name."""
    lines = lines + ["Your files are untouched; this note is replaced on the next try.",
                     f"(cones: inputs {signature})", ""]
    drop_notes(folder, keep=note)
    if (folder / note).exists() and not ours(folder / note):
        raise FileExistsError(f"{folder / note} is not a note of cones's; it is left as it is")
    (folder / note).write_text("\n".join(lines), encoding="utf-8")


def write_error(folder: Path, exc: ConesError, skipped: list[SkippedFile],
                signature: str) -> None:
    lines = [f"cones could not learn a concept from this folder ({folder.name}).", "",
             f"Why: {exc.message}", f"What to do: {exc.hint}", ""]
    if skipped:
        lines += ["Skipped files:"] + [f"  {s.file}: {s.reason}" for s in skipped] + [""]
    lines += ["The service tries again as soon as you rename " + _this(folder) + " or a photo, "
              "caption or concept.toml in it changes."]
    write_note(folder, ERROR_FILE, lines, signature)


def _this(folder: Path) -> str:
    """How a note names the folder it is in: an inbox folder may be a link to the person's own
    folder, whose name is not the one to change (and which must not be deleted)."""
    return f"the link {folder.name} in the inbox" if folder.is_symlink() else "this folder"


def write_cancelled(folder: Path, name: str, job_id: str, signature: str) -> None:
    lines = [f"Learning <{name}> from this folder was cancelled (job {job_id}).", "",
             f"cones will not take it again until you rename {_this(folder)} or a photo, caption or",
             "concept.toml in it changes. " + ("Remove the link from the inbox" if folder.is_symlink()
                                               else "Delete the folder") + " if you do not want the concept.", ""]
    write_note(folder, CANCELLED_FILE, lines, signature)


def latest_change(folder: Path) -> float:
    """Newest mtime (wall clock) of everything in the folder but the service's notes. The
    folder's own mtime is left out: writing a note changes it (a photo removed shows up as a
    watchdog event instead)."""
    newest = 0.0
    for p in folder.rglob("*"):
        if p.name not in NOTE_FILES:
            try:
                newest = max(newest, p.stat().st_mtime)
            except FileNotFoundError:
                try:   # a link to a file that is not there: the link's own time
                    newest = max(newest, p.lstat().st_mtime)
                except FileNotFoundError:   # removed while we looked: it changed, which is the point
                    newest = time.time()
    return newest


class Inbox:
    def __init__(self, service, root: Path, settle: float, poll: float = 0.5):
        self.service = service
        self.root = Path(root)
        self.settle = settle
        self.poll = poll
        self._events: dict[str, float] = {}     # folder name -> wall time of its last event
        self._in_flight: dict[str, str] = {}    # folder name -> learn job id
        self._taken: dict[str, str] = {}        # folder name -> inputs signature when taken
        self._idents: dict[str, tuple[int, int]] = {}   # in-flight folder name -> (st_dev, st_ino)
        self._moved: dict[str, str] = {}        # in-flight folder name -> the name it has now
        self._unwritable: dict[str, str] = {}   # folder name -> inputs signature of a failure
                                                # whose ERROR.txt could not be written
        self._loose: set[str] = set()           # files put in the inbox itself, said once
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self.root.mkdir(parents=True, exist_ok=True)
        jobs = self.service.worker.jobs.jobs()   # read once: the job list only grows
        for job in jobs:
            folder = job.request.get("inbox_folder") if job.kind == "learn" else None
            if not folder or job.state not in ("queued", "running", "done"):
                continue
            if job.state == "done":   # learned, but the process died before the clean-up
                if ((self.root / folder).is_dir() and job.request.get("name") in self.service.store
                        and holds_photos_of(self.root / folder, job)):   # not a new folder so named
                    self._clear(self.root / folder, job)
            else:
                self._in_flight[folder] = job.id
                self._remember(self.root / folder)
                if not (self.root / folder).exists():   # renamed while the service was down or
                    self._follow_at_start(folder, job)  # before it stopped: the rename is not kept
        self._note_ended_at_start(jobs)
        self.service.job_listeners.append(self._job_changed)

        inbox = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.is_directory and event.event_type == "modified":
                    return   # a folder's listing changed: the file's own event says what
                inbox._note(Path(str(event.src_path)))
                if getattr(event, "dest_path", ""):
                    inbox._note(Path(str(event.dest_path)))

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.root), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._loop, name="cones-inbox", daemon=True)
        self._thread.start()
        log.info("watching the inbox %s (settle %.1fs)", self.root, self.settle)

    def _renamed_folder(self, job: JobRecord) -> Path | None:
        """The inbox folder, under another name than the job's, that holds this job's photos."""
        taken = job.request.get("inbox_folder")
        return next((p for p in sorted(self.root.iterdir()) if p.is_dir() and p.name != taken
                     and not p.name.startswith(".") and holds_photos_of(p, job)), None)

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
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        if self._thread is not None:
            self._thread.join(5)

    def _note(self, path: Path) -> None:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return
        if rel.parts and rel.parts[-1] not in NOTE_FILES:
            with self._lock:
                self._events[rel.parts[0]] = time.time()
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:  # the watcher must outlive any one odd folder
                log.exception("inbox scan failed")
            self._wake.wait(self.poll)
            self._wake.clear()

    def scan(self) -> None:
        """Take every settled folder that is not in flight and not waiting for a fix."""
        if not self.root.is_dir():
            return
        now = time.time()
        self._tell_loose_files()
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            with self._lock:
                if folder.name in self._in_flight:
                    if self._idents.get(folder.name) == file_identity(folder):
                        self._moved.pop(folder.name, None)   # renamed back: it is here again
                    continue
                candidate = self._renamed_from(folder)
            if candidate is not None and self._follows(folder, *candidate):
                continue
            with self._lock:
                last = max(self._events.get(folder.name, 0.0), latest_change(folder))
            if now - last < self.settle:
                continue
            noted = noted_signature(folder) or self._unwritable.get(folder.name)
            if noted is not None and noted in (inputs_signature(folder),
                                               inputs_signature(folder, named=False)):
                continue   # already told the person; wait for them to change something
            self.take(folder)

    def _tell_loose_files(self) -> None:
        """Photos dropped in the inbox itself, not in a folder of their own: the log says once
        what to do with them (a folder per concept, named after it)."""
        loose = {p.name for p in self.root.iterdir() if not p.name.startswith(".")
                 and (p.is_file() or (p.is_symlink() and not p.exists()))}
        new = sorted(loose - self._loose)
        if new:
            shown = ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            log.warning("inbox: %s %s in the inbox itself and %s not learned: put a concept's "
                        "photos in a folder of their own named after it, e.g. %s/rex.dog/ (a link "
                        "to a folder that is not there counts here too)",
                        shown, *(("lies", "is") if len(new) == 1 else ("lie", "are")), self.root)
        self._loose = loose

    def take(self, folder: Path) -> JobRecord | None:
        skipped: list[SkippedFile] = []
        signature = inputs_signature(folder)   # before reading: a change meanwhile means a retry
        try:
            spec = read_spec(folder)
            photos, skipped = read_photos(folder)
            job = self.service.submit_learn(spec.name, spec.class_word, spec.method, spec.steps,
                                            spec.seed, photos, skipped, source="inbox",
                                            inbox_folder=folder.name, options=spec.options)
        except (ConesError, OSError, ValidationError) as exc:
            # A request the protocol refuses is a bad folder too (read_spec checks what it
            # knows): its ERROR.txt, never a traceback on every scan.
            error = (exc if isinstance(exc, ConesError) else storage_error(exc) if isinstance(exc, OSError)
                     else BadInput(f"Invalid value: {describe_validation_error(exc)}."))
            if error is None:   # a file vanished or could not be read: the next scan looks again
                log.warning("inbox folder %s: %s", folder.name, exc)
                return None
            log.warning("inbox folder %s: %s", folder.name, error.message)
            try:
                write_error(folder, error, skipped, signature)
            except OSError as note_exc:   # the inbox's disk is full too: do not retry in a loop
                log.warning("inbox folder %s: cannot write its %s: %s", folder.name, ERROR_FILE, note_exc)
                self._unwritable[folder.name] = signature
            return None
        with self._lock:
            self._in_flight[folder.name] = job.id
            self._taken[folder.name] = signature
            self._remember(folder)
        drop_notes(folder)
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
        folder that is a link to one elsewhere is the person's own: only the link goes."""
        if folder.is_symlink():
            folder.unlink()
            return
        if not folder.is_dir():
            return
        archive = self.service.archive
        for p, digest in taken_photos(folder, job):
            if p.name != CONFIG_FILE and p.name not in NOTE_FILES and archive.has(digest):
                p.unlink()
        leftovers = [p for p in folder.iterdir() if p.name not in NOTE_FILES]
        if leftovers:
            dest = archive.root / "inbox-leftovers" / f"{folder.name}-{job.id}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(folder), str(dest))
            make_private(dest)   # in the data folder now: as private as the rest of it
        else:
            shutil.rmtree(folder)


def taken_photos(folder: Path, job: JobRecord) -> Iterator[tuple[Path, str]]:
    """The files in `folder` whose content is a photo `job` took, with their digests."""
    digests = set(job.request.get("photo_digests", []))
    for p in folder.iterdir():
        try:
            if p.is_file() and (digest := hashlib.sha256(p.read_bytes()).hexdigest()) in digests:
                yield p, digest
        except OSError:   # gone or unreadable meanwhile: not evidence either way
            continue


def holds_photos_of(folder: Path, job: JobRecord) -> bool:
    """Whether `folder` still holds a photo that `job` took (by content)."""
    return next(taken_photos(folder, job), None) is not None


def _as_error(body: dict) -> ConesError:
    from cns_daemon.api.errors import from_code

    return from_code(body.get("code", "internal"), body.get("message", "The job failed."), body.get("hint"))
