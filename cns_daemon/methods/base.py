"""One interface for the three methods, so they are swappable.

    record = method.learn(pipe, photos, spec, progress, cancel, previous=records)
    handle = method.apply(pipe, [records...])   # for one request; also rewrites prompts
    method.remove(handle)                        # weights + tokenizer bit-identical to before

A method is either resident or per-request (`Method.resident`). CNS is resident, "fusion-free":
after learning, the service keeps its concepts applied (`apply` at start-up for every stored
record, `unlearn` only when the concept is removed). Cones and Cones 2 are per-request: applied
for one generation and removed right after. The engine and the generation routine ask
`resident`, never a method's name.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from cns_daemon.api.errors import Cancelled


@dataclass
class LearnSpec:
    name: str
    class_word: str
    steps: int | None = None          # None: the method's default
    seed: int = 0
    captions: list[str | None] | None = None  # one per photo (None: its template); None: sidecars
    # The names the person gave the photos, one per photo, for notes that point at one (the
    # service trains on archived copies, whose names mean nothing to them). None: numbered.
    photo_names: list[str] | None = None
    options: dict = field(default_factory=dict)  # method-specific hyper-parameters
    # Where prior-preservation class images are cached (one sub-folder per class word). It must
    # belong to one base model (the daemon keeps it beside the store). None: no cache.
    cache_dir: Path | None = None
    # Memory options for the optimisation loop (cns_daemon.memory.MemoryOptions), set by the
    # service from its settings; None: the loop runs on the pipeline exactly as it is.
    memory: object | None = None


@dataclass
class ProgressEvent:
    phase: str          # "prepare" | "class-images" | "select" | "train" | "generate" | ...
    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None
    message: str = ""


ProgressFn = Callable[[ProgressEvent], None]


class CancelToken:
    """Cooperative control of a running job.

    Cancel: long loops call `check()` once per step.

    Pause: a training loop that can set its in-progress changes aside also calls
    `pause_point(aside)` between two steps (common.run_steps does). When the service has short
    work waiting (a generate job) it has called `request_pause()`; the work then runs right
    there, inside `aside()`: a context manager that takes the learn's in-progress changes off the
    live model and puts them back, bit-exactly, on exit. So a generation waits at most one
    training step, and sees the model as if the concept being learned were not there.
    """

    def __init__(self, interleave: Callable[[], None] | None = None):
        self._event = threading.Event()
        self._pause = threading.Event()
        self._interleave = interleave   # runs the waiting work (set by the service's worker)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("The job was cancelled.")

    def request_pause(self) -> None:
        """Ask the loop to run the waiting work at its next step boundary (no-op without it)."""
        if self._interleave is not None:
            self._pause.set()

    @property
    def pause_wanted(self) -> bool:
        return self._pause.is_set()

    def pause_point(self, aside: Callable[[], contextlib.AbstractContextManager]) -> None:
        """Between two steps: if a pause is wanted, run the waiting work with `aside()` entered."""
        if not self._pause.is_set():
            return
        self._pause.clear()
        with aside():
            self._interleave()


class ProgressReporter:
    """Turns per-step calls into ProgressEvents with a running ETA."""

    def __init__(self, fn: ProgressFn | None, phase: str, total: int):
        self.fn, self.phase, self.total = fn, phase, total
        self.start = time.monotonic()

    def __call__(self, step: int, loss: float | None = None, message: str = "") -> None:
        if self.fn is None:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / step * (self.total - step) if step > 0 else None
        self.fn(ProgressEvent(self.phase, step, self.total, loss, eta, message))


class Method(Protocol):
    name: str
    Params: type   # its hyper-parameters (a dataclass); LearnSpec.options override its fields
    # True: a learned concept lives in the live weights from `learn` until `unlearn` (CNS, the
    # fusion-free one; the service re-applies them at start-up). False: applied for one
    # generation and removed right after (Cones, Cones 2).
    resident: bool

    def learn(self, pipe, photos: list[Path], spec: LearnSpec, progress: ProgressFn | None,
              cancel: CancelToken | None, previous: list | None = None):
        """Learn a concept; returns a cones_store.ConceptRecord. Leaves no trace on `pipe` except,
        for CNS, the learned concept applied (fusion-free)."""

    def apply(self, pipe, records: list):
        """Apply records of this method to `pipe`; returns a handle for `remove`."""

    def remove(self, handle) -> None:
        """Undo `apply` exactly."""

    def unlearn(self, pipe, name: str) -> None:
        """Take a resident concept off the live weights (one `learn` left applied, or one the
        service re-applied at start-up); nothing for a per-request method."""

    def applied(self, pipe) -> list[str]:
        """The names of this method's concepts live in `pipe` (always [] for per-request ones)."""


class PerRequest:
    """What a per-request method (not resident) answers for the resident-only part of Method."""
    resident = False

    def unlearn(self, pipe, name: str) -> None:
        return None

    def applied(self, pipe) -> list[str]:
        return []
