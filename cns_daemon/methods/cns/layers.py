"""The live CNS concepts of one pipeline, as an ordered stack of sparse layers.

CNS is fusion-free: learned concepts stay written into the UNet's K/V weights (and their token
rows into the text encoder's input embedding). Each applied concept is a layer that remembers
what it covered: its positions per tensor and the values *below* it there (what the weights held
before it was written, as seen through the layers applied earlier).

Removing the top layer writes its `below` values back: bit-exact. Removing an older layer L:
- positions no later layer covers get L's `below` values back: bit-exact;
- positions a later layer M also covers (shared neurons) keep M's live values, and M's `below`
  there becomes L's `below`. So M keeps working as it was trained (its values were learned with
  L present, regularised toward L's values by λ₁), and removing M afterwards too brings those
  positions back to what they were before L: removing every concept, in any order, restores the
  base weights bit-exactly.

A scoped concept (hparams scope `concept`, the default since 2026-12-04) is not written into the
weights: its layer covers no positions, and its values go to the UNet's token scope
(common/scope.py), which applies them only to prompts with its token, over whatever the weights
hold below at that prompt. Records without a scope are from before and are written, as the paper's CNS is.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch

from cns_daemon.api.errors import Conflict, NotFound
from cns_daemon.methods.common import (SavedRows, embedding_rows, kv_weights,
                                       restore_rows, anchor, scope_of, token_scope, write_rows)
from cones_store.records import ConceptRecord


@dataclass
class Layer:
    record: ConceptRecord
    indices: dict[str, torch.Tensor]   # tensor name → flat positions (int64, sorted)
    below: dict[str, torch.Tensor]     # tensor name → values under this layer at `indices`
    rows: SavedRows                    # token-embedding rows as they were before

    @property
    def name(self) -> str:
        return self.record.name


class CNSStack:
    def __init__(self, pipe):
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.params = kv_weights(pipe.unet)
        self.layers: list[Layer] = []
        from cns_daemon.model import base_fingerprint
        # Taken now at the latest, while no CNS concept is written: the base model's identity.
        self._base_fingerprint = base_fingerprint(pipe)

    @property
    def base_fingerprint(self) -> str:
        return self._base_fingerprint

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def records(self) -> list[ConceptRecord]:
        return [layer.record for layer in self.layers]

    def base_row(self, token_id: int) -> torch.Tensor:
        """Row `token_id` of the input embedding as the base model has it, also while a live
        concept has written its trained row there."""
        for layer in self.layers:
            if token_id in layer.rows.rows:
                return layer.rows.rows[token_id]
        return self.text_encoder.get_input_embeddings().weight[token_id].detach()

    def push(self, record: ConceptRecord) -> Layer:
        if record.name in self.names():
            raise Conflict(f"Concept {record.name!r} is already applied.")
        indices, below, scoped = {}, {}, {}
        in_scope = scope_of(record) == "concept"
        with torch.no_grad():
            for name, delta in record.deltas.items():
                p = self.params.get(name)
                if p is None:
                    raise NotFound(f"{record.name}: the model has no K/V tensor {name!r}.")
                if tuple(p.shape) != tuple(delta.shape):
                    raise Conflict(f"{record.name}: tensor {name} has shape {tuple(p.shape)}, "
                                   f"the record {tuple(delta.shape)}.")
            # Everything that can refuse the record comes before the first write: a refusal
            # half-way left values written and a scope entry with no layer to remove them.
            new_rows = embedding_rows(self.text_encoder, self.tokenizer, record.embeddings)
            where = anchor(self.tokenizer, record.meta.token, record.meta.class_word) if in_scope else None
            if in_scope:   # its values, not written: the scope adds them over what lies below
                scoped = {n: (np.asarray(d.indices, np.int64), d.values) for n, d in record.deltas.items()}
            for name, delta in (() if in_scope else record.deltas.items()):
                p = self.params[name]
                idx = torch.as_tensor(np.asarray(delta.indices, np.int64)).to(p.device)
                flat = p.data.view(-1)
                values = torch.as_tensor(np.asarray(delta.values)).to(p.device, p.dtype)
                # index_select/index_copy_ rather than flat[idx]: same result for unique
                # indices, and they stay fast when the CPU is contended (advanced indexing
                # took ~40 ms per tensor on a loaded 2-core machine; start-up does 32 per concept).
                below[name] = flat.index_select(0, idx)
                indices[name] = idx
                flat.index_copy_(0, idx, values)
        if in_scope:
            token_scope(self.unet).add(record.name, where, scoped)
        rows = write_rows(self.text_encoder, new_rows)
        if in_scope:   # its values live in the scope now (in host memory): no second copy
            # of them is kept with it (records() serves tokens and scopes; tuned() reads scope all)
            record = replace(record, deltas={})
        layer = Layer(record, indices, below, rows)
        self.layers.append(layer)
        return layer

    def pop(self, name: str) -> None:
        pos = self.names().index(name) if name in self.names() else -1
        if pos < 0:
            raise NotFound(f"Concept {name!r} is not applied.")
        layer = self.layers.pop(pos)
        later = self.layers[pos:]
        with torch.no_grad():
            for tname, idx in layer.indices.items():
                below = layer.below[tname]
                handed = np.zeros(len(idx), bool)   # positions a later layer took over
                idx_np = idx.cpu().numpy()
                for upper in later:                  # nearest later layer first
                    if tname not in upper.indices:
                        continue
                    up_idx = upper.indices[tname].cpu().numpy()
                    _, mine, theirs = np.intersect1d(idx_np, up_idx, assume_unique=True,
                                                     return_indices=True)
                    keep = ~handed[mine]
                    mine, theirs = mine[keep], theirs[keep]
                    if len(mine):
                        upper.below[tname][torch.as_tensor(theirs)] = below[torch.as_tensor(mine)]
                        handed[mine] = True
                # index_copy_ as in push (a boolean-masked assignment took ~3x as long)
                flat = self.params[tname].data.view(-1)
                if handed.any():
                    free = torch.as_tensor(np.flatnonzero(~handed)).to(idx.device)
                    flat.index_copy_(0, idx.index_select(0, free), below.index_select(0, free))
                else:
                    flat.index_copy_(0, idx, below)
        restore_rows(layer.rows)
        if scope_of(layer.record) == "concept":
            token_scope(self.unet).remove(name)

    def base_values(self, tname: str, indices: torch.Tensor) -> torch.Tensor:
        """The pretrained values at `indices`: the bottom-most layer's `below` where a layer
        covers a position, the live value elsewhere."""
        values = self.params[tname].detach().reshape(-1)[indices].clone()
        want = indices.cpu().numpy()
        for layer in reversed(self.layers):        # top to bottom: the bottom one wins
            if tname not in layer.indices:
                continue
            _, a, b = np.intersect1d(want, layer.indices[tname].cpu().numpy(),
                                     assume_unique=True, return_indices=True)
            values[torch.as_tensor(a)] = layer.below[tname][torch.as_tensor(b)].to(values.dtype)
        return values

    def tuned(self, records: list[ConceptRecord] | None = None) -> dict[str, np.ndarray]:
        """Union of the positions the given (default: applied) concepts tuned, per tensor."""
        out: dict[str, np.ndarray] = {}
        for rec in (self.records() if records is None else records):
            for tname, delta in rec.deltas.items():
                idx = np.asarray(delta.indices, np.int64)
                out[tname] = np.union1d(out[tname], idx) if tname in out else idx
        return out

    @contextlib.contextmanager
    def base_weights(self):
        """Inside: the K/V weights are the pretrained ones (token rows untouched, they only
        matter for the concepts' own tokens); outside again exactly as before."""
        saved = []
        with torch.no_grad():
            for tname in {t for layer in self.layers for t in layer.indices}:
                idx = torch.unique(torch.cat([l.indices[tname] for l in self.layers
                                              if tname in l.indices]))
                flat = self.params[tname].data.view(-1)
                saved.append((flat, idx, flat[idx].clone()))
                flat[idx] = self.base_values(tname, idx).to(flat.dtype)
        try:
            yield
        finally:
            with torch.no_grad():
                for flat, idx, live in saved:
                    flat[idx] = live


_STACKS: "weakref.WeakKeyDictionary[torch.nn.Module, CNSStack]" = weakref.WeakKeyDictionary()


def stack_for(pipe) -> CNSStack:
    """The pipeline's stack (made on first use, when no CNS concept is written yet)."""
    stack = _STACKS.get(pipe.unet)
    if stack is None:
        stack = _STACKS[pipe.unet] = CNSStack(pipe)
    return stack
