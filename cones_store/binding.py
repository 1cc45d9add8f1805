"""Which base model a concept store serves: the binding half of `ConceptStore`.

A store holds concepts of one base model, named by its fingerprint (cns_daemon.model). The
first `bind` records it, with which file or folder and dtype it was (for the words of a later
refusal); a store, record or export of another model is refused with ModelMismatch naming both.
Aliases are other digests of the same model (the fp32-bytes fingerprint stores made before the
digest read bf16): a store bound to one moves to the current digest, and records stamped with
one read as the current model's.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from cns_daemon.api.errors import ModelMismatch

from .records import ConceptMeta


class BaseModelBinding:
    """Mixin of `ConceptStore` (which provides `_env`, `path`, `_bound`, `_accepted` and the meta
    database readers `_meta_value`, `_read_meta`, `_put_meta`)."""

    @property
    def fingerprint(self) -> str | None:
        """The base model this store serves (recorded by the first `bind` or `put`)."""
        value = self._meta_value(b"fingerprint")
        return value if isinstance(value, str) else None

    @property
    def aliases(self) -> list[str]:
        """Earlier digests of the bound model (an older fingerprint scheme): records carrying
        one are this model's."""
        value = self._meta_value(b"aliases")
        return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []

    def accepts(self, fingerprint: str) -> bool:
        """Whether a record made on `fingerprint` belongs to the bound model."""
        return fingerprint in self._accepted

    def bind(self, fingerprint: str, about: dict[str, str] | None = None,
             aliases: Iterable[str] = ()) -> str | None:
        """Serve records for this base model only: the first binding records it (and `about`
        it: which model file or folder, in which dtype, for the words of a later refusal); a
        store made on another model raises ModelMismatch naming both. `aliases` are other
        digests of the same loaded model (the older scheme's): a store bound to one is moved to
        `fingerprint`, and records stamped with any of them stay readable. Returns the digest
        the store was moved from, if it was (the caller says so: earlier versions that know only
        that digest refuse the store from then on)."""
        aliases = [a for a in aliases if a and a != fingerprint]

        def check(stored, known: list[str], made) -> list[str]:
            if stored is not None and stored != fingerprint and stored not in aliases:
                raise self._mismatch(stored, fingerprint, made=made, loaded=about)
            return sorted(set(known) | set(aliases) | ({stored} - {None, fingerprint}))

        def txn_fn(txn):
            stored, known = self._read_meta(txn, b"fingerprint"), self._read_meta(txn, b"aliases") or []
            merged = check(stored, known, self._read_meta(txn, b"base_model"))
            if stored != fingerprint:
                self._put_meta(txn, b"fingerprint", fingerprint)
            if merged != known:
                self._put_meta(txn, b"aliases", merged)
            if about and self._read_meta(txn, b"base_model") is None:
                self._put_meta(txn, b"base_model", about)
            return merged, stored

        if self._env.readonly:
            merged = check(self.fingerprint, self.aliases, self._meta_value(b"base_model"))
            moved = None
        else:
            merged, stored = self._env.write(txn_fn)
            moved = stored if stored not in (None, fingerprint) else None
        self._bound = fingerprint
        self._accepted = frozenset([fingerprint, *merged])
        return moved

    def _mismatch(self, stored: str, current: str, what: str | None = None,
                  made: dict | None = None, loaded: dict | None = None) -> ModelMismatch:
        what = what or f"The concept store at {self.path}"

        def described(fp: str, about) -> str:
            if not isinstance(about, dict) or not about.get("model"):
                return fp
            return f"{fp} ({about['model']}, {about.get('dtype', '?')})"

        hint = None
        same_model = isinstance(made, dict) and loaded and made.get("model") == loaded.get("model")
        if same_model and made.get("dtype") == loaded.get("dtype"):
            # the same file in the same precision under a digest this version does not know: its
            # weights changed, or a later cones reads them another way and carried the store over
            hint = ("The same model file in the same precision gives another digest now: either its "
                    "weights changed since the store was made (load the model it was made with), or a "
                    "newer version of cones carried this store over to its own digest (run that "
                    "version, or give this one another CONES_HOME).")
        elif same_model:   # in another precision
            dtypes = {made.get("dtype"), loaded.get("dtype")}
            hint = (f"Start the service once with dtype = {made.get('dtype')} (config.toml, "
                    "CONES_DTYPE or --dtype): a store from an earlier cones is then carried over "
                    "and serves float32 and bfloat16 alike." if dtypes == {"float32", "bfloat16"} else
                    f"The same model in another precision gives other weights: set dtype = "
                    f"{made.get('dtype')} (config.toml, CONES_DTYPE or --dtype), as when the store "
                    "was made, or give this dtype another CONES_HOME.")
        return ModelMismatch(f"{what} was made with base model {described(stored, made)}, but the "
                             f"loaded base model is {described(current, loaded)}.", hint)

    def _stamped_meta(self, meta: ConceptMeta) -> ConceptMeta:
        """The meta to store: carries the bound base model; refuses another one."""
        if not self._bound:
            return meta
        if meta.fingerprint and not self.accepts(meta.fingerprint):
            raise self._mismatch(meta.fingerprint, self._bound, f"Concept '{meta.name}'")
        return dataclasses.replace(meta, fingerprint=self._bound)

    def _current(self, meta: ConceptMeta) -> ConceptMeta:
        """A meta stamped with an alias of the bound model, read as the model's current digest."""
        if self._bound and meta.fingerprint != self._bound and self.accepts(meta.fingerprint):
            return dataclasses.replace(meta, fingerprint=self._bound)
        return meta
