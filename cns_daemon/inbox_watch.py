"""What wakes the inbox at once: inotify, through watchdog. The inbox's own loop (inbox.py) looks
at every folder every RESCAN_SECONDS anyway; the watch is what makes a dropped folder be seen in
a moment instead, and what lets an idle inbox cost next to nothing.

inotify watches a directory, not a name, so the watch must follow what a person does to the inbox
folder itself:
- the inbox is a link (to another disk): the directory it leads to is watched (watchdog does not
  follow a link it is given, and heard nothing inside it);
- removed and made again, moved away and replaced, or its link pointed elsewhere: the old
  directory's watch hears nothing of the new one, so flat watches on the folders that hold the
  inbox (its link's and its target's) say when its entry there changes, and `check` makes the
  watch again;
- inotify's queue overflowed: events were lost, so the inbox looks at everything.
Only changes are asked for: opens and reads (the inbox's own scans, a person's viewer) woke the
watcher's threads for nothing. Attribute changes count (`touch` of a photo one cannot write,
`chmod` of a folder that could not be read).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Callable

import watchdog.events
from watchdog.events import FileSystemEventHandler

from cones_store.env import file_identity

log = logging.getLogger(__name__)

CHANGES = ("FileCreatedEvent", "FileModifiedEvent", "FileDeletedEvent", "FileMovedEvent",
           "FileClosedEvent", "FileAttribEvent", "DirCreatedEvent", "DirDeletedEvent",
           "DirMovedEvent", "DirAttribEvent", "EventsLostEvent")
ENTRIES = ("FileCreatedEvent", "FileDeletedEvent", "FileMovedEvent", "DirCreatedEvent",
           "DirDeletedEvent", "DirMovedEvent", "EventsLostEvent")


def _events(names: tuple[str, ...]) -> list[type]:
    # a class an older watchdog lacks: what it reports instead is in the list (IN_ATTRIB came
    # as a modification)
    return [cls for n in names if (cls := getattr(watchdog.events, n, None)) is not None]


class InboxWatch:
    """`on_change(parts)`: the path inside the inbox that changed, as parts (`("rex.dog",
    "photo1.png")`); `()` where anything may have (the watch was made again, events were lost)."""

    def __init__(self, root: Path, on_change: Callable[[tuple[str, ...]], None]):
        self.root = Path(root)
        self.on_change = on_change
        self._observer = None
        self._content = None      # the recursive watch on the inbox's directory
        self._key: tuple[Path, tuple[int, int] | None] | None = None   # what is watched
        self._guards: dict[Path, object] = {}   # flat watches on the folders holding the inbox
        self._names: set[str] = set()           # its entries there (the link's, the target's)
        self._stale = threading.Event()

    def start(self) -> None:
        from watchdog.observers import Observer

        self._observer = Observer()
        self._observer.start()
        self.check()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)

    def check(self) -> bool:
        """Make the watch again where the inbox folder is not the directory watched (replaced,
        re-linked, removed). Whether the inbox is watched now (False: it is not there, or no
        watch could be made on it: tried again once it changes)."""
        resolved = self.root.resolve()
        key = (resolved, file_identity(resolved))
        if not self._stale.is_set() and key == self._key:
            return self._content is not None
        self._stale.clear()
        if self._content is not None:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(self._content)
            self._content = None
        again, self._key = self._key is not None, key
        self._guard({self.root.absolute(), resolved})
        if key[1] is None:
            return False
        try:
            self._content = self._observer.schedule(_Handler(self._content_changed), str(resolved),
                                                    recursive=True, event_filter=_events(CHANGES))
        except OSError as exc:   # inotify's limit on watches, say: the inbox's loop looks often
            log.warning("inbox: cannot watch %s (%s): it is looked at every half second instead",
                        resolved, exc)
            return False
        if again:
            log.info("inbox: watching %s again (the inbox folder was replaced)", resolved)
            self.on_change(())
        return True

    def _guard(self, entries: set[Path]) -> None:
        """Flat watches on the folders that hold `entries` (the inbox as given, and where its link
        leads), for the inbox's entry there being removed, moved or made again."""
        self._names = {e.name for e in entries}
        wanted = {e.parent for e in entries}
        for parent in set(self._guards) - wanted:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(self._guards.pop(parent))
        for parent in wanted - set(self._guards):
            try:
                self._guards[parent] = self._observer.schedule(
                    _Handler(self._entry_changed), str(parent), recursive=False,
                    event_filter=_events(ENTRIES))
            except OSError as exc:   # a parent one cannot watch: the 30 s look finds a new inbox
                log.info("inbox: cannot watch %s for the inbox being replaced: %s", parent, exc)

    def _content_changed(self, event, path: str) -> None:
        if event.event_type == "events_lost":
            self.on_change(())
            return
        try:
            rel = Path(path).relative_to(self._key[0])
        except (TypeError, ValueError):
            return
        if not rel.parts and event.event_type in ("deleted", "moved"):
            self._stale.set()   # the inbox directory itself went
        self.on_change(rel.parts)

    def _entry_changed(self, event, path: str) -> None:
        if Path(path).name in self._names or event.event_type == "events_lost":
            self._stale.set()
            self.on_change(())


class _Handler(FileSystemEventHandler):
    def __init__(self, seen: Callable[[object, str], None]):
        super().__init__()
        self.seen = seen

    def on_any_event(self, event) -> None:
        if event.is_directory and event.event_type == "modified":
            return   # a folder's listing changed: the entry's own event says what
        if event.event_type == "events_lost":
            self.seen(event, "")
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.seen(event, str(path))
