"""Typed records the store keeps. Methods produce them, the store persists them, the daemon
rebuilds models from them. Plain dataclasses of numpy arrays: no torch here, so the CLI and the
store never need it.

Index sets are flat positions into a tensor's row-major storage (int64, sorted, unique): the
"neurons" of a K/V weight of shape (out, in) are its out*in elements.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cns_daemon.api.errors import BadInput
from cns_daemon.api.names import METHODS, validate_name  # noqa: F401  (re-exported)

@dataclass
class SparseDelta:
    """New values at some positions of one tensor (CNS). `values` may be float16/32."""
    indices: np.ndarray  # int64, sorted, unique
    values: np.ndarray   # same length as indices
    shape: tuple[int, ...]


@dataclass
class Overlap:
    """Which earlier concepts share this concept's neurons, and how many (all tensors)."""
    shared_with: dict[str, int] = field(default_factory=dict)  # earlier concept -> shared count
    total: int = 0                                             # this concept's neuron count


@dataclass
class ConceptMeta:
    name: str
    method: str                       # "cns" | "cones" | "cones2"
    class_word: str                   # "dog", "mug", "star"
    token: str                        # the rare/new token the prompt expands to ("" for cones2)
    created: float = field(default_factory=time.time)
    photo_digests: list[str] = field(default_factory=list)  # sha256 of archived photos
    # each photo's caption as its learn gave it (None: none): the archive keeps one caption per
    # picture, which a later learn of the same photo replaces (empty: learned before captions
    # were kept here, or imported from such a file)
    photo_captions: list[str | None] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""             # base model this was learned on
    # How many parts of each kind the store wrote ({"deltas": 32, ...}; {} before it counted):
    # a part whose key was damaged is missing from a read, which a count tells from "none".
    parts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        validate_name(self.name)
        if self.method not in METHODS:
            raise BadInput(f"Unknown method {self.method!r}.", f"Use one of: {', '.join(METHODS)}.")


@dataclass
class ConceptRecord:
    """Everything one concept needs. Only the parts its method uses are filled."""
    meta: ConceptMeta
    masks: dict[str, np.ndarray] = field(default_factory=dict)         # cones: tensor -> indices
    deltas: dict[str, SparseDelta] = field(default_factory=dict)       # cns: tensor -> delta
    residual: np.ndarray | None = None                                  # cones2: (d,) float32
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)    # token word -> (d,) vector
    overlap: Overlap = field(default_factory=Overlap)

    @property
    def name(self) -> str:
        return self.meta.name


@dataclass
class JobRecord:
    """A persistent queue entry. `kind` is learn | generate | remove; `request` is the
    protocol request model dumped to JSON-able data (the protocol module owns its schema)."""
    id: str
    kind: str
    request: dict[str, Any]
    state: str = "queued"     # queued | running | done | failed | cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    attempts: int = 0         # times it was started; a crash re-queues it once
    interrupted: int = 0      # times a clean shutdown stopped it while it ran (it starts over)
    error: dict[str, Any] | None = None   # {"code", "message", "hint"}
    result: dict[str, Any] | None = None
    priority: int = 0         # higher runs first (generate ahead of learn)
    cancel_requested: bool = False   # a person cancelled it while it ran: no stop brings it back
    paused: bool = False      # a learn paused for generate jobs: a crash then was not its run's
