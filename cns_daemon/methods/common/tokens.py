"""Concept tokens: the tokenizer is never modified. Each concept borrows one rare token that
already exists in the CLIP vocabulary (a single BPE id, "sks"-like) and, for methods that learn
one, replaces that token's row of the text encoder's input embedding while it is applied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from cns_daemon.api.errors import BadInput, Conflict

_RARE_RE = re.compile(r"[b-df-hj-np-tv-xz]{3,4}")  # consonants only: not an ordinary word
_BLOCKED = frozenset({"fck", "fkn", "fml", "wtf", "stfu", "nsfw", "kkk", "pnp", "bdsm"})


def rare_tokens(tokenizer) -> tuple[str, ...]:
    """Candidate concept tokens, rarest first (deterministic for a given vocabulary)."""
    vocab = tokenizer.get_vocab()
    by_id = sorted(((i, s) for s, i in vocab.items() if s.endswith("</w>")), reverse=True)
    out = []
    for i, s in by_id:   # high ids first: the last, rarest merges of the BPE
        word = s[:-4]
        if not _RARE_RE.fullmatch(word) or word in _BLOCKED:
            continue
        if any(word.count(c) >= 3 for c in word):
            continue
        if tokenizer(word, add_special_tokens=False).input_ids != [i]:
            continue
        out.append(word)
    return tuple(out)


def allocate_token(tokenizer, taken: set[str] | list[str], requested: str | None = None) -> str:
    """The first rare token no other concept uses, or `requested` if it is a valid free one."""
    taken = set(taken)
    if requested:
        if len(token_ids(tokenizer, requested)) != 1:
            raise BadInput(f"Token {requested!r} is not a single token of the vocabulary.",
                           "Leave the token unset to pick a rare one automatically.")
        if requested in taken:
            raise Conflict(f"Token {requested!r} is already used by another concept.")
        return requested
    for word in rare_tokens(tokenizer):
        if word not in taken:
            return word
    raise Conflict("Every rare token is taken.", "Remove concepts you no longer need.")


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def token_id(tokenizer, token: str) -> int:
    ids = token_ids(tokenizer, token)
    if len(ids) != 1:
        raise BadInput(f"{token!r} is not a single token of the vocabulary.")
    return ids[0]


@dataclass
class SavedRows:
    """Rows of the input embedding as they were before `write_rows`, for an exact undo."""
    weight: torch.nn.Parameter
    rows: dict[int, torch.Tensor]


def write_rows(text_encoder, rows: dict[int, np.ndarray | torch.Tensor]) -> SavedRows:
    weight = text_encoder.get_input_embeddings().weight
    saved = SavedRows(weight, {})
    with torch.no_grad():
        for i, vec in rows.items():
            if i not in saved.rows:
                saved.rows[i] = weight[i].detach().clone()
            weight[i] = torch.as_tensor(vec).to(weight.device, weight.dtype)
    return saved


def restore_rows(saved: SavedRows) -> None:
    with torch.no_grad():
        for i, old in saved.rows.items():
            saved.weight[i] = old


def embedding_rows(text_encoder, tokenizer, embeddings: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Record form (token → vector) to row form (id → vector), checking the width."""
    width = text_encoder.get_input_embeddings().weight.shape[1]
    out = {}
    for token, vec in embeddings.items():
        vec = np.asarray(vec)
        if vec.shape != (width,):
            raise BadInput(f"Embedding for {token!r} has shape {vec.shape}, the model needs ({width},).")
        out[token_id(tokenizer, token)] = vec
    return out


class TrainableRow:
    """Makes one token's input-embedding row a separate trainable parameter while active: a
    forward hook on the embedding swaps it in wherever that id occurs, so no gradient is ever
    computed for the other 49k rows and the embedding table itself is not touched."""

    def __init__(self, text_encoder, tid: int, init: torch.Tensor | None = None):
        self.embedding = text_encoder.get_input_embeddings()
        self.tid = tid
        start = self.embedding.weight[tid] if init is None else init
        self.param = torch.nn.Parameter(start.detach().to(torch.float32).clone())
        self._handle = None

    def _hook(self, module, inputs, output):
        ids = inputs[0]
        hit = (ids == self.tid).unsqueeze(-1)
        return torch.where(hit, self.param.to(output.dtype), output)

    def __enter__(self) -> "TrainableRow":
        self._handle = self.embedding.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
