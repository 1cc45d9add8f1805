"""The attribute probe: a small CNN that reads shape, main colour, pattern, second colour, the
pattern's tilt (the attribute no caption names) and background from any 32x32 image of the toy
world (a render or a generation).

It is fully convolutional with global pooling, so it reads a whole single-object photo (32x32)
and either half of a two-object photo (32 high x 16 wide) with the same weights. Trained by
`python -m cns_daemon.toyworld.probe_train`; the weights (safetensors) and label names (JSON) ship
in `toyworld/probe/`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from ..api.errors import ModelLoad
from .world import BACKGROUNDS, COLORS, NAMED_LOOK, PATTERNS, SHAPES, SIZE, TILTS, ObjectSpec

PROBE_DIR = Path(__file__).parent / "probe"
WEIGHTS = "probe.safetensors"
LABELS = "labels.json"
NO_SECOND = "none"  # the second-colour and tilt label of a solid object

HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "color": COLORS, "pattern": PATTERNS,
    "second_color": COLORS + (NO_SECOND,), "tilt": TILTS + (NO_SECOND,), "background": BACKGROUNDS,
}

ImageBatch = Union[Sequence["PIL.Image.Image"], np.ndarray]  # noqa: F821 (PIL only for typing)


@dataclass(frozen=True)
class Attributes:
    """What the probe read from one image (or one half). `confidence` is the probability of
    the least certain of the answers."""
    shape: str
    color: str
    pattern: str
    second_color: str | None
    tilt: str | None
    background: str
    confidence: float = 1.0

    def matches(self, obj: ObjectSpec, background: str | None = None, *,
                attrs: Sequence[str] = NAMED_LOOK) -> bool:
        """Whether the chosen attributes agree with `obj` (and `background` when given)."""
        ok = all(getattr(self, a) == getattr(obj, a) for a in attrs)
        return ok and (background is None or self.background == background)


class ProbeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        w = width
        self.features = nn.Sequential(
            block(3, w), block(w, w), nn.MaxPool2d(2),
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
            block(2 * w, 4 * w), block(4 * w, 4 * w))
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        # Mean pooling carries colour/background proportions, max pooling the strongest local
        # evidence (a star's spike, a dot); both are size-independent.
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return {k: head(pooled) for k, head in self.heads.items()}


def to_batch(images: ImageBatch) -> torch.Tensor:
    """PIL images or an (N,H,W,3) uint8 array -> float NCHW in [0,1], resized to 32x32."""
    from PIL import Image

    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError("expected an (N, H, W, 3) array of RGB images")
        arrays = list(images)
    else:
        arrays = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (SIZE, SIZE):
                im = im.resize((SIZE, SIZE), Image.BILINEAR)
            arrays.append(np.asarray(im))
    arr = np.stack([a if a.shape[:2] == (SIZE, SIZE)
                    else np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BILINEAR))
                    for a in arrays])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)


def halves(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right halves of NCHW images."""
    w = batch.shape[-1] // 2
    return batch[..., :w], batch[..., w:]


class Probe:
    """Load once, read many: `Probe.load().read([img, ...])`."""

    def __init__(self, net: ProbeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, folder: Path = PROBE_DIR) -> "Probe":
        from safetensors.torch import load_file

        try:
            meta = json.loads((folder / LABELS).read_text())
            if {k: tuple(v) for k, v in meta["heads"].items()} != HEADS:
                raise ModelLoad("The attribute probe was trained on a different world.",
                                "Retrain it: python -m cns_daemon.toyworld.probe_train")
            net = ProbeNet(width=meta["width"])
            net.load_state_dict(load_file(str(folder / WEIGHTS)))
        except ModelLoad:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ModelLoad(f"Could not load the attribute probe from {folder}: {exc}",
                            "Retrain it: python -m cns_daemon.toyworld.probe_train") from exc
        return cls(net)

    @torch.no_grad()
    def _decode(self, x: torch.Tensor) -> list[Attributes]:
        out: list[Attributes] = []
        logits = {}
        for i in range(0, len(x), 512):
            for k, v in self.net(x[i:i + 512]).items():
                logits.setdefault(k, []).append(v)
        probs = {k: torch.cat(v).softmax(-1) for k, v in logits.items()}
        best = {k: p.max(-1) for k, p in probs.items()}
        for n in range(len(x)):
            label = {k: HEADS[k][int(best[k].indices[n])] for k in HEADS}
            conf = min(float(best[k].values[n]) for k in HEADS)
            none = {k: None if label[k] == NO_SECOND else label[k] for k in ("second_color", "tilt")}
            out.append(Attributes(label["shape"], label["color"], label["pattern"], none["second_color"],
                                  none["tilt"], label["background"], conf))
        return out

    def read(self, images: ImageBatch) -> list[Attributes]:
        """Attributes of single-object images."""
        return self._decode(to_batch(images))

    def read_halves(self, images: ImageBatch) -> list[tuple[Attributes, Attributes]]:
        """(left, right) attributes of two-object images."""
        left, right = halves(to_batch(images))
        return list(zip(self._decode(left), self._decode(right)))
