"""Where the object is in each photo, so the denoising loss can weigh it above the background.

Why. A person's 3–5 photos show their object on a few backgrounds. Trained on the whole photo,
a concept learns those backgrounds too: on the toy world a scoped CNS concept photographed on
snow, grass and white drew no sky for "<c3> in the sky" in 32 of 32 images (prompt fidelity
0.823 over six concepts, goal 0.9). Weighing the background at 0.1 of the object (CNS's
`mask_background`) keeps the loss on what the concept is: six concepts then read prompt fidelity
0.938, named look 0.906. CNS's `background=base` uses the same masks to aim the background at the
base model's prediction instead (training.ConceptLoss; docs/tuning.md "Object-weighted loss").

How. The background is estimated from the photo's border: its per-channel median colour; a pixel
belongs to the object when some channel differs from it by more than `threshold` (in [-1, 1]
units), grown by one pixel. This suits object photos on a plain or evenly textured background
(grass, sand, a table top). Where the estimate is implausible (under 3 % or over 85 % of the
photo: a cluttered border, or an object filling the frame) the photo is trained whole, and the
learn result says so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_COVER, MAX_COVER = 0.03, 0.85


def object_masks(pixels: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels (n, variants, 3, S, S) in [-1, 1] → masks (n, variants, 1, S, S) in {0, 1}, and
    (n,) bool: whether the object was found in every variant of photo i (where it was not,
    that variant's mask is all ones)."""
    x = pixels.flatten(0, 1).float()
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    mask = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    mask = F.max_pool2d(mask, 3, stride=1, padding=1)
    cover = mask.mean(dim=(1, 2, 3))
    ok = (cover >= MIN_COVER) & (cover <= MAX_COVER)
    mask[~ok] = 1.0
    return mask.unflatten(0, pixels.shape[:2]), ok.view(pixels.shape[:2]).all(dim=1)


def latent_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Object masks (n, variants, 1, S, S) → the latent grid (n, variants, 1, size, size): a
    latent pixel is object when any pixel it covers is."""
    return F.adaptive_max_pool2d(masks.flatten(0, 1), size).unflatten(0, masks.shape[:2])


def loss_weights(masks: torch.Tensor, size: int, background: float) -> torch.Tensor:
    """Object masks (n, variants, 1, S, S) → per-latent-pixel loss weights (n, variants, 1,
    size, size): 1 on the object, `background` elsewhere, scaled to mean 1 per image (so the
    learning rate means what it meant for the unweighted loss)."""
    m = latent_masks(masks, size).flatten(0, 1)
    w = m + background * (1 - m)
    w = w / w.mean(dim=(1, 2, 3), keepdim=True)
    return w.unflatten(0, masks.shape[:2])
