"""What `cones list`, `show` and `status` say of the stored concepts: metadata, overlap, size and
state (ok, damaged, not rebuilt), read without masks or deltas. A mixin of `Engine` (engine.py),
whose `problems` hold what start-up and later reads found."""
from __future__ import annotations

from cns_daemon.api.errors import ConesError, Corrupt, NotFound
from cns_daemon.api.protocol import ConceptInfo
from cns_daemon.importing import IMPORTED, acts_everywhere
from cones_store.records import ConceptMeta, Overlap
from cones_store.store import ConceptStore

# A concept key whose bytes are no name: no request can name it, so only salvage mends it
UNNAMED = Corrupt(ConceptStore.UNNAMED,
                  "Stop the service and run `cones store salvage`: it copies every concept into a fresh "
                  "store, this one under its own name where its metadata still reads (else it says how "
                  "to learn it again).")


def state_of(problem: ConesError | None) -> str:
    if problem is None:
        return "ok"
    return "damaged" if isinstance(problem, Corrupt) else "not_rebuilt"


def concept_info(meta: ConceptMeta, overlap: Overlap, size_bytes: int,
                 problem: ConesError | None = None, archived: int | None = None) -> ConceptInfo:
    """`overlap.total` is the store's count of the concept's neurons (mask + delta indices);
    `archived` how many of its photos the archive holds."""
    return ConceptInfo(name=meta.name, method=meta.method, class_word=meta.class_word,
                       token=meta.token, created=meta.created, photos=len(meta.photo_digests),
                       photos_archived=archived,
                       size_bytes=size_bytes, neurons=int(overlap.total),
                       overlap=dict(overlap.shared_with), fingerprint=meta.fingerprint,
                       metrics={k: v for k, v in meta.metrics.items()
                                if isinstance(v, (int, float, str)) or v is None},
                       learned_with={**{k: meta.hparams[k] for k in ("steps", "seed") if k in meta.hparams},
                                     **meta.hparams.get("options_given", {}),
                                     **({"scope": "all"} if acts_everywhere(meta) else {})},   # not hidden
                       state=state_of(problem), problem=problem.message if problem else "",
                       hint=problem.hint if problem else "")


def store_order(meta: ConceptMeta) -> float:
    """When a concept came into this store: learned here, or imported."""
    return float(meta.hparams.get(IMPORTED, meta.created))


class Listing:
    def concepts(self) -> list[ConceptInfo]:
        """Metadata, overlap, size and state only: listing never reads masks or deltas. Concepts
        whose metadata is unreadable are listed last, as damaged."""
        metas = sorted(self.store.list(), key=store_order)
        listed = {m.name for m in metas}
        out = [self._info(m) for m in metas]
        out += [self._unreadable_info(name) for name in sorted(set(self.store.names()) - listed)]
        out += [ConceptInfo(name=name, method="", class_word="", token="", created=0.0, photos=0,
                            size_bytes=0, neurons=0, state="damaged", problem=UNNAMED.message,
                            hint=UNNAMED.hint) for name in self.store.unnamed()]
        return out

    def _unreadable_info(self, name: str) -> ConceptInfo:
        """A concept whose metadata cannot be read: its name, size and what is wrong."""
        problem = self.problems.get(name) or self._read_error(name)
        return ConceptInfo(name=name, method="", class_word="", token="", created=0.0, photos=0,
                           size_bytes=self.store.size_of(name), neurons=0, state=state_of(problem),
                           problem=problem.message if problem else "",
                           hint=problem.hint if problem else "")

    def health(self) -> dict[str, int]:
        """How many concepts are damaged / not rebuilt (for `cones status`; from what start-up
        and later reads found, without reading any concept again)."""
        names = set(self.store.names())
        states = {n: "damaged" for n in names - {m.name for m in self.store.list()}}
        states.update({n: "damaged" for n in self.store.unnamed()})   # no valid name looks so
        states.update({n: state_of(e) for n, e in self.problems.items() if n in names})
        counts = {"damaged": 0, "not_rebuilt": 0}
        for state in states.values():
            counts[state] += 1
        return counts

    def concept(self, name: str) -> ConceptInfo:
        """As `cones list` has it (metadata only): a damaged concept is shown, not refused."""
        try:
            meta = self.store.meta(name)
        except NotFound:
            raise NotFound(f"No concept named {name!r}.", "`cones list` shows the stored concepts.") from None
        except Corrupt:
            return self._unreadable_info(name)
        return self._info(meta)

    def _info(self, meta: ConceptMeta) -> ConceptInfo:
        try:
            overlap, size = self.store.overlap(meta.name), self.store.size_of(meta.name)
        except Corrupt as exc:   # damage found while listing: remembered like start-up's
            self.problems.setdefault(meta.name, exc)
            overlap, size = Overlap(), 0
        archived = sum(self.archive.has(d) for d in meta.photo_digests)
        return concept_info(meta, overlap, size, self.problems.get(meta.name), archived)
