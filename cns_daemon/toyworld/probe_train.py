"""Train the attribute probe: `python -m cns_daemon.toyworld.probe_train [--out DIR]`.

Trains on renders (single objects whole, two-object photos as left/right halves) with
augmentations that imitate what a small diffusion model's generations look like next to clean
renders: blur, a 2x down-and-up resample (the VAE's bottleneck), noise, colour/contrast drift and
small shifts. Then measures per-attribute accuracy on fresh renders (seeds never used in
training) and writes weights + labels (+ that accuracy) into `toyworld/probe/`.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .probe import HEADS, LABELS, NO_SECOND, PROBE_DIR, WEIGHTS, Probe, ProbeNet, halves
from .world import ObjectSpec, SceneSpec, random_scene, render_array

log = logging.getLogger("toyworld.probe_train")

# Seeds of the evaluation renders are far from the training ones (training uses seed*1e6 + i).
EVAL_SEED_BASE = 900_000_000


@dataclass
class ProbeConfig:
    seed: int = 0
    n_single: int = 10000
    n_pairs: int = 5000
    steps: int = 4000   # width 16 / 1,800 steps read the tilt of halves at 0.855, pattern 0.897
    batch: int = 64
    lr: float = 3e-3
    width: int = 24
    threads: int = 2
    pair_batch: int = 32   # two-object halves per step, beside `batch` whole photos
    init: str = ""         # a probe folder to start from (a fine-tune), or "" for fresh weights


def _labels(obj: ObjectSpec, background: str) -> dict[str, int]:
    values = {"shape": obj.shape, "color": obj.color, "pattern": obj.pattern,
              "second_color": obj.second_color or NO_SECOND, "tilt": obj.tilt or NO_SECOND,
              "background": background}
    return {k: HEADS[k].index(v) for k, v in values.items()}


@dataclass
class LabelledSet:
    images: torch.Tensor           # NCHW float in [0,1]
    labels: dict[str, torch.Tensor]


def _collect(pairs: list[tuple[torch.Tensor, dict[str, int]]]) -> LabelledSet:
    return LabelledSet(torch.stack([p[0] for p in pairs]),
                       {k: torch.tensor([p[1][k] for p in pairs]) for k in HEADS})


def render_sets(n_single: int, n_pairs: int, seed: int, seed_base: int) -> tuple[LabelledSet, LabelledSet]:
    """(whole single-object photos, halves of two-object photos), labelled."""
    rng = np.random.default_rng(seed)
    singles, parts = [], []
    for i in range(n_single + n_pairs):
        scene: SceneSpec = random_scene(rng, two_prob=0.0 if i < n_single else 1.0)
        img = torch.from_numpy(render_array(scene, seed_base + i)[0]).permute(2, 0, 1).float() / 255
        if len(scene.objects) == 1:
            singles.append((img, _labels(scene.objects[0], scene.background)))
        else:
            left, right = halves(img)
            parts.append((left, _labels(scene.objects[0], scene.background)))
            parts.append((right, _labels(scene.objects[1], scene.background)))
    return _collect(singles), _collect(parts)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (n, 1, 1, 1), generator=gen)

    x = x.clone()
    third = n // 3
    if third:
        x[:third] = _blur(x[:third], float(u(0.4, 1.1, 1)))
        h, w = x.shape[-2:]
        down = F.interpolate(x[third:2 * third], size=(h // 2, w // 2), mode="area")
        x[third:2 * third] = F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)
    shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(2, 3))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15) + mean * u(0.88, 1.1)
    x = x * (1 + 0.05 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1))
    x = x + u(0.0, 0.05) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _loss(net: ProbeNet, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    out = net(x)
    return sum(F.cross_entropy(out[k], labels[k]) for k in HEADS)


def train(cfg: ProbeConfig) -> ProbeNet:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = Probe.load(Path(cfg.init)).net if cfg.init else ProbeNet(cfg.width)   # before the renders' minute
    if cfg.init and net.heads["shape"].in_features != 8 * cfg.width:
        raise SystemExit(f"--init {cfg.init} is a probe of another width than --width {cfg.width}")
    t0 = time.time()
    singles, parts = render_sets(cfg.n_single, cfg.n_pairs, cfg.seed, cfg.seed * 1_000_000)
    log.info("rendered %d + %d halves in %.0fs", len(singles.images), len(parts.images), time.time() - t0)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    net.train()
    for step in range(cfg.steps):
        loss = 0.0
        # Whole single-object photos and two-object halves each step (two shapes, two batches).
        for data, b in ((singles, cfg.batch), (parts, cfg.pair_batch)):
            idx = torch.randint(len(data.images), (b,), generator=gen)
            loss = loss + _loss(net, augment(data.images[idx], gen), {k: v[idx] for k, v in data.labels.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("probe step %d/%d loss %.4f (%.0fs)", step, cfg.steps, float(loss.detach()), time.time() - t0)
    return net.eval()


def accuracy(probe: Probe, n_single: int = 1000, n_pairs: int = 300, seed: int = 12345
             ) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy on fresh renders: {"single": {...}, "halves": {...}}."""
    singles, parts = render_sets(n_single, n_pairs, seed, EVAL_SEED_BASE + seed * 10_000)
    out = {}
    for name, data in (("single", singles), ("halves", parts)):
        with torch.no_grad():
            logits = probe.net(data.images)
        out[name] = {k: float((logits[k].argmax(-1) == data.labels[k]).float().mean()) for k in HEADS}
    return out


def save(net: ProbeNet, cfg: ProbeConfig, acc: dict, folder: Path, seconds: float,
         started_from: dict | None = None) -> None:
    """Weights and labels; a fine-tune also records the run it started from (`started_from`:
    that probe's own labels, minus its head names), so the chain can be run again."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS))
    meta = {"heads": {k: list(v) for k, v in HEADS.items()}, "width": cfg.width, "config": asdict(cfg),
            "fresh_render_accuracy": acc, "train_seconds": round(seconds, 1)}
    if started_from is not None:
        meta["started_from"] = {k: v for k, v in started_from.items() if k != "heads"}
    (folder / LABELS).write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=PROBE_DIR)
    for name, value in asdict(ProbeConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = ProbeConfig(**args)
    # Read before training: with --out the same folder, the run replaces what it started from.
    started_from = json.loads((Path(cfg.init) / LABELS).read_text()) if cfg.init else None
    t0 = time.time()
    net = train(cfg)
    acc = accuracy(Probe(net))
    log.info("fresh-render accuracy: %s", json.dumps(acc))
    save(net, cfg, acc, out, time.time() - t0, started_from)


if __name__ == "__main__":
    main()
