"""`cones import`, the engine's part: a concept file checked against the model it says it was
learned on, moved off words another concept (or every prompt) uses, stored and applied. A mixin
of `Engine` (engine.py), which has the pipeline, store and fingerprint check it uses."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable

from cns_daemon.api.errors import BadInput, Conflict, ModelMismatch
from cns_daemon.api.protocol import JobResult
from cones_store.records import ConceptMeta, ConceptRecord

# An imported concept's hparams say when it came into this store: its `created` is when it was
# learned, elsewhere, but it was applied on top of the concepts here, and start-up must rebuild
# the weights in the order they were had (and `cones list` lists it where its overlap says).
IMPORTED = "imported"


def acts_everywhere(meta: ConceptMeta) -> bool:
    """A CNS concept whose values act on every prompt, named or not (scope `all`, as
    common.scope_of reads it: learned with that option, or before scopes)."""
    return meta.method == "cns" and meta.hparams.get("scope", "all") == "all"


class Importing:
    def import_record(self, record: ConceptRecord, reserved: Iterable[str] = ()) -> JobResult:
        """`reserved`: tokens learns queued or running hold (`Service.pinned_tokens`): taken, as
        a stored concept's are."""
        hint = ("Import it into a service on the model it was learned on (another CONES_HOME), or "
                "learn it again here from its photos.")
        if self.info.dtype != "float32":   # an earlier cones's export names the float32 digest
            hint += (" A file exported by an earlier cones on this model imports into a service started "
                     "with dtype = float32 (another CONES_HOME); exported again from there, it imports here.")
        self._check_fingerprint(record, hint)
        if record.name in self.store:
            raise Conflict(f"A concept named {record.name!r} already exists.",
                           f"Import it under another name (`cones import FILE --name NEW`), or remove "
                           f"this one first with `cones rm {record.name}`.")
        self._check_fits(record)
        from cns_daemon.methods.common.tokens import everyday_words, token_ids, token_words

        words = set(token_words(record.meta.token))

        def ids(token: str) -> set[int]:   # by id: "HTTR" in a file is this store's "httr"
            return {i for w in token_words(token) for i in token_ids(self.pipe.tokenizer, w)}

        mine = ids(record.meta.token)
        clash = [f"<{m.name}>" for m in self.store.list() if mine & ids(m.token)]
        clash += ["a learn under way" for t in reserved if mine & ids(t)][:1]
        # A file not made by cones may name its concept by an everyday word ("grass"): it would
        # act on every prompt that says it, named or not.
        common = everyday_words(self.pipe.tokenizer, sorted(words))
        note = None
        if clash or common:
            # Every store picks rare words in the same order, so two stores' first concepts
            # share one. Two concepts on one word would overwrite each other's row: this one
            # moves to free words, with the rows it drew under the old ones (same pictures).
            old = record.meta.token
            record = self._retoken(record, reserved)
            why = (f"is used by {clash[0]} here" if clash else
                   f"is an everyday word ({common[0]!r}), which would change every prompt that says it")
            note = f"its token {old!r} {why}, so it was given {record.meta.token!r}; its pictures are the same."
        if acts_everywhere(record.meta):   # its values are written into the weights
            everywhere = ("it acts on every prompt, named or not (learned with scope=all, or by a "
                          "version of cones before scopes); `cones rm` takes it out again.")
            note = f"{note} Also, {everywhere}" if note else everywhere
        record = dataclasses.replace(record, meta=dataclasses.replace(
            record.meta, hparams={**record.meta.hparams, IMPORTED: time.time()}))
        self.store.put(record)
        try:
            self._apply_resident(record)
        except BaseException:   # it does not fit the live model: not kept (a learn is not either)
            self.store.delete(record.name)
            raise
        return JobResult(concept=record.name, metrics={"note": note} if note else None)

    def _check_fits(self, record: ConceptRecord) -> None:
        """A file of this very model (its fingerprint matched) whose parts do not fit it was
        edited: a Cones 2 residual of another width, a mask on a tensor that is no K/V weight
        were stored as ok and failed every generate, saying to load another base model. The
        methods' own checks, before anything is stored."""
        from cns_daemon.methods.common.kv import check_positions
        from cns_daemon.methods.cones2 import residual_rows
        from cns_daemon.model import kv_weights

        try:
            check_positions(kv_weights(self.pipe.unet), {**record.masks, **{
                name: delta.indices for name, delta in record.deltas.items()}})
            if record.residual is not None:
                residual_rows(record, self.pipe)
        except ModelMismatch as exc:
            raise BadInput(f"This concept file does not fit the model it says it was learned on: "
                           f"{exc.message}", "Export it again with `cones export NAME -o FILE`.") from None

    def _retoken(self, record: ConceptRecord, reserved: Iterable[str] = ()) -> ConceptRecord:
        """The record on free rare words, each carrying the row its old word had: the trained
        row where the method trained one, else the old word's row in this (same) base model."""
        from cns_daemon.methods.cns.layers import stack_for
        from cns_daemon.methods.common.tokens import allocate_token, token_id, token_words

        old = token_words(record.meta.token)
        taken = [m.token for m in self.store.list()] + [record.meta.token] + list(reserved)
        new = token_words(allocate_token(self.pipe.tokenizer, taken, vectors=len(old)))
        embeddings = {}
        for o, n in zip(old, new):
            vec = record.embeddings.get(o)
            if vec is None:   # a live CNS concept on this word has its own row written there
                row = stack_for(self.pipe).base_row(token_id(self.pipe.tokenizer, o))
                vec = row.float().cpu().numpy()
            embeddings[n] = vec
        token = " ".join(new)
        given = record.meta.hparams.get("options_given", {})
        hparams = {**record.meta.hparams, "token": token}
        if "token" in given:   # what `cones show` says it was learned with names the word it has
            hparams["options_given"] = {**given, "token": token}
        meta = dataclasses.replace(record.meta, token=token, hparams=hparams)
        return dataclasses.replace(record, meta=meta, embeddings=embeddings)
