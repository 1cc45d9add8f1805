"""The LMDB environment under the store: opening, named databases, transactions that survive a
full map, and the locking that makes one writer + many reader threads safe.

Why a lock of our own: LMDB lets readers run beside the one writer, but growing the map
(`Environment.set_mapsize`) is only allowed while this process has no transaction open. So every
transaction, read or write, holds a shared lock; writers also take a writer mutex (one write
transaction at a time in this process); a resize takes the exclusive lock, between two attempts
of a write. Readers therefore wait only for a resize, never for a write.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb

from cns_daemon.api.errors import Corrupt, Internal, NotFound, Storage, Unavailable

DB_NAMES = ("meta", "concepts", "masks", "residuals", "deltas", "embeddings", "overlap", "jobs")
# LMDB's own errors for a damaged B-tree (a page number that points nowhere, a page of the wrong
# kind): the checksums in envelope.py cover values, these cover the structure around them.
PAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError)
SALVAGE_HINT = ("Stop the service and run `cones store salvage`: it copies every readable concept "
                "into a fresh store and keeps the damaged one aside (`cones store check` lists what "
                "is damaged); or restore the store folder from a backup.")
DEFAULT_MAP_SIZE = 64 << 20   # virtual reservation; the file only grows with the data
MAX_MAP_SIZE = 1 << 40
T = TypeVar("T")


def lmdb_reason(exc: BaseException) -> str:
    """LMDB's message without the call it came from: "MDB_PAGE_NOTFOUND: Requested page not found"."""
    text = str(exc).rstrip(".")
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("mdb_") else text


def damaged_store(path: Path, exc: BaseException, where: str | None = None) -> Corrupt:
    """The one error for a store whose structure cannot be read."""
    place = f" (in its '{where}' database)" if where else ""
    return Corrupt(f"The concept store at {path} is damaged{place}: {lmdb_reason(exc)}.", SALVAGE_HINT)


class _SharedLock:
    """Many shared holders or one exclusive holder; exclusive waiters block new shared ones."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def file_identity(file: Path) -> tuple[int, int] | None:
    """(device, inode) of a file or folder, None when it is gone: a path removed or replaced
    since is told apart from the one seen (the store's data file, an inbox folder)."""
    try:
        st = file.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


# LMDB's two meta pages (pages 0 and 1; the newer transaction id wins) say how many pages the
# file holds. A file cut shorter than that (a full disk, a copy stopped half-way) killed every
# command that read it with SIGBUS (LMDB maps the file), and an emptied one was made a new empty
# store by the service without a word, the concepts gone.
_META_MAGIC = 0xBEEFC0DE
_META = 16   # the page header before a meta page's fields
_HEAD = 2 * 65536   # both meta pages, at LMDB's largest page size


@dataclass(frozen=True)
class _MetaPage:
    flags: int      # the page header's (P_META = 0x08)
    version: int    # LMDB's data version (1)
    psize: int      # the page size (the free DB's md_pad holds it)
    last_pg: int    # the last page the file holds
    txnid: int


def _meta_page(head: bytes, offset: int) -> _MetaPage | None:
    """The meta page at `offset` of the data file's head, where LMDB's magic number reads there."""
    import struct

    if len(head) < offset + _META + 136 or struct.unpack_from("<I", head, offset + _META)[0] != _META_MAGIC:
        return None
    flags = struct.unpack_from("<H", head, offset + 10)[0]
    version, psize = (struct.unpack_from("<I", head, offset + _META + at)[0] for at in (4, 24))
    last_pg, txnid = struct.unpack_from("<QQ", head, offset + _META + 120)
    return _MetaPage(flags, version, psize, last_pg, txnid)


def cut_short(data_file: Path) -> str | None:
    """Why `data_file` cannot hold the store it says it does, or None."""
    size = data_file.stat().st_size
    if size == 0:
        return "its data file is empty (0 bytes)"
    with open(data_file, "rb") as f:
        head = f.read(_HEAD)
    first = _meta_page(head, 0)
    if first is None or not 512 <= first.psize <= 1 << 16:
        return None   # not LMDB's layout: lmdb.open says what it is
    newest = max((m for m in (first, _meta_page(head, first.psize)) if m is not None),
                 key=lambda m: (m.txnid, m.last_pg))
    needed = (newest.last_pg + 1) * first.psize
    if size < needed:
        return f"its data file is cut short ({size:,} of the {needed:,} bytes it says it holds)"
    return None


def other_meta_page(store_dir: Path) -> Path | None:
    """A copy of the store at `store_dir` as its one readable meta page describes it, where the
    other is garbled: LMDB reads both and refuses the whole file then, though the page that reads
    describes a whole store (LMDB never reuses a page of the commit before the newest). The copy
    holds that page in both places. None unless exactly one of the two reads as a meta page (a
    store LMDB refuses for another reason is not rolled back a commit)."""
    import shutil
    import struct

    data_file = store_dir / "data.mdb"
    if not data_file.is_file():
        return None
    with open(data_file, "rb") as f:
        head = f.read(_HEAD)

    def meta_at(offset: int) -> int | None:
        """The page size a meta page at `offset` says pages are, or None if none is there:
        LMDB's magic and data version, and the page header's P_META flag."""
        page = _meta_page(head, offset)
        return page.psize if page is not None and page.version == 1 and page.flags & 0x08 else None

    first = meta_at(0)
    if first is not None:   # page 1 sits one page on; is it garbled?
        psize, keep = first, 0
        if meta_at(psize) is not None:
            return None
    else:   # page 0 garbled: the second page is found by the size it says pages are
        psize = next((size for size in (4096, 8192, 16384, 32768, 65536) if meta_at(size) == size), 0)
        if not psize:
            return None
        keep = 1
    page = bytearray(head[keep * psize:(keep + 1) * psize])
    dest = store_dir.with_name(f"{store_dir.name}.other-meta-page")
    shutil.rmtree(dest, ignore_errors=True)
    try:
        dest.mkdir(mode=0o700)
        shutil.copyfile(data_file, dest / "data.mdb")
        with open(dest / "data.mdb", "r+b") as f:
            for slot in (0, 1):
                struct.pack_into("<Q", page, 0, slot)   # the page header's own page number
                f.seek(slot * psize)
                f.write(page)
    except BaseException:   # a full disk: no half copy left beside the store
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


class Env:
    """One LMDB environment (a directory) with the store's named databases."""

    def __init__(self, path: Path, map_size: int = DEFAULT_MAP_SIZE, create: bool = True,
                 readonly: bool = False):
        self.path = Path(path)
        if not (self.path / "data.mdb").exists():
            if not create or readonly:
                raise NotFound(f"No concept store at {self.path}.",
                               "Check the data folder (CONES_HOME) or let the service create it.")
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            why = cut_short(self.path / "data.mdb")
            if why is not None:
                raise Corrupt(f"The concept store at {self.path} is damaged: {why}.",
                              "Restore the store folder from a backup, or move it aside to start a "
                              "new store; the photos stay in the data folder's archive, to learn "
                              "the concepts again from.")
        try:   # the store is private to this user: 0700 folder, 0600 files
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=len(DB_NAMES) + 2,
                                 readonly=readonly, create=create, max_readers=126, mode=0o600)
        except (lmdb.InvalidError, lmdb.VersionMismatchError):   # (a garbled meta page's version)
            raise Corrupt(f"The concept store at {self.path} is not a readable LMDB store.",
                          "Stop the service and run `cones store salvage` (it reads around a damaged "
                          "meta page), or restore the store folder from a backup.") from None
        except lmdb.Error as exc:
            raise Unavailable(f"Cannot open the concept store at {self.path}: {str(exc).rstrip('.')}.",
                              "Check the folder's permissions and free disk space.") from None
        self.readonly = readonly
        self._file = file_identity(self.path / "data.mdb")   # to notice the folder removed under us
        self._lock = _SharedLock()
        self._writer = threading.Lock()
        self.dbs: dict[str, lmdb._Database] = {}
        if readonly:
            try:
                self.dbs = {n: self.env.open_db(n.encode(), create=False) for n in DB_NAMES}
            except lmdb.NotFoundError:
                self.env.close()
                raise Unavailable(f"The concept store at {self.path} needs an upgrade before it "
                                  "can be read read-only.",
                                  "Open it once read-write (start the service).") from None
            except PAGE_ERRORS as exc:
                self.env.close()
                raise damaged_store(self.path, exc) from None
        else:
            try:
                with self.env.begin(write=True) as txn:  # creates the databases on first use
                    self.dbs = {n: self.env.open_db(n.encode(), txn=txn) for n in DB_NAMES}
            except PAGE_ERRORS as exc:
                self.env.close()
                raise damaged_store(self.path, exc) from None

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def read(self, fn: Callable[[lmdb.Transaction], T], buffers: bool = False) -> T:
        """Run `fn` in one read transaction (a consistent snapshot). `buffers`: values come as
        views of the map rather than copies, valid inside `fn` only (to measure, not to keep)."""
        with self._lock.shared():
            return self._run(fn, write=False, buffers=buffers)

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run `fn` in one write transaction: all of its puts land, or none. If the map is
        full, the transaction is aborted, the map doubled and `fn` run again from scratch."""
        if self.readonly:
            raise Internal("Write to a store opened read-only.")
        if file_identity(self.path / "data.mdb") != self._file:
            # The store's folder was removed (or replaced) while it was open: LMDB would go on
            # writing into the unlinked file, and everything learned would vanish at the restart.
            raise Storage(f"The concept store at {self.path} was removed or replaced while the "
                          "service ran; what it writes now would be lost.",
                          "Restart the service (it makes a new store there), or put the folder "
                          "back first.")
        with self._writer:
            while True:
                try:
                    with self._lock.shared():
                        return self._run(fn, write=True)
                except lmdb.MapFullError:
                    with self._lock.exclusive():
                        self._grow()

    def _run(self, fn: Callable[[lmdb.Transaction], T], write: bool, buffers: bool = False) -> T:
        for attempt in (0, 1):
            try:
                with self.env.begin(write=write, buffers=buffers) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                # another process grew the map: adopt its size (no transaction is open here)
                if attempt:
                    raise
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                raise
            except PAGE_ERRORS as exc:   # callers that can pin it on one record catch it inside fn
                raise damaged_store(self.path, exc) from None
            except lmdb.BadTxnError as exc:
                # LMDB ends a transaction this way when a page it reads fails its checks (a
                # database's root page overwritten, say): damage, not a disk or permission matter
                raise damaged_store(self.path, exc) from None
            except lmdb.Error as exc:   # nothing was committed; the store is as it was
                if write:   # a full disk shows as an I/O error of the commit
                    raise Storage(f"The concept store at {self.path} could not be written: "
                                  f"{str(exc).rstrip('.')}.",
                                  "Check free disk space and the folder's permissions.") from None
                raise Unavailable(f"The concept store at {self.path} failed: {str(exc).rstrip('.')}.",
                                  "Check free disk space and the folder's permissions.") from None
        raise AssertionError("unreachable")

    def _grow(self) -> None:
        size = self.map_size * 2
        if size > MAX_MAP_SIZE:
            raise Unavailable(f"The concept store at {self.path} reached {MAX_MAP_SIZE >> 30} GiB.",
                              "Remove concepts you no longer need.")
        self.env.set_mapsize(size)

    def copy(self, dest: Path) -> None:
        """A compacted copy (for fixtures and backups)."""
        Path(dest).mkdir(parents=True, exist_ok=True)
        with self._lock.shared():
            self.env.copy(str(dest), compact=True)

    def close(self) -> None:
        with self._lock.exclusive():
            self.env.close()
