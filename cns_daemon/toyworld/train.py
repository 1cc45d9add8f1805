"""Train the toy-world fixture model: `python -m cns_daemon.toyworld.train --out DIR`.

Reproducible (fixed seed; data rendered from that seed) and sized for a 2-core CPU in under an
hour. Stages, all in one run:
  1. render the training set (single objects, plus a share of two-object left/right scenes);
  2. train the VAE (reconstruction + a tiny KL term), then encode the set to latents and set the
     VAE's scaling factor so latents have unit variance, as SD's pipeline expects;
  3. train the UNet and the text encoder jointly on (latent, caption) pairs with the standard
     epsilon objective. The caption is dropped 10 % of the time (classifier-free guidance);
     about half the captions name each object's pattern and second colour ("a red star with
     yellow stripes"), the rest leave them out, and some leave out the colour or the
     background, so "a photo of a star" means "a star of some colour, pattern and tilt on some
     background" — the class prompt the methods rely on — while "with yellow stripes" has a
     text pathway of its own, as it has in real Stable Diffusion. No caption names the tilt.
     Half the two-object captions say "on the left ... on the right", the other half only
     "A and B" in either order, so a prompt without sides still draws both objects and where
     they go is left to the noise (or to layout boxes).
     Only the token rows the captions use (37) are trained (vocab.CompactEmbedding); the other
     rows are then drawn from the trained rows' statistics, so a concept's rare token starts
     where words live.
     `--merge-look P` (off by default; the shipped fixture was trained without it) gives a share
     of the looks named in full as one summed token (vocab.LookMerger; measured in
     docs/tuning.md, "One-token looks in the fixture's training"). `--look-before P` (off by
     default) says a share of the named looks before the noun, "a yellow striped red star"
     (measured in docs/tuning.md, "Looks said before the noun").
`--device cuda` runs the denoiser stage on a GPU (rendering, captions and every random draw stay
on the CPU, so the data are the same; on an H200 a step took 0.08 s against 0.27 s on 2 cores).
An EMA of the UNet/text weights is what gets saved, in fp16 (the loader upcasts). Checkpoints
are written periodically to `<out>.work/` so a cut-off run can `--resume`. The result is a
diffusers folder (safetensors) plus `train_info.json` (seed, steps, wall time, git commit) and
`SHA256SUMS`; the loader needs neither info file.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model import MODEL_NOTES, TOYWORLD_MODEL, build_tiny_pipeline
from .vocab import CompactEmbedding, LookMerger, caption_token_ids, init_untrained_rows
from .world import BACKGROUND_PHRASE, caption, random_scene, render_array

log = logging.getLogger("toyworld.train")


@dataclass
class TrainConfig:
    seed: int = 0
    n_images: int = 16000
    two_object_share: float = 0.2
    vae_steps: int = 1600
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    unet_steps: int = 6400
    unet_batch: int = 32
    unet_lr: float = 1.5e-3
    warmup: int = 200
    ema_decay: float = 0.998
    cfg_drop: float = 0.1
    omit_color: float = 0.1
    omit_background: float = 0.15
    name_look: float = 0.5       # share of objects whose caption names pattern + second colour
    pattern_only: float = 0.25   # of those, the share named by the pattern alone ("with stripes")
    unplaced: float = 0.5        # two objects: share of captions with "A and B" (either order), no sides
    merge_look: float = 0.0      # single patterned objects named in full with their colour: share whose
                                 # look is one summed token, "a <red+yellow+stripes> star" (vocab.LookMerger)
    look_before: float = 0.0     # named looks: share said before the noun, "a yellow striped red star"
    blocks: tuple[int, int] = (32, 64)
    heads: tuple[int, int] = (2, 4)  # per UNet block; the mid block takes the last
    text_width: int = 128
    text_layers: int = 2
    text_ffn: int = 512
    threads: int = 2
    t_power: float = 1.0         # timesteps drawn as T * u**t_power: > 1 weights the low-noise steps,
                                 # where patterns are decided, over the coarse ones
    init: str = ""               # warm start: a saved fixture folder (UNet, text encoder and VAE)
    checkpoint_every: int = 1000
    guidance_scale: float = 3.0  # the CFG scale written to cones.json as the model's recommendation
                                 # (measured on the result with bench.toyworld --guidance; tuning.md)
    sample_steps: int = 20       # and its denoising steps (what every figure on it is measured at)
    max_minutes: float = 58.0  # whole-run wall-time budget: the denoiser stage anneals and stops by then
    device: str = "cpu"          # where the denoiser stage runs ("cuda" on a lent GPU); every random
                                 # draw stays on the CPU generator, so the data order is the same


# --- data ----------------------------------------------------------------------------------------

def render_dataset(cfg: TrainConfig) -> tuple[np.ndarray, list]:
    """The training images (N,32,32,3 uint8) and their scenes, all from cfg.seed."""
    rng = np.random.default_rng(cfg.seed)
    scenes = [random_scene(rng, two_prob=cfg.two_object_share) for _ in range(cfg.n_images)]
    images = np.stack([render_array(s, cfg.seed * 10_000_000 + i)[0] for i, s in enumerate(scenes)])
    return images, scenes


def cached_dataset(cfg: TrainConfig, work: Path) -> tuple[np.ndarray, list]:
    """render_dataset, kept in the work folder so a resumed run does not render again (the
    scenes are cheap to redraw from the seed; only the pixels are cached)."""
    rng = np.random.default_rng(cfg.seed)
    cache = work / f"images-{cfg.seed}-{cfg.n_images}-{cfg.two_object_share}.npy"
    if cache.exists():
        scenes = [random_scene(rng, two_prob=cfg.two_object_share) for _ in range(cfg.n_images)]
        return np.load(cache), scenes
    log.info("rendering %d images", cfg.n_images)
    images, scenes = render_dataset(cfg)
    np.save(cache, images)
    return images, scenes


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def sample_caption(scene, rng: np.random.Generator, cfg: TrainConfig):
    """A training caption for `scene`, and the object whose look is to be merged into one token
    (None for none)."""
    if rng.random() < cfg.cfg_drop:
        return "", None
    looks = []
    for _ in scene.objects:
        named = rng.random() < cfg.name_look
        looks.append("none" if not named else "pattern" if rng.random() < cfg.pattern_only else "full")
    placing = "sides"
    if len(scene.objects) == 2 and rng.random() < cfg.unplaced:
        placing = "and" if rng.random() < 0.5 else "and-reversed"
    with_color = rng.random() >= cfg.omit_color
    # Drawn only when the option is on, so runs without it keep their random sequence.
    before = [cfg.look_before > 0 and rng.random() < cfg.look_before for _ in scene.objects]
    text = caption(scene, template=int(rng.integers(3)), with_color=with_color,
                   with_background=rng.random() >= cfg.omit_background, look=looks, placing=placing,
                   before=before)
    obj = scene.objects[0]
    # Drawn only when merging is on, as above.
    if (cfg.merge_look > 0 and len(scene.objects) == 1 and looks[0] == "full" and with_color
            and not before[0]
            and obj.pattern != "solid" and rng.random() < cfg.merge_look):
        return text, obj
    return text, None


# --- stages --------------------------------------------------------------------------------------

def train_vae(vae, images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    vae.train()
    loss_avg = 0.0
    for step in range(cfg.vae_steps):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        # L1 keeps edges and pattern texture crisper than MSE alone.
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log.info("vae step %d/%d loss %.4f", step, cfg.vae_steps, loss_avg)
    vae.eval()
    return loss_avg


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means and stds of the whole set: (N, 2, 4, 16, 16)."""
    out = []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch]).latent_dist
        out.append(torch.stack([post.mean, post.std], dim=1))
    return torch.cat(out)


def lr_at(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Warm-up, then cosine decay over whichever runs out first: the steps or the wall-time
    budget (so a run slowed by a busy machine still anneals before it stops)."""
    if step < cfg.warmup:
        return cfg.unet_lr * (step + 1) / cfg.warmup
    frac = max((step - cfg.warmup) / max(1, cfg.unet_steps - cfg.warmup), time_frac)
    frac = min(frac, 1.0)
    return cfg.unet_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def caption_ids(tokenizer, drawn: list, merger: LookMerger | None) -> torch.Tensor:
    """Token ids of sampled (caption, merged object) pairs, looks merged where drawn."""
    ids = _tokenize(tokenizer, [text for text, _ in drawn])
    for row, (_, obj) in enumerate(drawn):
        if obj is not None:
            ids[row] = merger.apply(ids[row], obj)
    return ids


def train_denoiser(pipe, latents: torch.Tensor, scenes: list, cfg: TrainConfig, gen: torch.Generator,
                   work: Path, start: dict | None, t_begin: float,
                   merger: LookMerger | None = None) -> tuple[dict, float, int]:
    """Joint UNet + text-encoder training; returns the EMA state, the final loss and the number
    of steps done (fewer than asked when the wall-time budget ran out)."""
    unet, text, sched = pipe.unet, pipe.text_encoder, pipe.scheduler
    dev = torch.device(cfg.device)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in _trainable_state(pipe).items()}
    first = 0
    if start is not None:
        unet.load_state_dict(start["unet"])
        text.load_state_dict(start["text"])
        opt.load_state_dict(start["opt"])
        ema = start["ema"]
        gen.set_state(start["gen"].cpu())   # a CPU generator (--device cuda moved it on load)
        first = start["step"]
        # The whole run's wall-time budget and learning-rate schedule go on where they were (a
        # resumed run got a fresh budget, and a rate that had wound down jumped back up).
        t_begin = time.time() - start.get("elapsed", 0.0)
    rng = np.random.default_rng(cfg.seed + 1 + first)
    if start is not None and "rng" in start:   # the captions an uninterrupted run would draw
        rng.bit_generator.state = start["rng"]
    alphas = sched.alphas_cumprod
    unet.train()
    text.train()
    loss_avg = 0.0
    t0 = time.time()
    budget = cfg.max_minutes * 60
    for step in range(first, cfg.unet_steps):
        time_frac = (time.time() - t_begin) / budget
        if time_frac >= 1.0:
            log.warning("wall-time budget reached: stopping at step %d of %d", step, cfg.unet_steps)
            break
        lr = lr_at(step, cfg, time_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(latents), (cfg.unet_batch,), generator=gen)
        mean, std = latents[idx, 0], latents[idx, 1]
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * pipe.vae.config.scaling_factor
        drawn = [sample_caption(scenes[i], rng, cfg) for i in idx.tolist()]
        ids = caption_ids(pipe.tokenizer, drawn, merger).to(dev)
        if cfg.t_power == 1.0:
            t = torch.randint(0, len(alphas), (cfg.unet_batch,), generator=gen)
        else:
            u = torch.rand(cfg.unet_batch, generator=gen)
            t = (u ** cfg.t_power * len(alphas)).long().clamp_(max=len(alphas) - 1)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = (a.sqrt() * z0 + (1 - a).sqrt() * noise).to(dev)
        enc = text(ids)[0]
        pred = unet(zt, t.to(dev), enc).sample
        loss = F.mse_loss(pred, noise.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema, pipe, cfg.ema_decay if step > cfg.warmup else 0.0)
        loss_avg = 0.99 * loss_avg + 0.01 * loss.item() if step > first else loss.item()
        if step % 50 == 0 or step == cfg.unet_steps - 1:
            rate = (time.time() - t0) / (step - first + 1)
            log.info("unet step %d/%d loss %.4f lr %.2e %.2fs/step eta %.1f min", step, cfg.unet_steps,
                     loss_avg, lr, rate, rate * (cfg.unet_steps - step) / 60)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.unet_steps:
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                        "ema": ema, "gen": gen.get_state(), "step": step + 1,
                        "elapsed": time.time() - t_begin, "rng": rng.bit_generator.state},
                       work / "denoiser.pt")
            log.info("checkpoint at step %d", step + 1)
    else:
        step = cfg.unet_steps
    unet.eval()
    text.eval()
    return ema, loss_avg, step


def _trainable_state(pipe) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    state.update({f"text.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    return state


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], pipe, decay: float) -> None:
    # One fused (foreach) update over the hundreds of small float tensors, rather than two
    # kernel launches per tensor on a GPU.
    floats, live = [], []
    for k, v in _trainable_state(pipe).items():
        if v.dtype.is_floating_point:
            floats.append(ema[k])
            live.append(v.detach())
        else:
            ema[k].copy_(v)
    torch._foreach_mul_(floats, decay)
    torch._foreach_add_(floats, live, alpha=1 - decay)


def _load_ema(pipe, ema: dict[str, torch.Tensor]) -> None:
    pipe.unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
    pipe.text_encoder.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("text.")})


# --- saving --------------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_checksums(folder: Path) -> Path:
    """SHA256SUMS over every weight/config file (sha256sum -c compatible)."""
    import hashlib

    lines = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS",)):
        lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(folder)}")
    out = folder / "SHA256SUMS"
    out.write_text("\n".join(lines) + "\n")
    return out


def save_model(pipe, out: Path, info: dict) -> None:
    """fp16 safetensors (the loader upcasts to the dtype it is asked for), info, checksums."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    # The world's background phrases are the only places this model knows: they are the scene
    # phrases CNS trains concepts with (model.DEFAULT_SCENES is for real models).
    notes = {"guidance_scale": info["config"]["guidance_scale"],
             "steps": info["config"].get("sample_steps", 20), "scenes": list(BACKGROUND_PHRASE.values())}
    (out / MODEL_NOTES).write_text(json.dumps(notes) + "\n")
    write_checksums(out)


def build(cfg: TrainConfig):
    return build_tiny_pipeline(seed=cfg.seed, blocks=cfg.blocks, heads=cfg.heads, width=cfg.text_width,
                               text_layers=cfg.text_layers, text_ffn=cfg.text_ffn)


def warm_start(pipe, folder: Path) -> None:
    """Load a saved fixture's weights into the freshly built pipeline (same architecture)."""
    from cns_daemon.model import load_pipeline

    saved = load_pipeline(folder, device="cpu", dtype="float32")
    for name in ("unet", "text_encoder", "vae"):
        getattr(pipe, name).load_state_dict(getattr(saved, name).state_dict())
    log.info("warm start from %s", folder)


def run(cfg: TrainConfig, out: Path, resume: bool = False) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    commit = git_commit()

    images_np, scenes = cached_dataset(cfg, work)
    images = to_tensor(images_np)
    log.info("rendered in %.0fs", time.time() - t_start)

    pipe = build(cfg)
    if cfg.init:
        warm_start(pipe, Path(cfg.init))
    gen = torch.Generator().manual_seed(cfg.seed)
    vae_file = work / "vae.pt"
    if cfg.init and cfg.vae_steps == 0:
        vae_loss = float("nan")   # the warm start's VAE, kept as it is (its latents stay valid)
    elif resume and vae_file.exists():
        saved = torch.load(vae_file)
        pipe.vae.load_state_dict(saved["vae"])
        vae_loss = saved["loss"]
    else:
        vae_loss = train_vae(pipe.vae, images, cfg, gen)
        torch.save({"vae": pipe.vae.state_dict(), "loss": vae_loss}, vae_file)
    pipe.vae.eval()
    pipe.vae.requires_grad_(False)
    t_vae = time.time() - t_start

    latents = encode_all(pipe.vae, images)
    scale = float(1.0 / latents[:, 0].std())
    pipe.vae.register_to_config(scaling_factor=scale)
    log.info("latent scaling factor %.4f", scale)
    # For reading checkpoints mid-run (the denoiser checkpoint holds no VAE config).
    (work / "latent_scale.txt").write_text(f"{scale!r}\n")

    # Train only the token rows the captions use; the full table gets them back afterwards.
    full = pipe.text_encoder.get_input_embeddings()
    used = caption_token_ids(pipe.tokenizer)
    merger = LookMerger(pipe.tokenizer, full.num_embeddings) if cfg.merge_look > 0 else None
    compact = CompactEmbedding(full, used, merger.merged_words() if merger else ())
    pipe.text_encoder.set_input_embeddings(compact)
    pipe.to(cfg.device)   # the VAE's work is done; its latents stay on the CPU with the generator
    ckpt = work / "denoiser.pt"
    start = torch.load(ckpt, weights_only=False, map_location=cfg.device) if resume and ckpt.exists() else None
    ema, unet_loss, steps_done = train_denoiser(pipe, latents, scenes, cfg, gen, work, start, t_start, merger)
    _load_ema(pipe, ema)
    pipe.to("cpu")
    compact.write_back(full)
    pipe.text_encoder.set_input_embeddings(full)
    rows = init_untrained_rows(full.weight, used, cfg.seed)

    info = {"config": asdict(cfg), "git_commit": commit, "wall_seconds": round(time.time() - t_start, 1),
            "vae_seconds": round(t_vae, 1), "vae_final_loss": round(vae_loss, 5),
            "unet_final_loss": round(unet_loss, 5), "unet_steps_done": steps_done, "latent_scaling_factor": scale,
            "trained_token_rows": len(used), **rows,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "resumed": start is not None}
    if cfg.init:   # the run this one continued, as it recorded itself
        info["warm_start"] = json.loads((Path(cfg.init) / "train_info.json").read_text())
    save_model(pipe, out, info)
    log.info("saved to %s in %.1f min", out, info["wall_seconds"] / 60)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help=(
        "the folder to write the model to (the shipped fixture is "
        f"{TOYWORLD_MODEL.relative_to(Path(__file__).parents[2])}: replacing it changes every "
        "figure in docs/tuning.md)"))
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--resume", action="store_true", help="continue from <out>.work checkpoints")
    for name, value in asdict(TrainConfig()).items():
        if isinstance(value, tuple):
            p.add_argument(f"--{name.replace('_', '-')}", type=int, nargs=len(value), default=value)
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(p.parse_args(argv))
    out, resume, force = args.pop("out"), args.pop("resume"), args.pop("force")
    if out.exists() and not force:   # said now, not after an hour of training
        p.error(f"{out} exists; give --force to replace it, or another --out")
    for name, value in asdict(TrainConfig()).items():
        if isinstance(value, tuple):
            args[name] = tuple(args[name])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(TrainConfig(**args), out, resume)


if __name__ == "__main__":
    main()
