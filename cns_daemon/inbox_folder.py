"""One inbox folder: what it holds (its name and concept.toml, its photos and captions) and the
notes the service leaves in it (ERROR.txt, CANCELLED.txt), each ending with the signature of the
inputs it speaks of. The watching, taking and clearing of folders is inbox.py's.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cns_daemon.archive import (MAX_CONCEPT_BYTES, MAX_PHOTO_BYTES, CheckedPhoto, caption_file,
                                check_photos, is_text, shown, sidecar_caption, sniff)
from cns_daemon.api.errors import BadInput, ConesError
from cns_daemon.api.protocol import (CLASS_PATTERN, MAX_PHOTOS, MAX_SEED, TOO_MANY_HINT, SkippedFile,
                                     learn_steps, too_many_photos)
from cns_daemon.api.names import METHODS, validate_name
from cones_store.records import JobRecord

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
    if not is_text(folder.name):
        raise BadInput(f"The folder's name {shown(folder.name)!r} is not UTF-8 text.",
                       "Rename it NAME.CLASS in plain letters, e.g. rex.dog.")
    subfolders = sorted(shown(p.name) for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
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
            # (utf-8-sig: a byte-order mark, as some editors save "UTF-8", was "invalid statement")
            config = tomllib.loads(cfg.read_text(encoding="utf-8-sig"))
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
    return inputs_signatures(folder)[0 if named else 1]


def inputs_signatures(folder: Path) -> tuple[str, str]:
    """`inputs_signature` named and not, from one look at the files (a scan compares a note with
    both, for every folder with a note, every time)."""
    # Names as the bytes they are on disk: one that is not UTF-8 failed every scan of the inbox
    named = hashlib.sha256(os.fsencode(folder.name) + b"\0\0\n")
    bare = hashlib.sha256(b"")
    for p in input_files(folder):
        try:
            st = p.stat()
        except FileNotFoundError:   # removed while we looked: a change either way
            continue
        entry = os.fsencode(p.name) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
        named.update(entry)
        bare.update(entry)
    return named.hexdigest()[:16], bare.hexdigest()[:16]


def _distinct(photos: list[Path]) -> tuple[list[Path], list[SkippedFile]]:
    """The photos whose bytes differ (the first of each, by name), and the copies skipped as
    check_photos says of them. Only files of one size are compared, by their digests: a folder
    of a thousand photos is not read to be counted."""
    by_size: dict[int, list[Path]] = {}
    for p in sorted(photos, key=lambda p: p.name):
        by_size.setdefault(p.stat().st_size, []).append(p)
    if len(by_size) > MAX_PHOTOS:   # so many sizes, so many photos at least: no need to read them
        return [group[0] for group in by_size.values()], []
    seen: dict[str, Path] = {}
    copies = []
    for group in by_size.values():
        for p in group if len(group) > 1 else []:
            first = seen.setdefault(file_digest(p), p)
            if first is not p:
                copies.append(SkippedFile(file=shown(p.name), reason=f"the same photo as {shown(first.name)}"))
    copied = {c.file for c in copies}
    return [p for p in sorted(photos, key=lambda p: p.name) if shown(p.name) not in copied], copies


def noted_signature(folder: Path) -> str | None:
    """The inputs signature the folder's note speaks of (None: no note, or a note without one)."""
    for name in NOTE_FILES:
        try:
            m = _SIGNATURE_RE.search((folder / name).read_text(encoding="utf-8", errors="replace"))
        except OSError:   # gone, a folder, or one we may not read: no note of ours
            continue
        if m:
            return m.group(1)
    return None


def read_photos(folder: Path, name: str = "") -> tuple[list[CheckedPhoto], list[SkippedFile]]:
    """Every input file except the config and caption sidecars is a candidate photo; a
    `photo.txt` beside `photo.png` is that photo's caption."""
    files = input_files(folder)
    odd = [SkippedFile(file=shown(p.name), reason="its name is not UTF-8 text: rename it to read it")
           for p in files if not is_text(p.name)]
    files = [p for p in files if is_text(p.name)]
    # (names compared in lower case: on a case-insensitive disk IMG.TXT is found as IMG.txt)
    captions = {c.name.lower() for p in files if p.suffix.lower() != ".txt"
                and (c := caption_file(p, NOTE_FILES)) is not None}
    candidates = [p for p in files if p.name != CONFIG_FILE and p.name.lower() not in captions]
    not_images = {p: why for p in candidates if (why := sniff(p)) is not None}
    # A copy of a photo counts once (as the learn counts it): set aside by content before the
    # caps, which count what is read (copies are found among files of one size only)
    photos, copies = _distinct([p for p in candidates if p not in not_images])
    if len(photos) > MAX_PHOTOS:   # before reading them: 80 photos were read whole, then refused
        raise BadInput(too_many_photos(name or folder.name, len(photos)), TOO_MANY_HINT)
    total = sum(p.stat().st_size for p in photos)
    if total > MAX_CONCEPT_BYTES:   # before reading them: 64 scans of 200 MB each held at once
        raise BadInput(f"The photos of {name or folder.name} come to {total / 2**20:,.0f} MiB, over the "
                       f"{MAX_CONCEPT_BYTES >> 20} MiB cones reads for one concept.",
                       "Save them smaller (as JPEG), or keep the 3-5 best.")
    good, skipped = check_photos([(p.name, p.read_bytes(), sidecar_caption(p, NOTE_FILES))
                                  for p in photos])
    broken = sorted(shown(p.name) for p in folder.iterdir() if p.is_symlink() and not p.exists())
    nested = sorted(shown(p.name) for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    skipped += [SkippedFile(file=f"{n}/", reason="a folder: photos in sub-folders are not read; move them up "
                            f"into {folder.name}") for n in nested]
    return good, odd + copies + skipped + list(not_images.values()) + [
        SkippedFile(file=n, reason="a link to a file that is not there") for n in broken]


def ours(path: Path) -> bool:
    """Whether a note file is one the service wrote (it carries the inputs signature): a file of
    the person's that happens to be called ERROR.txt is never removed or written over (a folder
    may be a link to their own)."""
    try:
        return bool(_SIGNATURE_RE.search(path.read_text(encoding="utf-8", errors="replace")))
    except OSError:   # gone, a folder, or one we may not read (not ours to remove, then)
        return False


def drop_notes(folder: Path, keep: str | None = None) -> None:
    """Remove the service's own notes from a folder (but `keep`)."""
    for name in NOTE_FILES:
        if name != keep and ours(folder / name):
            (folder / name).unlink(missing_ok=True)


UNTOUCHED = "Your files are untouched; this note is replaced on the next try."


def write_note(folder: Path, note: str, lines: list[str], signature: str, closing: str = UNTOUCHED) -> None:
    """Write one of the service's notes (and drop the other kind): what happened, what to do,
    and the signature of the inputs it speaks of. OSError where a file of the person's holds
    its name."""
    lines = lines + [closing, f"(cones: inputs {signature})", ""]
    drop_notes(folder, keep=note)
    if (folder / note).exists() and not ours(folder / note):
        raise FileExistsError(f"{folder / note} is not a note of cones's; it is left as it is")
    (folder / note).write_text("\n".join(lines), encoding="utf-8")


def write_error(folder: Path, exc: ConesError, skipped: list[SkippedFile],
                signature: str) -> None:
    # the generic hint speaks of command flags, which a folder has none of
    hint = (f"Fix it in this folder (its name NAME.CLASS, its photos, or {CONFIG_FILE}: the "
            "README's inbox section lists its keys)." if exc.hint == BadInput.default_hint else exc.hint)
    lines = [f"cones could not learn a concept from this folder ({shown(folder.name)}).", "",
             f"Why: {exc.message}", f"What to do: {hint}", ""]
    if skipped:
        lines += ["Skipped files:"] + [f"  {s.file}: {s.reason}" for s in skipped] + [""]
    lines += ["The service tries again as soon as you rename " + _this(folder) + " or a photo, "
              "caption or concept.toml in it changes."]
    write_note(folder, ERROR_FILE, lines, signature)


def write_uncleared(folder: Path, name: str, job_id: str, why: str, signature: str) -> None:
    """The note of a folder learned from that could not be cleared: the concept is there, the
    folder is the person's to remove (taken again, it would be told the name is taken)."""
    lines = [f"<{name}> is learned from this folder (job {job_id}), but cones could not clear it: {why}.",
             "", "Its photos are in cones's archive: " + ("remove the link from the inbox yourself."
                                                         if folder.is_symlink() else "delete the folder yourself."),
             "cones does not take it again while it stays as it is.", ""]
    write_note(folder, ERROR_FILE, lines, signature,
               closing="Some of its photos may be gone from it already (those cones could remove).")


def _this(folder: Path) -> str:
    """How a note names the folder it is in: an inbox folder may be a link to the person's own
    folder, whose name is not the one to change (and which must not be deleted)."""
    return f"the link {shown(folder.name)} in the inbox" if folder.is_symlink() else "this folder"


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


def taken_photos(folder: Path, job: JobRecord) -> Iterator[tuple[Path, str]]:
    """The files in `folder` whose content is a photo `job` took, with their digests."""
    digests = set(job.request.get("photo_digests", []))
    for p in folder.iterdir():
        try:
            if (p.is_file() and p.stat().st_size <= MAX_PHOTO_BYTES   # larger: never taken (sniff)
                    and (digest := file_digest(p)) in digests):
                yield p, digest
        except OSError:   # gone or unreadable meanwhile: not evidence either way
            continue


def file_digest(path: Path) -> str:
    """The sha256 a photo is archived under, read a block at a time."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, hashlib.sha256).hexdigest()


def holds_photos_of(folder: Path, job: JobRecord) -> bool:
    """Whether `folder` still holds a photo that `job` took (by content)."""
    return next(taken_photos(folder, job), None) is not None


def left_uncleared(folder: Path, job: JobRecord) -> bool:
    """Whether `folder` is what the finished `job` took, its clean-up never done (the process
    ended first): no note of ours in it, and of its photos, those the job took and those it
    skipped, at least one taken. A folder of that name dropped again (to learn more of it, or
    refused with our note) holds other photos or a note: it is the person's, left as it is."""
    if noted_signature(folder) is not None:
        return False
    taken = {p.name for p, _ in taken_photos(folder, job)}
    skipped = {s.get("file") for s in job.request.get("skipped", [])}
    files = input_files(folder)
    captions = {c.name for p in files if (c := caption_file(p, NOTE_FILES)) is not None}
    others = [p for p in files if p.name not in taken | skipped | captions
              and p.name != CONFIG_FILE and sniff(p) is None]
    return bool(taken) and not others
