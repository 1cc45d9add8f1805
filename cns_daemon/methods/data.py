"""Photos in, training tensors out: validation, resize/crop, light augmentation, captions.

Every method learns from the same few photos, so this is done once here. Bad files are reported
with a BadPhoto error naming the file (the inbox shows that sentence to the person who dropped
it). Augmentation is a fixed, seeded pool of variants per photo (flip, small crop jitter) made up
front, so training is deterministic per seed and the VAE encodes each variant only once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cns_daemon.api.errors import BadInput, BadPhoto
from cns_daemon.archive import sidecar_caption, to_rgb, upright as turned

MIN_SIDE = 32

# Captions used when a photo has no sidecar `.txt` and the request gives none. `{token}` is the
# concept's rare token, `{cls}` its class word.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {token} {cls}",
    "a picture of a {token} {cls}",
    "a photo of the {token} {cls}",
    "a close-up photo of a {token} {cls}",
    "a good photo of a {token} {cls}",
    "a cropped photo of the {token} {cls}",
)


# Photos are kept in memory for the whole learn at most this short side: twice SD's 512 px, more
# than any crop trains on, and 4 MB instead of 150 MB for a 50-megapixel photo (64 are allowed).
KEEP_SHORT_SIDE = 1024


def load_photo(path: Path) -> Image.Image:
    """Open one photo fully (so truncation is caught now, not mid-training) as RGB, no larger
    than KEEP_SHORT_SIDE on its short side."""
    path = Path(path)
    if not path.is_file():
        raise BadPhoto(f"{path.name}: no such file ({path}).", "Check the path and try again.")
    try:
        with Image.open(path) as probe:
            probe.verify()  # structural check; the image must be reopened afterwards
        with Image.open(path) as img:
            w, h = img.size
            k = KEEP_SHORT_SIDE / min(w, h)
            if k < 1:   # JPEG decodes at a reduced scale right away (never below the target)
                img.draft(img.mode, (math.ceil(w * k), math.ceil(h * k)))
            img.load()      # decodes every byte: a truncated file fails here
            upright = turned(img)   # a phone's "rotate" tag, honoured
            if min(upright.size) > KEEP_SHORT_SIDE:
                upright.thumbnail((KEEP_SHORT_SIDE * max(upright.size) // min(upright.size),) * 2,
                                  Image.Resampling.LANCZOS)
            rgb = to_rgb(upright)
    except UnidentifiedImageError:
        raise BadPhoto(f"{path.name} is not an image.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadPhoto(f"{path.name} is damaged or truncated ({exc}).") from None
    if min(rgb.size) < MIN_SIDE:
        raise BadPhoto(f"{path.name} is too small ({rgb.size[0]}x{rgb.size[1]} pixels; "
                       f"at least {MIN_SIDE}x{MIN_SIDE} is needed).")
    return rgb


def load_photos(paths: list[Path]) -> list[Image.Image]:
    if not paths:
        raise BadInput("No photos were given.", "Give 3-5 photos of the concept.")
    return [load_photo(Path(p)) for p in paths]


def resolution(pipe) -> int:
    """The pixel size the pipeline generates at (and so trains at)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float in [-1, 1], the VAE's input range."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def center_crop(img: Image.Image, size: int, scale: float = 1.0) -> Image.Image:
    """Resize so the short side is size*scale, then crop the centre size*scale square."""
    side = max(size, round(size * scale))
    w, h = img.size
    k = side / min(w, h)
    img = img.resize((max(side, round(w * k)), max(side, round(h * k))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def augment_pool(img: Image.Image, size: int, n: int, seed: int,
                 jitter: float = 0.1) -> torch.Tensor:
    """`n` variants of one photo as (n, 3, size, size): variant 0 is the plain centre crop,
    the rest are randomly flipped and cropped from a slightly (≤ `jitter`) larger resize."""
    rng = np.random.default_rng(seed)
    out = [to_tensor(center_crop(img, size))]
    for _ in range(n - 1):
        big = center_crop(img, size, 1.0 + jitter * rng.random())
        t = to_tensor(big)
        dx, dy = (int(rng.integers(0, t.shape[-1] - size + 1)) for _ in range(2))
        t = t[:, dy:dy + size, dx:dx + size]
        if rng.random() < 0.5:
            t = t.flip(-1)
        out.append(t.contiguous())
    return torch.stack(out)


def with_token(caption: str, token: str, class_word: str) -> str:
    """Make a free-form caption name the concept: put the token before the first mention of
    the class word (of all its words: "teddy bear"), or prefix "<token> <class>, " when the
    caption does not mention it. Without a token (Cones 2, which reads the concept at its class
    word) the caption must still name the class: "a <class>, " is put before one that does not."""
    words = caption.split(" ")
    wanted = class_word.lower().split()
    for i in range(len(words) - len(wanted) + 1):
        if [w.lower().strip(".,;:!?") for w in words[i:i + len(wanted)]] == wanted:
            return " ".join(words[:i] + [token] + words[i:]) if token else caption
    return f"{token} {class_word}, {caption}" if token else f"a {class_word}, {caption}"


def without_token(caption: str, token: str) -> str:
    """The caption as the base model would read it: the concept's token (each of its words)
    taken out."""
    words = set(token.split())
    return " ".join(w for w in caption.split(" ") if w not in words)


def template_caption(index: int, token: str, class_word: str) -> str:
    return TEMPLATES[index % len(TEMPLATES)].format(token=token, cls=class_word).replace("  ", " ")


def photo_captions(paths: list[Path], token: str, class_word: str,
                   given: list[str | None] | None = None) -> list[str]:
    """One caption per photo: the request's, else the sidecar's, else a template (photo i gets
    template i, so captions differ across photos). Every caption contains `<token> <class>`."""
    if given is not None and len(given) != len(paths):
        raise BadInput(f"{len(given)} captions were given for {len(paths)} photos.",
                       "Give one caption per photo, or none.")
    out = []
    for i, p in enumerate(paths):
        text = given[i] if given is not None else sidecar_caption(p)
        out.append(with_token(text, token, class_word) if text else
                   template_caption(i, token, class_word))
    return out


@dataclass
class PhotoSet:
    """A concept's photos ready for training: `pixels[i]` holds photo i's augmented variants."""
    paths: list[Path]
    captions: list[str]
    pixels: torch.Tensor   # (n_photos, n_variants, 3, size, size) in [-1, 1]
    templates: list[str]   # photo i's template caption, whether or not it has its own

    @property
    def captioned(self) -> bool:
        """Some photo has a caption of its own (the request's or a sidecar), not its template."""
        return self.captions != self.templates

    @property
    def n(self) -> int:
        return self.pixels.shape[0]


def prepare_photos(paths: list[Path], size: int, token: str, class_word: str, *,
                   captions: list[str] | None = None, variants: int = 4,
                   seed: int = 0) -> PhotoSet:
    paths = [Path(p) for p in paths]
    images = load_photos(paths)
    pools = [augment_pool(img, size, variants, seed * 1000 + i) for i, img in enumerate(images)]
    return PhotoSet(paths, photo_captions(paths, token, class_word, captions), torch.stack(pools),
                    [template_caption(i, token, class_word) for i in range(len(paths))])
