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

import numpy as np
import torch
from torch import nn

from .world import (BACKGROUNDS, COLORS, LOOK_NAMING, PLACING, SHAPES, SceneSpec, caption, random_object)


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
                        texts.append(caption(scene, template=template, look=look, with_color=with_color,
                                             with_background=with_background,
                                             placing=PLACING[i % len(PLACING)]))
    texts += list(SHAPES) + list(COLORS)
    ids: set[int] = set()
    for batch in range(0, len(texts), 512):
        for row in tokenizer(texts[batch:batch + 512]).input_ids:
            ids.update(row)
    return sorted(ids)


class CompactEmbedding(nn.Module):
    """Stands in for the text encoder's token embedding while training: looks full-vocabulary
    ids up in a small trainable table of the used rows. An unused id is an error, not a zero."""

    def __init__(self, full: nn.Embedding, used: list[int]):
        super().__init__()
        self.rows = nn.Parameter(full.weight.detach()[used].clone())
        lookup = torch.full((full.num_embeddings,), -1, dtype=torch.long)
        lookup[torch.tensor(used)] = torch.arange(len(used))
        self.register_buffer("lookup", lookup, persistent=False)
        self.used = list(used)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        idx = self.lookup[input_ids]
        if bool((idx < 0).any()):
            bad = sorted(set(input_ids[idx < 0].tolist()))[:5]
            raise ValueError(f"token ids {bad} are outside the world's caption vocabulary")
        return self.rows[idx]

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
