"""The fixture's text vocabulary: which of CLIP's 49,408 tokens the toy world's captions use, a
compact embedding that trains only those rows, and where the other rows start.

Why: the world's captions use about 50 distinct tokens. Training the full 49,408-row table would
spend an optimiser step on 6.3 M untouched values (a tenth of each training step on the CPU),
and would leave the untouched rows at their tiny initial scale, far from where trained words
live. Real CLIP has trained every row; a personal concept's rare token starts from one of them.
So the untrained rows are finally drawn from the trained rows' own statistics (per-channel mean
and spread), and a new rare token starts where words live (`init_untrained_rows`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..methods.common.tokens import token_id

from .world import (BACKGROUNDS, COLORS, LOOK_NAMING, PATTERNS, PLACING, SHAPES, ObjectSpec, SceneSpec, caption,
                    random_object)


def caption_token_ids(tokenizer, n_scenes: int = 400, seed: int = 0) -> list[int]:
    """Every token id the world's captions can contain (plus BOS/EOS), sorted. Enumerates each
    word of the vocabulary in every template and look naming, so no caption can fall outside."""
    rng = np.random.default_rng(seed)
    texts = [""]
    for i in range(n_scenes):
        objs = tuple(random_object(rng) for _ in range(1 + i % 2))
        scene = SceneSpec(objs, BACKGROUNDS[i % len(BACKGROUNDS)])
        for template in range(3):
            for look in LOOK_NAMING:
                for with_color in (True, False):
                    for with_background in (True, False):
                        for before in (False, True):
                            texts.append(caption(scene, template=template, look=look, with_color=with_color,
                                                 with_background=with_background, before=before,
                                                 placing=PLACING[i % len(PLACING)]))
    texts += list(SHAPES) + list(COLORS)
    ids: set[int] = set()
    for batch in range(0, len(texts), 512):
        for row in tokenizer(texts[batch:batch + 512]).input_ids:
            ids.update(row)
    return sorted(ids)


class CompactEmbedding(nn.Module):
    """Stands in for the text encoder's token embedding while training: looks full-vocabulary
    ids up in a small trainable table of the used rows. An unused id is an error, not a zero.

    `merged` adds virtual ids past the vocabulary (vocabulary size + i for the i-th tuple): each
    is one input position whose vector is the sum of its words' rows over √k (so its scale is a
    word's). Only training captions hold them (see `LookMerger`)."""

    def __init__(self, full: nn.Embedding, used: list[int], merged: Sequence[tuple[int, ...]] = ()):
        super().__init__()
        self.rows = nn.Parameter(full.weight.detach()[used].clone())
        self.vocab = full.num_embeddings
        lookup = torch.full((self.vocab,), -1, dtype=torch.long)
        lookup[torch.tensor(used)] = torch.arange(len(used))
        self.register_buffer("lookup", lookup, persistent=False)
        mix = torch.zeros(len(merged), len(used))
        for i, words in enumerate(merged):
            for w in words:
                if int(lookup[w]) < 0:
                    raise ValueError(f"merged token id {w} is outside the world's caption vocabulary")
                mix[i, lookup[w]] += 1.0 / math.sqrt(len(words))
        self.register_buffer("mix", mix, persistent=False)
        self.used = list(used)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        virtual = input_ids >= self.vocab
        idx = self.lookup[input_ids.clamp(max=self.vocab - 1)]
        bad = torch.where(virtual, input_ids >= self.vocab + len(self.mix), idx < 0)
        if bool(bad.any()):
            ids = sorted(set(input_ids[bad].tolist()))[:5]
            raise ValueError(f"token ids {ids} are outside the world's caption vocabulary")
        out = self.rows[idx.clamp(min=0)]
        if bool(virtual.any()):
            out = out.clone()
            out[virtual] = self.mix[input_ids[virtual] - self.vocab] @ self.rows
        return out

    @torch.no_grad()
    def write_back(self, full: nn.Embedding) -> None:
        full.weight[torch.tensor(self.used)] = self.rows.detach().to(full.weight.dtype)


@torch.no_grad()
def init_untrained_rows(weight: torch.Tensor, used: list[int], seed: int) -> dict[str, float]:
    """Draw every row not in `used` from N(mean, std²) of the used rows, per channel (seeded).
    Returns the mean row norms of both sets for the record."""
    keep = torch.zeros(len(weight), dtype=torch.bool)
    keep[torch.tensor(used)] = True
    trained = weight[keep].float()
    mean, std = trained.mean(0), trained.std(0)
    gen = torch.Generator().manual_seed(seed)
    fresh = mean + std * torch.randn(int((~keep).sum()), weight.shape[1], generator=gen)
    weight[~keep] = fresh.to(weight.dtype)
    return {"trained_row_norm": float(trained.norm(dim=1).mean()),
            "untrained_row_norm": float(fresh.norm(dim=1).mean())}


class LookMerger:
    """One-token looks for training captions. A single patterned object named in full, "a red
    star with yellow stripes", becomes "a ⟨red+yellow+stripes⟩ star": its main colour, second
    colour and pattern words leave the caption and one virtual position holding the sum of
    their rows stands before the shape word.

    Why: a personal concept is one learned vector in the prompt (textual inversion, Cones 2's
    residual). In real Stable Diffusion that works because CLIP has met single words that carry
    a whole look (a "zebra" is its colours and its stripes) and decodes points between them. The
    toy world's words each name one attribute, so its encoder never had to read a whole look
    from one position, and one learned row could not hold one (docs/tuning.md, "Token vectors
    per concept"). Summed words are a word for every look without 168 new vocabulary entries,
    and they keep the space compositional: a point between them is a look too."""

    def __init__(self, tokenizer, vocab_size: int):
        self.word = {w: token_id(tokenizer, w) for w in (*COLORS, *PATTERNS, *SHAPES, "with")}
        self.pad = tokenizer.pad_token_id
        self.combos = [(c, s, p) for c in COLORS for s in COLORS if s != c for p in PATTERNS if p != "solid"]
        self.index = {combo: vocab_size + i for i, combo in enumerate(self.combos)}

    def merged_words(self) -> list[tuple[int, ...]]:
        """The word ids each virtual id sums, in virtual-id order (for CompactEmbedding)."""
        return [tuple(self.word[w] for w in combo) for combo in self.combos]

    def apply(self, ids: torch.Tensor, obj: ObjectSpec) -> torch.Tensor:
        """`ids` (one padded caption naming `obj` in full, with its colour) with the look merged."""
        w = self.word
        run = [w[obj.color], w[obj.shape], w["with"], w[obj.second_color], w[obj.pattern]]
        seq = ids.tolist()
        for i in range(len(seq) - len(run) + 1):
            if seq[i:i + len(run)] == run:
                new = seq[:i] + [self.index[(obj.color, obj.second_color, obj.pattern)], w[obj.shape]] + seq[i + len(run):]
                return torch.tensor(new + [self.pad] * (len(seq) - len(new)), dtype=ids.dtype)
        raise ValueError(f"caption does not name {obj} in full")
