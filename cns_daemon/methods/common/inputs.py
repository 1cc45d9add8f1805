"""What every method's training starts from, made once here: the concept's photos (augmented
variants, captions carrying its token), their VAE latents, and the prior-preservation latents of
class images. The methods differ only in which weights draw the class images (CNS: the base
model; Cones: the live weights) and whether they want any (Cones 2 does not)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cns_daemon.methods.base import CancelToken, LearnSpec, ProgressFn
from cns_daemon.methods.data import PhotoSet, prepare_photos, resolution

from .masks import object_masks
from .prior import class_images
from .tokens import allocate_token
from .training import encode_pixels


@dataclass
class Prepared:
    token: str                     # "" for a method that trains no token (Cones 2)
    photos: PhotoSet
    latents: torch.Tensor          # (n_photos, n_variants, 4, h, w)
    prior: torch.Tensor | None     # class-image latents; None without prior preservation
    masks: torch.Tensor            # (n_photos, n_variants, 1, size, size) object masks (masks.py)
    found: torch.Tensor            # (n_photos,) bool: the object was told from its background


@dataclass(frozen=True)
class Prior:
    """How many class images, drawn with how many steps, by which weights: `drawn_by` is their
    fingerprint (the cache key) and `drawing` a context that puts those weights in place."""
    images: int
    steps: int
    drawn_by: str
    drawing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def concept_token(tokenizer, in_use: list, requested: str | None = None, vectors: int = 1) -> str:
    """`vectors` rare tokens (space-joined) none of the records `in_use` has (or `requested`,
    if free)."""
    return allocate_token(tokenizer, {r.meta.token for r in in_use} - {""}, requested or None,
                          vectors)


def prepare(pipe, photos: list[Path], spec: LearnSpec, token: str, *, variants: int,
            prior: Prior | None = None, progress: ProgressFn | None = None,
            cancel: CancelToken | None = None) -> Prepared:
    size = resolution(pipe)
    photo_set = prepare_photos(photos, size, token, spec.class_word, captions=spec.captions,
                               variants=variants, seed=spec.seed)
    latents = encode_pixels(pipe, photo_set.pixels.flatten(0, 1)).unflatten(0, photo_set.pixels.shape[:2])
    prior_latents = None
    if prior is not None and prior.images > 0:
        pixels = class_images(pipe, spec.class_word, prior.images, size=size, drawn_by=prior.drawn_by,
                              steps=prior.steps, seed=spec.seed, cache_dir=spec.cache_dir,
                              progress=progress, cancel=cancel, drawing=prior.drawing)
        prior_latents = encode_pixels(pipe, pixels)
    masks, found = object_masks(photo_set.pixels)
    return Prepared(token, photo_set, latents, prior_latents, masks, found)
