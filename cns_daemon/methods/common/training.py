"""What every method's training shares: text and photo encoding, the denoising loss with prior
preservation, freezing everything but the trained tensors, and a step loop with progress and
cooperative cancel.

Randomness (photo variant, prior images, noise, timesteps) is drawn per step from a CPU
generator seeded by (seed, step): a run draws the same data and noise per seed on any device,
and two computations can replay exactly the same loss sequence (the Cones mask test relies on
it). The arithmetic is exact on the CPU; on a GPU (half precision, nondeterministic backward
kernels) two runs of one seed end close, not bit-equal.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from cns_daemon.methods.base import CancelToken, ProgressFn, ProgressReporter


def tokenize(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(pipe.text_encoder.device)


def encode_text(pipe, prompts: list[str]) -> torch.Tensor:
    """Conditional encoder output (batch, tokens, d), as the UNet's cross-attention sees it."""
    return pipe.text_encoder(tokenize(pipe, prompts))[0]


@torch.no_grad()
def encode_pixels(pipe, pixels: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1] → scaled latents. The posterior mean, not a sample, so the same
    photo always gives the same latent."""
    vae = pipe.vae
    out = []
    for part in pixels.split(chunk):
        dist = vae.encode(part.to(vae.device, vae.dtype)).latent_dist
        out.append(dist.mean * vae.config.scaling_factor)
    return torch.cat(out).float()


def noise_schedule(pipe):
    """The training-time (DDPM) view of the pipeline's noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def denoising_losses(unet, schedule, latents: torch.Tensor, cond: torch.Tensor,
                     gen: torch.Generator, weights: torch.Tensor | None = None,
                     teacher: Callable | None = None) -> torch.Tensor:
    """Per-sample noise-prediction MSE at uniformly random timesteps (v-prediction targets for
    v-models such as SD 2.x 768). `weights` (n, 1, h, w), if given, weigh the latent pixels
    (common/masks.py); `teacher(noisy, t, target)`, if given, returns the targets to use."""
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    t = torch.randint(0, schedule.config.num_train_timesteps, (n,), generator=gen).to(latents.device)
    noisy = schedule.add_noise(latents, noise, t)
    if schedule.config.prediction_type == "v_prediction":
        target = schedule.get_velocity(latents, noise, t)
    else:
        target = noise
    if teacher is not None:
        target = teacher(noisy, t, target)
    pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weights is not None:
        err = err * weights.to(err.device)
    return err.mean(dim=(1, 2, 3))


@dataclass
class LossParts:
    total: torch.Tensor
    photos: float
    prior: float


class ConceptLoss:
    """Denoising loss on the concept's photos (each with its caption) + λ_prior × the same loss
    on class images with a plain class prompt ("a photo of a dog"): the concept-implanting loss
    of Cones and the training loss of CNS.

    With `text_grad=False` the captions are encoded once; with True (a trained token row) they
    are re-encoded each step so gradients reach the text encoder's input embedding.
    `photo_weights` (n_photos, n_variants, 1, h, w) weigh each photo's latent pixels (the object
    above its background: common/masks.py); class images are weighed evenly. With
    `background_teacher` = (masks (n_photos, n_variants, 1, h, w), captions without the concept's
    token) a photo's background is held to what the model predicts for those captions (the base
    model, where the concept's values are token-scoped) instead of to the photo's own noise.
    With `plain_captions` (one per photo: its template caption) each photo trains under its own
    caption or the plain one, `caption_mix` of the steps the plain one: photos captioned with
    their scene ("a photo of a sks star in the snow") then teach the concept both with the scene
    said and without it (docs/tuning.md "Photos with captions").
    """

    def __init__(self, pipe, photo_latents: torch.Tensor, captions: list[str], *,
                 prior_latents: torch.Tensor | None = None, prior_prompt: str = "",
                 lambda_prior: float = 1.0, prior_batch: int = 2, seed: int = 0,
                 text_grad: bool = False, photo_weights: torch.Tensor | None = None,
                 background_teacher: tuple[torch.Tensor, list[str]] | None = None,
                 scenes: tuple[str, ...] = (),
                 plain_captions: list[str] | None = None, caption_mix: float = 0.5,
                 unet_context: Callable[[list[str]], contextlib.AbstractContextManager] | None = None):
        self.pipe = pipe
        self.photos = photo_latents           # (n_photos, n_variants, 4, h, w)
        self.captions = list(captions)
        self.prior = prior_latents if prior_latents is not None and lambda_prior > 0 else None
        self.prior_prompt = prior_prompt
        self.lambda_prior = lambda_prior
        self.prior_batch = prior_batch
        self.seed = seed
        self.text_grad = text_grad
        self.photo_weights = photo_weights
        self.background_teacher = background_teacher
        # Scene phrases ("in the snow") appended to a photo's caption on a random half of its
        # steps; only with the background teacher, which then tells the background what the
        # base model makes of the same words.
        self.scenes = tuple(scenes) if background_teacher is not None else ()
        if plain_captions is not None and background_teacher is not None:
            raise ValueError("plain_captions and background_teacher do not combine (the teacher's "
                             "captions follow the photos' own)")
        if plain_captions is not None and len(plain_captions) != len(self.captions):
            raise ValueError("give one plain caption per photo")
        self.plain_captions = list(plain_captions) if plain_captions is not None else None
        self.caption_mix = caption_mix
        # Entered around each step's UNet call with that batch's prompts (token-scoped K/V
        # values need to know which rows hold which tokens: common/scope.py).
        self.unet_context = unet_context
        self.schedule = noise_schedule(pipe)
        self._cache: dict[str, torch.Tensor] = {}
        if not text_grad:  # frozen captions: encode them now, so the loop never runs the encoder
            self._encode(self.captions + (self.plain_captions or [])
                         + ([prior_prompt] if self.prior is not None else []))

    def _taught(self, scenes: list[str]) -> list[int]:
        """The photo rows whose background the teacher sets this step: every row, or with
        scenes only the rows whose caption got a scene phrase."""
        if self.background_teacher is None:
            return []
        return [i for i, scene in enumerate(scenes) if scene or not self.scenes]

    def _teacher(self, variant: torch.Tensor, scenes: list[str], rows: list[int]):
        """The targets with the backgrounds of photo `rows` replaced by the teacher's prediction
        for the photo's caption without the token (with this step's scene phrase)."""
        masks, captions = self.background_teacher
        mask = masks[torch.arange(len(captions)), variant][rows]
        captions = [captions[i] + scenes[i] for i in rows]

        def targets(noisy, t, target):
            cond = self._encode_frozen(captions)
            around = self.unet_context(captions) if self.unet_context else contextlib.nullcontext()
            with torch.no_grad(), around:
                unet = self.pipe.unet
                pred0 = unet(noisy[rows].to(unet.dtype), t[rows], encoder_hidden_states=cond.to(unet.dtype)).sample
            m = mask.to(target.device, target.dtype)
            out = target.clone()
            out[rows] = m * target[rows] + (1 - m) * pred0.to(target.dtype)
            return out
        return targets

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        if self.text_grad:
            return encode_text(self.pipe, prompts)
        return self._encode_frozen(prompts)

    def _encode_frozen(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with torch.no_grad():
                for p, e in zip(missing, encode_text(self.pipe, missing)):
                    self._cache[p] = e
        return torch.stack([self._cache[p] for p in prompts])

    def _scenes(self, step: int, n: int) -> list[str]:
        """This step's scene phrase per photo ("" on about half the steps). Drawn from a
        generator of its own, so the noise and timesteps are those of a run without scenes."""
        if not self.scenes:
            return [""] * n
        gen = step_generator(self.seed + 7919, step)
        pick = torch.randint(0, 2 * len(self.scenes), (n,), generator=gen).tolist()
        return [" " + self.scenes[j] if j < len(self.scenes) else "" for j in pick]

    def _captions(self, step: int) -> list[str]:
        """This step's caption per photo: its own, or (with plain captions) on a random
        `caption_mix` share of steps its plain one. A generator of its own, as for scenes."""
        if self.plain_captions is None:
            return self.captions
        gen = step_generator(self.seed + 104729, step)
        plain = (torch.rand(len(self.captions), generator=gen) < self.caption_mix).tolist()
        return [p if use else c for c, p, use in zip(self.captions, self.plain_captions, plain)]

    def parts(self, step: int) -> LossParts:
        gen = step_generator(self.seed, step)
        n, n_var = self.photos.shape[:2]
        variant = torch.randint(0, n_var, (n,), generator=gen)
        latents = [self.photos[torch.arange(n), variant]]
        weights = None
        scenes = self._scenes(step, n)
        taught = self._taught(scenes)
        if self.photo_weights is not None:
            weights = [self.photo_weights[torch.arange(n), variant]]
            if self.scenes and taught:   # a scene's taught background counts as much as the object
                weights[0][taught] = 1.0
        prompts = [c + s for c, s in zip(self._captions(step), scenes)]
        m = 0
        if self.prior is not None:
            pick = torch.randperm(self.prior.shape[0], generator=gen)[:self.prior_batch]
            latents.append(self.prior[pick])
            m = len(pick)
            prompts += [self.prior_prompt] * m
            if weights is not None:
                weights.append(torch.ones(m, *weights[0].shape[1:]))
        device = self.pipe.unet.device
        cond = self._encode(prompts)
        around = self.unet_context(prompts) if self.unet_context else contextlib.nullcontext()
        with around:
            losses = denoising_losses(self.pipe.unet, self.schedule, torch.cat(latents).to(device),
                                      cond, gen, None if weights is None else torch.cat(weights),
                                      self._teacher(variant, scenes, taught) if taught else None)
        photo = losses[:n].mean()
        total = photo
        prior = 0.0
        if m:
            prior_t = losses[n:].mean()
            total = photo + self.lambda_prior * prior_t
            prior = float(prior_t.detach())
        return LossParts(total, float(photo.detach()), prior)

    def __call__(self, step: int) -> torch.Tensor:
        return self.parts(step).total


@contextlib.contextmanager
def only_trainable(modules: Iterable[torch.nn.Module], params: Iterable[torch.Tensor]):
    """Inside: gradients flow only to `params`. On exit the requires_grad flags are back as they
    were and no .grad is left behind (a learn job leaves the pipeline as it found it)."""
    params = list(params)
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


# 4096 lifts gradients of 1e-11 into float16's range; a start below torch's 65536 skips fewer
# first steps while the scale finds its level (not measured: no such GPU here)
FLOAT16_LOSS_SCALE = 2.0 ** 12


class LossScale:
    """Dynamic loss scaling where the UNet computes in float16 (GPUs before Ampere: T4, V100). A
    denoising loss's gradients can fall below float16's smallest number (6e-8), and flush to
    zero there: the loss is multiplied up before backward, and the gradients are
    divided back in the methods' float32 master copies, where a step whose gradients overflowed
    is skipped and the scale lowered (torch's GradScaler). A no-op for float32 and bfloat16."""

    def __init__(self, compute_dtype: torch.dtype, device: torch.device):
        self.enabled = compute_dtype == torch.float16
        self._scaler = torch.amp.GradScaler(device.type, init_scale=FLOAT16_LOSS_SCALE,
                                            enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self._scaler.scale(loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """The optimiser's gradients divided back now (before clipping them); `step` then skips
        what this did."""
        self._scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        self._scaler.step(opt)   # skipped when a gradient is inf or NaN
        self._scaler.update()


def pipeline_modules(pipe) -> list[torch.nn.Module]:
    return [m for m in (pipe.unet, pipe.text_encoder, pipe.vae) if m is not None]


def run_steps(steps: int, step_fn: Callable[[int], float], progress: ProgressFn | None,
              cancel: CancelToken | None, phase: str = "train", *,
              around: Callable[[], contextlib.AbstractContextManager] | None = None,
              aside: Callable[[], contextlib.AbstractContextManager] | None = None) -> list[float]:
    """Call `step_fn(k)` for k < steps (it returns the step's loss), reporting step, loss and
    ETA after each and honouring cancel before each (Cancelled propagates to the caller, whose
    `finally` blocks undo what the steps did). `around` makes the context that wraps the loop
    alone: the memory options of `cns_daemon.memory.loop_context` (offload, checkpointing,
    autocast). With `aside` (see CancelToken.pause_point) the service may run a short job between
    two steps: the loop leaves `around` for it, so the job sees the pipeline as it serves
    generations, and enters it again afterwards."""
    report = ProgressReporter(progress, phase, steps)
    report(0)
    losses: list[float] = []
    k = 0
    while True:
        with around() if around is not None else contextlib.nullcontext():
            while k < steps:
                if cancel is not None:
                    cancel.check()
                    if aside is not None and cancel.pause_wanted:
                        break
                loss = float(step_fn(k))
                losses.append(loss)
                k += 1
                report(k, loss)
        if k >= steps:
            return losses
        cancel.pause_point(aside)
