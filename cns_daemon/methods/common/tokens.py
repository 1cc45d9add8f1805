"""Concept tokens: the tokenizer is never modified. Each concept borrows rare tokens that
already exist in the CLIP vocabulary (single BPE ids, "sks"-like) and, for methods that learn
them, replaces those tokens' rows of the text encoder's input embedding while it is applied.

A concept's token is one rare word ("httr") or, with several token vectors, that many rare words
in a row ("httr rcn shld"): textual inversion's multi-vector form. One row has to carry colour,
pattern and second colour at once through the encoder; on the toy-world fixture's 2-layer
encoder it cannot (docs/tuning.md "Token vectors per concept").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import islice

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


MAX_VECTORS = 8   # token vectors (rare words) one concept may have
# A token a person asks for must be rare: one the service would pick itself (`rare_tokens`), or
# one of the vocabulary's last merges (ids from this share of it on: "sks", "ohwx"); never an
# everyday word, since a concept acts wherever its word is said ("a photo of a star"), named or not.
RARE_FROM = 0.8


def everyday_words(tokenizer, words: list[str], rare: tuple[str, ...] | None = None) -> list[str]:
    """Those of `words` a concept may not be named by: not one token of the vocabulary, or an
    everyday word (`RARE_FROM`), which would make the concept act wherever the word is said, or
    a special token (the start and end of every prompt). `rare`: `rare_tokens(tokenizer)` where
    the caller has it already."""
    rare = set(rare_tokens(tokenizer) if rare is None else rare)
    limit = RARE_FROM * len(tokenizer)
    out = []
    for w in words:
        ids = token_ids(tokenizer, w)
        if (len(ids) != 1 or (w not in rare and ids[0] < limit)
                or ids[0] in tokenizer.all_special_ids):
            out.append(w)
    return out


def token_words(token: str) -> list[str]:
    """A concept token's words: one per token vector."""
    return token.split()


def allocate_token(tokenizer, taken: set[str] | list[str], requested: str | None = None,
                   vectors: int = 1) -> str:
    """`vectors` rare words no other concept uses, space-joined, or `requested` (that many
    words, each a single free token of the vocabulary). `taken` holds concept tokens, each of
    one or more words."""
    # taken by token id: a store of an earlier version may hold "HTTR", which is "httr"
    used = {i for t in taken for w in token_words(t) for i in token_ids(tokenizer, w)}
    if requested:
        ids = [token_ids(tokenizer, w) for w in token_words(requested)]
        if len(ids) != vectors or any(len(i) != 1 for i in ids):
            raise BadInput(f"Token {requested!r} is not {vectors} single token"
                           f"{'s' if vectors > 1 else ''} of the vocabulary.",
                           "Leave the token unset to pick rare ones automatically.")
        if any(i[0] in tokenizer.all_special_ids for i in ids):
            raise BadInput(f"Token {requested!r} is a special token of the text encoder (the start "
                           "or end of every prompt): a concept on it would act on every prompt.",
                           "Leave the token unset to pick a rare one automatically.")
        # as the vocabulary spells it: "HTTR" is the token "httr", and passed as another
        # concept's token's free twin it changed that concept's pictures
        words = [vocabulary_word(tokenizer, i[0], w) for i, w in zip(ids, token_words(requested))]
        rare = rare_tokens(tokenizer)
        common = everyday_words(tokenizer, words, rare)
        if common:
            free = list(islice((w for w in rare if token_ids(tokenizer, w)[0] not in used), 1))
            raise BadInput(f"{common[0]!r} is an everyday word of the vocabulary: a concept on it "
                           "would act on every prompt that says it.",
                           "Leave the token unset to pick a rare one automatically"
                           + (f", or give a free rare one such as {free[0]!r}." if free else "."))
        if used & {i[0] for i in ids}:
            raise Conflict(f"Token {requested!r} is already used by another concept (or a learn under way).",
                           "Give another token, or leave it unset to pick a free one.")
        if len(set(words)) != len(words):
            raise BadInput(f"Token {requested!r} repeats a word.")
        return " ".join(words)
    rare = rare_tokens(tokenizer)
    free = list(islice((w for w in rare if token_ids(tokenizer, w)[0] not in used), vectors))
    if len(free) < vectors:   # CLIP's vocabulary has 802: that many one-vector concepts a store
        have = sum(token_ids(tokenizer, w)[0] not in used for w in rare)
        raise Conflict(f"Every rare token is taken: this vocabulary has {len(rare)} rare words, "
                       f"{have} of them free, and the concept needs {vectors}.",
                       "Remove concepts you no longer need (a concept learned with more than one "
                       "token vector holds that many).")
    return " ".join(free)


def vocabulary_word(tokenizer, token_id: int, written: str) -> str:
    """The word `token_id` stands for, as the vocabulary has it (lower case), or `written` where
    that spelling would not read back as the token."""
    word = tokenizer.decode([token_id]).strip()
    return word if token_ids(tokenizer, word) == [token_id] else written


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def token_id(tokenizer, token: str) -> int:
    ids = token_ids(tokenizer, token)
    if len(ids) != 1:
        raise BadInput(f"{token!r} is not a single token of the vocabulary.")
    return ids[0]


def concept_ids(tokenizer, token: str) -> list[int]:
    """The ids of a concept token's words, one each."""
    return [token_id(tokenizer, w) for w in token_words(token)]


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


class TrainableRows:
    """Makes a concept token's input-embedding rows (one per word) a separate trainable
    parameter (words, d) while active: a forward hook on the embedding swaps them in wherever
    their ids occur, so no gradient is ever computed for the other 49k rows and the embedding
    table itself is not touched. `init` (d,), if given, starts every row."""

    def __init__(self, text_encoder, tokenizer, token: str, init: torch.Tensor | None = None):
        self.embedding = text_encoder.get_input_embeddings()
        self.words = token_words(token)
        self.tids = concept_ids(tokenizer, token)
        start = (self.embedding.weight[self.tids] if init is None
                 else init.reshape(1, -1).expand(len(self.tids), -1))
        self.param = torch.nn.Parameter(start.detach().to(torch.float32).clone())
        self._handle = None

    def embeddings(self) -> dict[str, np.ndarray]:
        """Record form: word → trained row."""
        rows = self.param.detach().cpu().numpy().astype(np.float32)
        return {w: rows[j] for j, w in enumerate(self.words)}

    def _hook(self, module, inputs, output):
        ids = inputs[0]
        for j, tid in enumerate(self.tids):
            hit = (ids == tid).unsqueeze(-1)
            output = torch.where(hit, self.param[j].to(output.dtype), output)
        return output

    def __enter__(self) -> "TrainableRows":
        self._handle = self.embedding.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
