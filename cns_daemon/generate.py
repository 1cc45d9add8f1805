"""The generation routine: one request, concepts of any method in one prompt, optional layout.

    images = generate(pipe, "a photo of <rex> and <pot> on the beach", records,
                      boxes=["rex=0,0,0.5,1", "pot=0.5,0,1,1"], n=2, seed=7)

Order of work: expand the prompt (prompts.py), apply each method's records for this request (a
resident method's concepts, CNS's, only when `apply_resident`: the service keeps them live),
encode the prompt ourselves so Cones 2 residuals land on the conditional embeddings at their
class-word positions and shares of the end of the sequence only, tell the token scope which
rows hold which tokens (scoped CNS concepts act only there: methods/common/scope.py), install
layout guidance when boxes are given, run the pipeline with a step callback (progress,
cooperative cancel, guidance step), and, whatever happens, take everything off again in reverse
order: weights, token rows and attention processors are bit-identical afterwards.

Determinism: image i of a request starts from noise drawn by a CPU generator seeded with
seed + i, so on one machine an image does not depend on `n` (but for the rounding of batched
kernels: about 1e-6, which can tip a pixel by one grey level). Another device or precision starts
from the same noise but computes in other rounding (bf16/fp16 on a GPU, batched kernels): the
same composition, not the same pixels.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from cns_daemon.api.errors import BadInput
from cns_daemon.model import recommended_guidance, recommended_steps
from cns_daemon.guidance import GuidanceConfig, GuidanceState, LayoutBias, layout_guidance
from cns_daemon.methods.base import CancelToken, ProgressFn, ProgressReporter
from cns_daemon.methods.common.scope import NO_TOKEN, prompt_scope, tail_shares
from cns_daemon.prompts import (Box, ExpandedPrompt, blank_negative, check_boxes, check_length,
                                check_plain_words, expand, referenced_names)
from cones_store.records import ConceptMeta, ConceptRecord

log = logging.getLogger(__name__)

MAX_IMAGES = 16


@dataclass
class Embeddings:
    cond: torch.Tensor            # (n, tokens, d)
    uncond: torch.Tensor | None   # (n, tokens, d), None without classifier-free guidance


def encode(pipe, expanded: ExpandedPrompt, n: int, cfg: bool, handles: Iterable = (),
           negative_prompt: str | None = None) -> Embeddings:
    """Encode the expanded prompt; handles that carry residuals (Cones 2) add them to the
    conditional embeddings at their concepts' anchors and shares of the end of the sequence
    (`prompt_tails`). The unconditional branch stays plain."""
    cond, uncond = pipe.encode_prompt(expanded.text, pipe._execution_device, n, cfg,
                                      negative_prompt=negative_prompt)
    anchors = {name: expanded.anchors(name) for name in expanded.names}
    tails = prompt_tails(expanded, cond.shape[1])
    for handle in handles:
        add = getattr(handle, "add_residuals", None)
        if add is not None:
            cond = add(cond, anchors, tails, len(expanded.token_ids) - 1)
    return Embeddings(cond, uncond if cfg else None)


@contextlib.contextmanager
def applied(pipe, records: list[ConceptRecord], apply_resident: bool):
    """Apply each method's records for one request, in METHOD_MODULES order; remove them in
    reverse order on exit. Resident methods' records are applied only when `apply_resident`.
    Yields the handles (Cones 2 handles carry the residuals for `encode`)."""
    from cns_daemon.methods import METHOD_MODULES, get_method

    by_method: dict[str, list[ConceptRecord]] = {}
    for r in records:
        by_method.setdefault(r.meta.method, []).append(r)
    done: list[tuple[object, object]] = []
    try:
        for m in METHOD_MODULES:
            if not by_method.get(m):
                continue
            method = get_method(m)
            if apply_resident or not method.resident:
                done.append((method, method.apply(pipe, by_method[m])))
        yield [h for _, h in done]
    except BaseException:   # the request's own error (a cancel, a bad input) is the one to tell
        for exc in _remove_all(done):
            log.error("taking a concept off the model failed after the request failed", exc_info=exc)
        raise
    errors = _remove_all(done)
    if errors:
        raise errors[0]


def _remove_all(done: list[tuple[object, object]]) -> list[Exception]:
    """Undo every applied method, newest first, whatever fails: the failures."""
    errors = []
    for method, handle in reversed(done):
        try:
            method.remove(handle)
        except Exception as exc:  # keep undoing the others
            errors.append(exc)
    return errors


def batch_ids(expanded: ExpandedPrompt, n: int, cfg: bool, tokens: int) -> torch.Tensor:
    """The token ids of the UNet's text batch, row for row: diffusers puts the unconditional
    half first under CFG; those rows hold no concept (concepts are refused in negative prompts)."""
    ids = list(expanded.token_ids[:tokens]) + [NO_TOKEN] * max(0, tokens - len(expanded.token_ids))
    cond = torch.tensor([ids] * n)
    return torch.cat([torch.full_like(cond, NO_TOKEN), cond]) if cfg else cond


def prompt_tails(expanded: ExpandedPrompt, n_tokens: int) -> dict[str, list[int]]:
    """The end of the sequence (EOS and the padding after it) dealt out among the prompt's
    concepts, of every method, in the order they are first named (`tail_shares`): a CNS
    concept's values act on its share alone (scope.py), a Cones 2 concept's end-of-sequence
    residuals are added there (cones2.py), and layout guidance steers each share into its
    concept's box. One concept keeps the whole end. Dealt among the CNS concepts only,
    a CNS concept beside a Cones 2 one kept the whole end, whose last position sums up the whole
    prompt, the other concept's words included, and steered it into its own box: the other's
    shape came out there (docs/tuning.md, "Mixed methods share the end of the sequence")."""
    eos = len(expanded.token_ids) - 1
    if not expanded.names or eos >= n_tokens:
        return {}
    shares = tail_shares(eos, n_tokens, len(expanded.names))
    return {name: list(share) for name, share in zip(expanded.names, shares)}


def check_negative_prompt(negative_prompt: str | None, tokenizer, guidance_scale: float,
                          metas: Mapping[str, ConceptMeta] | None = None) -> None:
    """A concept in the negative branch would need its weights, mask or residual applied to the
    unconditional pass alone; rather than pass "<rex>" through as text, say so, and of one of
    `metas` written as its plain token word too. Nor is a negative prompt cut short, blank, or
    given where guidance is off (it acts through the guidance's unconditional branch, which a
    scale of 1 skips) without a word."""
    if negative_prompt is not None and not negative_prompt.strip():
        raise blank_negative()
    if negative_prompt and guidance_scale <= 1.0:
        raise BadInput(f"A negative prompt acts through classifier-free guidance, which is off at "
                       f"a guidance scale of {guidance_scale:g}: it would change nothing.",
                       "Raise --guidance-scale above 1, or leave --negative out.")
    if negative_prompt and referenced_names(negative_prompt, "negative prompt"):
        raise BadInput("Concept names (<name>) cannot be used in the negative prompt.",
                       "Describe what to avoid in plain words, or leave the concept out.")
    if negative_prompt:
        check_length(tokenizer, negative_prompt, "negative prompt")
        check_plain_words(negative_prompt, metas or {}, tokenizer, "negative prompt")


NATIVE_TIMES = 4   # sides generated: from the model's own over this to the model's own times this


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) in pixels: the model's native size where not given; BadInput for a size
    the pipeline refuses (diffusers' Stable Diffusion pipeline takes multiples of 8 only) or its
    VAE cannot divide, and for a side over NATIVE_TIMES the native one (SD 1.5: 2,048 px): the
    model draws nothing good there, and a step's attention cost grows with the square of the
    pixels (on the 32 px toy world 512 px took a minute a step, and a cancel waits for a step)."""
    default = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    h, w = height or default, width or default
    step = math.lcm(8, int(pipe.vae_scale_factor))   # the UNet pads odd latent sizes itself
    if h % step or w % step or h < step or w < step:
        raise BadInput(f"Image size {w}x{h} is not a positive multiple of {step} pixels.",
                       f"Use width and height divisible by {step}.")
    most, least = NATIVE_TIMES * default, max(step, default // NATIVE_TIMES)
    if max(h, w) > most:
        raise BadInput(f"Image size {w}x{h} is over {most} px a side, {NATIVE_TIMES} times what this "
                       f"model draws ({default} px).", f"Use sides from {least} to {most} px.")
    if min(h, w) < least:   # a few latent cells: noise, not a small picture
        raise BadInput(f"Image size {w}x{h} is under {least} px a side, a {NATIVE_TIMES}th of what "
                       f"this model draws ({default} px).", f"Use sides from {least} to {most} px.")
    return h, w


def check_steps(pipe, steps: int) -> None:
    """Denoising steps the scheduler can space: with an offset (SD's DDIM adds 1 to every
    timestep) as many steps as training timesteps would index past the last one."""
    config = pipe.scheduler.config
    most = int(config.num_train_timesteps) - int(getattr(config, "steps_offset", 0) or 0)
    # "leading" spacing (SD's own schedulers) puts a lone step at the schedule's end, t = 1, and
    # "linspace" at t = 0: the noise is not denoised at all, and a picture of noise came back as
    # a success. Only "trailing" starts its one step from the top.
    least = 1 if getattr(config, "timestep_spacing", "leading") == "trailing" else 2
    if not least <= steps <= most:
        raise BadInput(f"steps must be between {least} and {most} for this model's scheduler, not "
                       f"{steps}{' (its one step denoises nothing)' if steps == 1 else ''}.",
                       "Stable Diffusion looks its best at 20-50 steps.")


def generate(pipe, prompt: str, records_by_name: Mapping[str, ConceptRecord],
             boxes: Iterable[Box | str] = (), n: int = 1, seed: int = 0, steps: int | None = None,
             guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
             progress: ProgressFn | None = None, cancel: CancelToken | None = None, *,
             apply_resident: bool = False, negative_prompt: str | None = None,
             guidance: GuidanceConfig | None = None, output_type: str = "pil") -> list:
    """Generate `n` images for `prompt`. `records_by_name` must hold every `<name>` the prompt
    uses (others are ignored). Raises NotFound / BadInput for bad prompts and boxes, Cancelled
    when `cancel` fires (at the next step). `guidance_scale` None: the model's recommended
    CFG scale (`model.recommended_guidance`); `steps` None: its steps (`recommended_steps`)."""
    if not 1 <= n <= MAX_IMAGES:
        raise BadInput(f"n must be between 1 and {MAX_IMAGES}, not {n}.")
    steps = recommended_steps(pipe) if steps is None else steps
    check_steps(pipe, steps)
    if guidance_scale is None:
        guidance_scale = recommended_guidance(pipe)
    metas = {k: r.meta for k, r in records_by_name.items()}
    check_negative_prompt(negative_prompt, pipe.tokenizer, guidance_scale, metas)
    expanded = expand(prompt, metas, pipe.tokenizer)
    layout = check_boxes(boxes, expanded)
    h, w = image_size(pipe, height, width)
    cfg = guidance_scale > 1.0
    records = [records_by_name[name] for name in expanded.names]
    report = ProgressReporter(progress, "generate", steps)
    if cancel is not None:
        cancel.check()

    with torch.no_grad(), applied(pipe, records, apply_resident) as handles:
        emb = encode(pipe, expanded, n, cfg, handles, negative_prompt)
        latent_hw = (h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)
        state = GuidanceState.for_scheduler(pipe.scheduler, steps, latent_hw, cfg)

        def on_step_end(_pipe, i, _t, kwargs):
            state.on_step_end(i)
            report(i + 1)
            if cancel is not None:
                cancel.check()
            return kwargs

        config = guidance or GuidanceConfig()
        ids = batch_ids(expanded, n, cfg, emb.cond.shape[1])
        guided = contextlib.nullcontext()
        tails = prompt_tails(expanded, emb.cond.shape[1])
        if layout:
            bias = LayoutBias(layout, expanded, emb.cond.shape[1], config, tails=tails)
            guided = layout_guidance(pipe.unet, bias, state, config)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        report(0)
        scoped = prompt_scope(pipe.unet, ids, tails)
        with guided, scoped:
            out = pipe(prompt_embeds=emb.cond, negative_prompt_embeds=emb.uncond,
                       num_inference_steps=steps, guidance_scale=guidance_scale, height=h,
                       width=w, generator=gens, output_type=output_type,
                       callback_on_step_end=on_step_end)
    return list(out.images)


@dataclass
class Overhead:
    plain_s: float
    guided_s: float

    @property
    def ratio(self) -> float:
        return self.guided_s / self.plain_s


def guidance_overhead(pipe, prompt: str, records_by_name: Mapping[str, ConceptRecord],
                      boxes: list[str], *, steps: int = 20, n: int = 1, repeats: int = 5,
                      seed: int = 0) -> Overhead:
    """Best-of-`repeats` time of the same request without and with its boxes (for the
    overhead bench; not a test). Runs alternate plain/guided after one warm-up of each, so a
    busy machine slows both alike. On CPU the clock is this process's CPU time (robust to other
    processes sharing the cores); on a GPU, synchronised wall time."""
    cuda = pipe.unet.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time

    def timed(b) -> float:
        t0 = clock()
        generate(pipe, prompt, records_by_name, b, n=n, seed=seed, steps=steps)
        if cuda:
            torch.cuda.synchronize()
        return clock() - t0

    timed([]), timed(boxes)
    plain, guided = [], []
    for _ in range(repeats):
        plain.append(timed([]))
        guided.append(timed(boxes))
    return Overhead(min(plain), min(guided))


def unet_overhead(unet, latent_hw: tuple[int, int], *, repeats: int = 3) -> Overhead:
    """One UNet call on a CFG batch of 2 (random latents and text, t = 500) without and with
    two-box layout guidance: the guidance cost where it matters, on any UNet (for example an
    SD 1.5-shaped one with random weights), without a text encoder or VAE. Same clocks and
    alternation as `guidance_overhead`."""
    from cns_daemon.prompts import ConceptSpan

    gen = torch.Generator().manual_seed(0)
    width = int(unet.config.cross_attention_dim)
    device, dtype = unet.device, unet.dtype
    x = torch.randn(2, int(unet.config.in_channels), *latent_hw, generator=gen).to(device, dtype)
    text = torch.randn(2, 77, width, generator=gen).to(device, dtype)
    expanded = ExpandedPrompt("", tuple(range(10)), (ConceptSpan("a", "cones2", (3,), 3),
                                                     ConceptSpan("b", "cones2", (6, 7), 7)))
    layout = check_boxes(["a=0,0,0.5,1", "b=0.5,0,1,1"], expanded)
    config = GuidanceConfig()
    state = GuidanceState([200.0], latent_hw, cfg=True)
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time

    def timed(guided: bool) -> float:
        ctx = (layout_guidance(unet, LayoutBias(layout, expanded, 77, config), state, config)
               if guided else contextlib.nullcontext())
        t0 = clock()
        with torch.no_grad(), ctx:
            unet(x, torch.tensor(500, device=device), encoder_hidden_states=text)
        if cuda:
            torch.cuda.synchronize()
        return clock() - t0

    timed(False), timed(True)
    plain, guided = [], []
    for _ in range(repeats):
        plain.append(timed(False))
        guided.append(timed(True))
    return Overhead(min(plain), min(guided))


__all__ = ["generate", "encode", "applied", "Embeddings", "guidance_overhead", "unet_overhead",
           "Overhead"]
