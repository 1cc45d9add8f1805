"""Prior-preservation class images: what the base model draws for "a photo of a <class>".

They are made once per class word and cached as PNGs under `cache_dir/class-images/<class>/`,
in a sub-folder named by the weights that drew them (`drawn_by`, a model fingerprint) and the
settings that made them (count is not part of it: asking for more images later adds to the same
folder). The weights matter: CNS draws its class images with the base weights, Cones with the
live ones, which carry the CNS concepts learned so far; one folder for both would let a Cones
learn fill the "base model" cache with a changed model's pictures.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from cns_daemon.methods.base import CancelToken, ProgressFn, ProgressReporter
from cns_daemon.methods.data import to_tensor

PROMPT = "a photo of a {cls}"


def prior_prompt(class_word: str) -> str:
    return PROMPT.format(cls=class_word)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "class"


def _folder(cache_dir: Path, class_word: str, drawn_by: str, size: int, steps: int,
            guidance: float, seed: int) -> Path:
    return (Path(cache_dir) / "class-images" / _slug(class_word)
            / f"w{_slug(drawn_by)[:16]}-s{size}-n{steps}-g{guidance:g}-seed{seed}")


def class_images(pipe, class_word: str, n: int, *, size: int, drawn_by: str, steps: int = 20,
                 guidance: float | None = None, seed: int = 0, cache_dir: Path | None = None,
                 progress: ProgressFn | None = None, cancel: CancelToken | None = None,
                 batch: int = 4,
                 drawing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> torch.Tensor:
    """`n` class images as (n, 3, size, size) in [-1, 1]; image i is always made with seed+i,
    so a cached set and a fresh one are the same pictures on one machine (on another device or
    precision: the same compositions, other rounding). `drawn_by` names the weights that
    draw them (a fingerprint), put in place by `drawing()` for each batch: the cache never hands
    out another model's images. Between batches, with the live model back, a generate waiting
    runs (`CancelToken.pause_point`): drawing 48 images kept one waiting 20-30 s."""
    if guidance is None:   # what the model generates with by default (model.recommended_guidance)
        from cns_daemon.model import recommended_guidance

        guidance = recommended_guidance(pipe)
    if not drawn_by:
        raise ValueError("class_images needs the fingerprint of the weights that draw them")
    folder = (_folder(cache_dir, class_word, drawn_by, size, steps, guidance, seed)
              if cache_dir else None)
    images: dict[int, Image.Image] = {}
    if folder is not None and folder.is_dir():
        for i in range(n):
            f = folder / f"{i:04d}.png"
            if f.is_file():
                try:
                    with Image.open(f) as img:
                        images[i] = img.convert("RGB")
                except OSError:
                    pass  # a damaged cache file is simply made again
    missing = [i for i in range(n) if i not in images]
    report = ProgressReporter(progress, "class-images", len(missing))
    done = 0
    for start in range(0, len(missing), batch):
        if cancel is not None:
            cancel.check()
            cancel.pause_point(contextlib.nullcontext)   # nothing of the learn is live yet
        part = missing[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + i) for i in part]
        with drawing():
            out = pipe([prior_prompt(class_word)] * len(part), num_inference_steps=steps,
                       guidance_scale=guidance, generator=gens, height=size, width=size,
                       output_type="pil", callback_on_step_end=_checking(cancel)).images
        for i, img in zip(part, out):
            images[i] = img
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{i:04d}.{os.getpid()}.tmp.png"
                img.save(tmp)
                os.replace(tmp, folder / f"{i:04d}.png")  # never a half-written file
        done += len(part)
        report(done)
    return torch.stack([to_tensor(images[i].resize((size, size))) for i in range(n)])


def _checking(cancel: CancelToken | None):
    """A step callback that stops a batch at its next denoising step when the job is cancelled
    or the service stops (a batch of SD 1.5 class images takes minutes on a CPU)."""
    if cancel is None:
        return None

    def on_step_end(_pipe, _i, _t, kwargs):
        cancel.check()
        return kwargs
    return on_step_end
