"""Shared by the method tests: tiny photos with a look captions cannot say, fast options,
snapshots of every weight, a seeded stand-in for CNS's neuron choice, synthetic CNS records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cns_daemon.methods import cns
from cns_daemon.methods import common as C
from cones_store.records import ConceptMeta, ConceptRecord, SparseDelta

FAST = {"prior_images": 2, "prior_steps": 2, "prior_batch": 1, "variants": 2}
MOVEMENT = {**FAST, "selection": "movement", "probe_steps": 3}   # CNS only
CONES = {**FAST, "sparsity": 2.0, "tune_steps": 2}   # Cones: 2 % of K/V, two steps on their values


def photos(folder: Path, color=(200, 30, 30), n=3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        a = np.full((40, 40, 3), 235, np.uint8)
        a[6 + 2 * i:30, 8:32 - i] = color
        a[12:16, 8:32 - i] = (20, 20, 20)  # a stripe: the look a caption cannot say
        Image.fromarray(a).save(folder / f"{i}.png")
        out.append(folder / f"{i}.png")
    return out


def fixed_selection(fraction: float, seed: int):
    """A stand-in for `cns.choose_neurons` (the random tiny model's text encoder makes every
    prompt rank neurons alike, so Eq. 3 selects almost nothing there): a seeded random subset."""
    def select(pipe, stack, *args, **kwargs):
        rng = np.random.default_rng(seed)
        return cns.Selection({n: np.sort(rng.choice(p.numel(), max(1, int(p.numel() * fraction)),
                                                    replace=False))
                              for n, p in stack.params.items()}, 1, 0, 0)
    return select


def snapshot(pipe) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    out.update({f"text.{k}": v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()})
    out.update({f"vae.{k}": v.detach().clone() for k, v in pipe.vae.state_dict().items()})
    return out


def changed(pipe, before) -> list[str]:
    now = snapshot(pipe)
    return [k for k in before if not torch.equal(before[k], now[k])]


def synthetic(pipe, name: str, token: str, seed: int, fraction=0.1, scope: str | None = None
              ) -> ConceptRecord:
    """A CNS record with random values; `scope` None: a record from before scopes (written)."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for n, p in list(C.kv_weights(pipe.unet).items())[:4]:
        idx = np.sort(rng.choice(p.numel(), int(p.numel() * fraction), replace=False))
        deltas[n] = SparseDelta(idx, rng.normal(size=len(idx)).astype(np.float32), tuple(p.shape))
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    hparams = {} if scope is None else {"scope": scope}
    return ConceptRecord(ConceptMeta(name, "cns", "star", token, hparams=hparams), deltas=deltas,
                         embeddings={token: rng.normal(size=width).astype(np.float32)})
