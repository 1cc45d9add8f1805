"""CNS neuron selection: which K/V weights a concept may change (paper 003 §4.2).

Eq. 3 scores K/V weight W[i, j] for a text embedding X (encoder output, tokens × d) as
|W[i, j]| · ||X[:, j]||₂. General neurons: per row the top `top_p` % for any of the shipped
calibration prompts (OR; computed once per base model and cached in memory). Concept neurons =
base AND NOT general, strictly: a general neuron is never trained, however few neurons remain
(the paper keeps them fixed so the pretrained ability stays; a floor that refilled the set
would train exactly those). How many remain is reported with the concept.

Base neurons come one of two ways (CNSParams.selection):
- "eq3", the paper's and the default: per row the top `base_top_p` % for each of the concept's
  captions, ANDed.
- "movement": the `movement_percent` % of all K/V weights that move most in a short probe
  fine-tune of every K/V weight and the token on the concept's photos (prior preservation on),
  which is then undone. On the toy world Eq. 3's base neurons are no better than a random draw
  at finding the weights that carry a concept's look (precision 0.04 at 5 % against the weights
  a full K/V fine-tune moves most, random 0.05) and learning them leaves the look unlearned;
  the probe's set learns it, and over six concepts breaks the model's prior (CNSParams,
  docs/tuning.md "CNS selection").
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from cns_daemon.methods import common as C
from cns_daemon.methods.cns.calibration_prompts import CALIBRATION_PROMPTS
from cns_daemon.methods.cns.layers import CNSStack


@torch.no_grad()
def column_norms(pipe, prompts: list[str], chunk: int = 16) -> torch.Tensor:
    """||X[:, j]||₂ over the tokens of each prompt's encoder output: (n_prompts, d)."""
    out = [C.encode_text(pipe, prompts[i:i + chunk]).float().norm(dim=1)
           for i in range(0, len(prompts), chunk)]
    return torch.cat(out)


def row_top(weight: torch.Tensor, norms: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean (out, in): per row, the top p % of |W[i, j]| · norms[j]."""
    k = max(1, math.ceil(top_p / 100 * weight.shape[1]))
    score = weight.detach().abs().float() * norms.to(weight.device)[None, :]
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    return mask.scatter_(1, score.topk(k, dim=1).indices, True)


def select(weights: dict[str, torch.Tensor], norms: torch.Tensor, top_p: float,
           combine: str) -> dict[str, torch.Tensor]:
    """Per tensor, the per-prompt selections combined with AND (base) or OR (general)."""
    out = {}
    for name, w in weights.items():
        acc = None
        for n in norms:
            m = row_top(w, n, top_p)
            acc = m if acc is None else (acc & m if combine == "and" else acc | m)
        out[name] = acc
    return out


@dataclass
class Selection:
    indices: dict[str, np.ndarray]   # concept neurons per tensor (sorted flat positions)
    base: int                        # base-neuron count
    general: int                     # general-neuron count (the paper's OR)
    base_general: int                # base neurons that are general (left out)


_GENERAL: dict[tuple[str, str, float], dict[str, torch.Tensor]] = {}
# Counts kept at once (oldest out): each is an int16 per K/V weight, some 38 MB for SD 1.5 on its
# device, and a person trying top_p values kept one per value for the service's life.
_GENERAL_KEPT = 2
_CALIBRATION_KEY = hashlib.sha256("\n".join(CALIBRATION_PROMPTS).encode()).hexdigest()[:12]


def general_counts(pipe, stack: CNSStack, top_p: float) -> dict[str, torch.Tensor]:
    """Per K/V weight, how many calibration prompts select it (≥ 1: a general neuron under the
    paper's OR). Computed on the pretrained weights once per base model and top_p."""
    # The digest is one for an fp32 and a bf16 load of a model: the place and dtype of the
    # weights tell the two pipelines' counts (tensors on their devices) apart.
    w = next(iter(stack.params.values()))
    key = (f"{stack.base_fingerprint}:{_CALIBRATION_KEY}", f"{w.device}:{w.dtype}", float(top_p))
    if key not in _GENERAL:
        norms = column_norms(pipe, list(CALIBRATION_PROMPTS))
        counts = {}
        with stack.base_weights():
            for name, w in stack.params.items():
                acc = torch.zeros(w.shape, dtype=torch.int16, device=w.device)
                for n in norms:
                    acc += row_top(w, n, top_p)
                counts[name] = acc
        while len(_GENERAL) >= _GENERAL_KEPT:
            _GENERAL.pop(next(iter(_GENERAL)))
        _GENERAL[key] = counts
    return _GENERAL[key]


def general_neurons(pipe, stack: CNSStack, top_p: float) -> dict[str, torch.Tensor]:
    """The paper's general neurons: selected for ANY calibration prompt (OR)."""
    return {n: c > 0 for n, c in general_counts(pipe, stack, top_p).items()}


def base_neurons(pipe, stack: CNSStack, captions: list[str], top_p: float) -> dict[str, torch.Tensor]:
    """Eq. 3 on the pretrained weights: per row the top `top_p` % for every caption (AND)."""
    with stack.base_weights():
        return select(stack.params, column_norms(pipe, captions), top_p, "and")


def concept_neurons(pipe, stack: CNSStack, captions: list[str], top_p: float,
                    base_top_p: float | None = None,
                    base: dict[str, torch.Tensor] | None = None) -> Selection:
    """Base AND NOT general. Base neurons are the top `base_top_p` % per row (default `top_p`)
    for every caption, general ones the top `top_p` % for any calibration prompt: with a wider
    base percentile the concept keeps the neurons its captions rank high that no calibration
    prompt ranks among its very top. `base` (boolean masks, e.g. from `movement_base`)
    replaces the Eq. 3 base neurons."""
    general = general_neurons(pipe, stack, top_p)
    if base is None:
        base = base_neurons(pipe, stack, captions, top_p if base_top_p is None else base_top_p)
    out, n_base, n_shared = {}, 0, 0
    for name in base:
        n_base += int(base[name].sum())
        n_shared += int((base[name] & general[name]).sum())
        idx = C.mask_indices(base[name] & ~general[name])
        if len(idx):
            out[name] = idx
    return Selection(out, n_base, sum(int(g.sum()) for g in general.values()), n_shared)


def general_share(pipe, stack: CNSStack, indices: dict[str, np.ndarray], top_p: float) -> float:
    """Share of `indices` that are general neurons (0 for every concept CNS learns)."""
    general = general_neurons(pipe, stack, top_p)
    total = sum(len(i) for i in indices.values())
    hit = sum(int(general[n].reshape(-1)[torch.as_tensor(i)].sum()) for n, i in indices.items())
    return hit / total if total else 0.0


def movement_base(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                  percent: float) -> dict[str, torch.Tensor]:
    """Boolean masks of the `percent` % of all weights (pooled over the tensors, not per row:
    a concept's look sits in a few tensors) whose |after − before| is largest."""
    moved = {n: (after[n].detach().float() - before[n].float()).abs().reshape(-1) for n in before}
    flat = torch.cat(list(moved.values()))
    k = max(1, math.ceil(percent / 100 * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[flat.topk(k).indices] = True
    out, at = {}, 0
    for n, m in moved.items():
        out[n] = keep[at:at + m.numel()].view(before[n].shape)
        at += m.numel()
    return out
