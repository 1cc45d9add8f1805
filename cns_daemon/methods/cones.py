"""Cones — concept neurons found by the scaled-gradient rule (paper 000).

A K/V weight θ is a concept neuron when scaling it down lowers the concept-implanting loss
(denoising on the photos captioned "a photo of <token> <class>" + λ · prior loss on class
images), i.e. when θ · ∂L/∂θ accumulated along a short path is large (Eq. 9–11).

Algorithm A2 (appendix): re-parametrise every K/V weight as γ = ξ ⊙ θ with ξ = 1, take K plain
gradient-descent steps of size ρ on ξ (∇_ξ L = θ ⊙ ∇_γ L), then M_p = (1 − ξ_K)/ρ and the concept
neurons are M_p > τ. τ can be given directly or as a target sparsity (the top `sparsity` % of all
K/V weights by M_p, among those with M_p > 0). `algorithm1_scores` is the explicit Algorithm 1
accumulation, kept for the test that A2 agrees with it.

What the neurons then hold (`values`). The paper optimises the concept-implanting loss on the
concept neurons at four precisions (float32, float16, quaternary, binary; Fig. 3) and finds them
alike; binary, shutting the neurons without training, is its default. On the toy world shutting
draws no look at any sparsity, step count or ρ (docs/tuning.md "Cones swept on fixture run 6"),
so `tuned`, the default here, trains the neurons' values on the photos' loss, starting from shut
(0: binary is where it starts), and stores them as float16 (the paper's float16 setting);
`shut` is the paper's binary form, stored as integer indices alone.

Where they act (`scope`). `concept`, the default: only on prompts that name the concept, on its
words and its share of the sequence's end, as CNS's values (common/scope.py says why); the
unconditional half of guidance and every other prompt see the model without it. `all`, the
paper's: written into the weights for the whole request. Measured in docs/tuning.md ("Cones
learns a look: trained values, scoped").

The record is the index set per tensor (shut) or the values per tensor (tuned). Generating with
the concept puts them in for that request only; several Cones concepts put in all of theirs.
`joint_finetune` repeats A2 on the summed losses of several subjects, limited to the union of
their sets (paper §3.3), and returns the refined union: for the paper's form (values shut) only,
and from Python only (no command runs it; the toy world gives it nothing to refine: shut
neurons draw no look there).

The token is a rare existing token, never trained: Cones changes no embedding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cns_daemon.memory import loop_context
from cns_daemon.api.errors import BadInput
from cns_daemon.methods import common as C
from cns_daemon.methods.common.kv import check_positions
from cns_daemon.methods.common.scope import TokenScope
from cns_daemon.methods.base import CancelToken, LearnSpec, PerRequest, ProgressFn, ProgressReporter
from cns_daemon.model import fingerprint
from cones_store.records import ConceptMeta, ConceptRecord, SparseDelta

LossFn = Callable[[int], torch.Tensor]


@dataclass
class ConesParams:
    steps: int = 30               # K
    rho: float = 1e-2             # ρ, step size on ξ (plain gradient descent)
    sparsity: float = 10.0        # % of all K/V weights kept (picks τ); 0: use `tau`
    tau: float = 0.0              # threshold on M_p when sparsity is 0
    lambda_prior: float = 1.0
    prior_images: int = 8
    prior_batch: int = 2
    prior_steps: int = 20
    variants: int = 4
    token: str = ""
    values: str = "tuned"         # tuned: trained from 0 on the photos' loss | shut: 0 (binary)
    tune_steps: int = 900         # tuned: Adam steps on the neurons' values
    lr: float = 3e-3              # tuned: Adam's learning rate
    scope: str = "concept"        # concept: where the concept is named | all: the whole request

    def inert(self) -> dict[str, str]:
        """Options these settings leave unread, and why (common.options.inert_note)."""
        out = {"tau": "sparsity is not 0: it sets the threshold"} if self.sparsity > 0 else {}
        if self.values == "shut":
            out.update(dict.fromkeys(("tune_steps", "lr"), "values `shut`: none are trained"))
        if self.lambda_prior == 0:   # (_prepare draws no class images then)
            out.update(dict.fromkeys(("prior_images", "prior_batch", "prior_steps"),
                                     "lambda_prior 0: no prior term"))
        return out

    def validate(self, given: frozenset[str] = frozenset()) -> None:   # shared bounds (rho, lr, counts): common.options.LOWER_BOUNDS
        if self.steps < 1:
            raise BadInput("steps must be ≥ 1.")
        if not 0 <= self.sparsity <= 100:
            raise BadInput("sparsity is a percentage in [0, 100].")
        if self.values not in ("tuned", "shut"):
            raise BadInput("values must be `tuned` or `shut`.")
        if self.scope not in ("concept", "all"):
            raise BadInput("scope must be `concept` or `all`.")


# -- the two score computations ------------------------------------------------------------------

def _gradients(pipe, params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor],
               loss_fn: LossFn, k: int) -> tuple[float, dict[str, torch.Tensor]]:
    """∇L at weights = `values` (written into the live tensors), for step k's loss. On a float16
    UNet the loss is scaled up first (gradients under float16's 6e-8 flush to zero there; see
    common.LossScale) and, where that overflowed, taken again unscaled."""
    for scale in ((C.FLOAT16_LOSS_SCALE, 1.0) if pipe.unet.dtype == torch.float16 else (1.0,)):
        with torch.no_grad():
            for name, p in params.items():
                p.data.copy_(values[name].to(p.dtype))
                p.grad = None
        loss = loss_fn(k)
        (loss * scale).backward()
        grads = {n: p.grad.float() / scale for n, p in params.items()}
        if scale == 1.0 or all(bool(torch.isfinite(g).all()) for g in grads.values()):
            break
    return float(loss.detach()), grads


def _walk(pipe, loss_fn: LossFn, steps: int, progress: ProgressFn | None,
          cancel: CancelToken | None, step: Callable[[int, Callable], float], phase: str,
          memory=None):
    params = C.kv_weights(pipe.unet)
    pristine = {n: p.detach().clone() for n, p in params.items()}

    @contextlib.contextmanager
    def aside():
        """Between two steps (a generate job): the walk writes ξ ⊙ θ into the live weights, so
        the pristine ones go back for the generation, and the walk's after it."""
        with torch.no_grad():
            walked = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.data.copy_(pristine[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.data.copy_(walked[n])

    try:
        with C.only_trainable(C.pipeline_modules(pipe), params.values()):
            # The loss encodes its captions up front, so the loop needs neither VAE nor text encoder.
            C.run_steps(steps, lambda k: step(k, lambda vals: _gradients(pipe, params, vals, loss_fn, k)),
                        progress, cancel, phase,
                        around=lambda: loop_context(pipe, memory, text_encoder_needed=False),
                        aside=aside)
    finally:
        with torch.no_grad():  # the walk moved the live weights: put them back bit-exactly
            for n, p in params.items():
                p.data.copy_(pristine[n])
    return pristine


def a2_scores(pipe, loss_fn: LossFn, steps: int, rho: float, *,
              restrict: dict[str, np.ndarray] | None = None, progress: ProgressFn | None = None,
              cancel: CancelToken | None = None, memory=None) -> dict[str, torch.Tensor]:
    """Algorithm A2: M_p = (1 − ξ_K)/ρ per K/V weight. With `restrict`, ξ moves only at those
    positions (the rest keep ξ = 1, hence M_p = 0)."""
    params = C.kv_weights(pipe.unet)
    theta = {n: p.detach().float().clone() for n, p in params.items()}
    xi = {n: torch.ones_like(t) for n, t in theta.items()}
    allow = None
    if restrict is not None:
        allow = {n: torch.zeros(t.numel(), dtype=torch.bool, device=t.device) for n, t in theta.items()}
        for n, idx in restrict.items():
            allow[n][torch.as_tensor(idx).to(allow[n].device)] = True
        allow = {n: m.view_as(theta[n]) for n, m in allow.items()}

    def step(k, grads_at):
        loss, grads = grads_at({n: xi[n] * theta[n] for n in theta})
        for n, g in grads.items():
            d = theta[n] * g                      # ∇_ξ L = θ ⊙ ∇_γ L  (A13)
            if allow is not None:
                d = d * allow[n]
            xi[n] -= rho * d
        return loss

    _walk(pipe, loss_fn, steps, progress, cancel, step, "train", memory)
    return {n: (1.0 - xi[n]) / rho for n in xi}


def algorithm1_scores(pipe, loss_fn: LossFn, steps: int, rho: float) -> dict[str, torch.Tensor]:
    """Algorithm 1, explicitly: θ¹ = θ, θ^{k+1} = θ^k ⊙ (1 − ρ θ^k ⊙ ∇L(θ^k)) (Eq. 10–11),
    M_p = Σ_k θ^k ⊙ ∇L(θ^k) (Eq. 9)."""
    params = C.kv_weights(pipe.unet)
    cur = {n: p.detach().float().clone() for n, p in params.items()}
    acc = {n: torch.zeros_like(t) for n, t in cur.items()}

    def step(k, grads_at):
        loss, grads = grads_at(cur)
        for n, g in grads.items():
            s = cur[n] * g
            acc[n] += s
            cur[n] = cur[n] * (1 - rho * s)
        return loss

    _walk(pipe, loss_fn, steps, None, None, step, "train")
    return acc


def select_neurons(scores: dict[str, torch.Tensor], *, sparsity: float = 0.0,
                   tau: float = 0.0) -> tuple[dict[str, np.ndarray], float]:
    """Concept neurons M_p > τ; with `sparsity` > 0, τ is chosen so that `sparsity` % of all
    weights are kept (never one with M_p ≤ 0: scaling it down would not help). Returns the
    index sets and the τ used."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    if sparsity > 0:
        k = max(1, round(flat.numel() * sparsity / 100))
        top = flat.topk(k)                 # exactly k, whatever the ties at the threshold
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[top.indices] = True
        keep &= flat > 0
        tau = max(float(top.values[-1]), 0.0)
    else:
        keep = flat > tau
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        idx = C.mask_indices(keep[start:start + size])
        start += size
        if len(idx):
            out[n] = idx
    return out, tau


# -- the method -----------------------------------------------------------------------------------

def prepare(pipe, photos: list[Path], token: str, spec: LearnSpec, hp: ConesParams, *,
            progress: ProgressFn | None, cancel: CancelToken | None) -> C.Prepared:
    """Photos and class images. The class images are drawn by the live weights (CNS concepts
    included), keyed by their digest (at bf16 precision: an fp32 and a bf16 load share them,
    near enough for a prior)."""
    wanted = hp.lambda_prior > 0 and hp.prior_images > 0   # only then hash the live weights
    prior = C.Prior(hp.prior_images, hp.prior_steps, drawn_by=fingerprint(pipe)) if wanted else None
    return C.prepare(pipe, photos, spec, token, variants=hp.variants, prior=prior,
                     progress=progress, cancel=cancel)


def implanting_loss(pipe, prep: C.Prepared, spec: LearnSpec, hp: ConesParams, *,
                    lambda_prior: float | None = None, unet_context=None) -> C.ConceptLoss:
    """The concept-implanting loss (photos + λ · prior) as a per-step closure."""
    return C.ConceptLoss(pipe, prep.latents, prep.photos.captions, prior_latents=prep.prior,
                         prior_prompt=C.prior_prompt(spec.class_word),
                         lambda_prior=hp.lambda_prior if lambda_prior is None else lambda_prior,
                         prior_batch=hp.prior_batch, seed=spec.seed, unet_context=unet_context)


def tune_values(pipe, prep: C.Prepared, spec: LearnSpec, hp: ConesParams,
                masks: dict[str, np.ndarray], progress: ProgressFn | None = None,
                cancel: CancelToken | None = None) -> dict[str, np.ndarray]:
    """The concept neurons' values trained on the implanting loss from shut (0), as float16 per
    tensor (what the record stores). Scoped (`scope concept`), the values reach only the rows
    naming the token, so class prompts see the model as it is and the prior term has nothing to
    hold: it is left out. The live weights are back as they were on return, or on any error."""
    kv = C.kv_weights(pipe.unet)
    trainees = {n: C.TrainableValues.at(kv[n], i, start=torch.zeros(len(i))) for n, i in masks.items()}
    opt = torch.optim.Adam([t.values for t in trainees.values()], lr=hp.lr)
    scale = C.LossScale(pipe.unet.dtype, pipe.unet.device)   # float16 UNets: see LossScale
    scoped, around = contextlib.nullcontext(), None
    if hp.scope == "concept":
        scope = C.token_scope(pipe.unet)
        scoped = scope.training(C.anchor(pipe.tokenizer, prep.token, spec.class_word),
                                {n: t.weight.detach().clone() for n, t in trainees.items()})
        around = lambda prompts: scope.prompt(C.tokenize(pipe, prompts))  # noqa: E731
    loss = implanting_loss(pipe, prep, spec, hp, unet_context=around,
                           lambda_prior=0.0 if hp.scope == "concept" else None)

    def step(k: int) -> float:
        opt.zero_grad(set_to_none=True)
        for t in trainees.values():
            t.weight.grad = None
        value = loss(k)
        scale.backward(value)
        for t in trainees.values():   # the gradient reaches the whole weight: keep the neurons'
            t.take_grad()
        scale.step(opt)
        for t in trainees.values():
            t.write()
        return float(value.detach())

    @contextlib.contextmanager
    def aside():
        """Between two steps (a generate job): the live model as it was, then the values again."""
        for t in trainees.values():
            t.restore()
        try:
            with C.training_suspended(pipe.unet):
                yield
        finally:
            for t in trainees.values():
                t.write()

    try:
        with C.only_trainable(C.pipeline_modules(pipe), [t.weight for t in trainees.values()]), scoped:
            for t in trainees.values():
                t.write()
            # The loss encodes its captions up front, so the loop needs no text encoder.
            C.run_steps(hp.tune_steps, step, progress, cancel, "tune", aside=aside,
                        around=lambda: loop_context(pipe, spec.memory, text_encoder_needed=False))
    finally:
        for t in trainees.values():
            t.restore()
    return {n: t.values.detach().cpu().numpy().astype(np.float16) for n, t in trainees.items()}


def neurons(record: ConceptRecord) -> dict[str, np.ndarray]:
    """A Cones concept's neurons: its mask (shut) or its values' positions (tuned)."""
    return record.masks or {n: d.indices for n, d in record.deltas.items()}


def targets(record: ConceptRecord) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What each of its neurons holds while it is applied: 0 (shut) or its trained value."""
    if record.masks:
        return {n: (idx, np.zeros(len(idx), np.float32)) for n, idx in record.masks.items()}
    return {n: (d.indices, d.values.astype(np.float32)) for n, d in record.deltas.items()}


@dataclass
class ConesHandle:
    """What `apply` changed: values written into the weights, token rows, scoped concepts."""
    values: C.SavedValues
    rows: C.SavedRows | None = None
    scope: TokenScope | None = None
    scoped: list[str] = field(default_factory=list)


class ConesMethod(PerRequest):
    name = "cones"
    Params = ConesParams

    def learn(self, pipe, photos: list[Path], spec: LearnSpec, progress: ProgressFn | None = None,
              cancel: CancelToken | None = None, previous: list[ConceptRecord] | None = None
              ) -> ConceptRecord:
        hp = C.parse_options(ConesParams, spec.options, spec.steps)
        ConceptMeta(spec.name, "cones", spec.class_word, "")  # validates the name early
        # `previous` is every concept in use (the engine passes every stored one): its tokens are taken.
        token = C.concept_token(pipe.tokenizer, previous or [], hp.token)
        ProgressReporter(progress, "prepare", 1)(0, message=f"token {token}")
        prep = prepare(pipe, photos, token, spec, hp, progress=progress, cancel=cancel)
        scores = a2_scores(pipe, implanting_loss(pipe, prep, spec, hp), hp.steps, hp.rho,
                           progress=progress, cancel=cancel, memory=spec.memory)
        masks, tau = select_neurons(scores, sparsity=hp.sparsity, tau=hp.tau)
        if not masks:
            raise BadInput("No concept neurons were found for these photos.",
                           "Raise `sparsity`, lower `tau`, or give more steps.")
        n = C.count(masks)
        deltas = {}
        if hp.values == "tuned":
            kv = C.kv_weights(pipe.unet)
            tuned = tune_values(pipe, prep, spec, hp, masks, progress, cancel)
            deltas = {name: SparseDelta(idx, tuned[name], tuple(kv[name].shape))
                      for name, idx in masks.items()}
            masks = {}
        meta = ConceptMeta(
            spec.name, "cones", spec.class_word, token,
            hparams={**C.as_dict(hp), "token": token, "seed": spec.seed, "tau_used": tau,
                     "neurons": n, "fraction_kv": n / C.kv_total(pipe.unet)})
        # The store computes the overlap with earlier concepts when it keeps the record, and
        # the engine sets which archived photos it came from.
        return ConceptRecord(meta, masks=masks, deltas=deltas)

    def apply(self, pipe, records: list[ConceptRecord]) -> ConesHandle:
        """Put the concepts' neurons in: scoped ones into the UNet's token scope, the others
        written (a neuron two written concepts share holds the later one's value). A concept
        imported where its rare word was taken carries its old word's row under its new word
        (`Engine.import_record`): written too."""
        for rec in records:
            if rec.meta.method != "cones":
                raise BadInput(f"{rec.name} is a {rec.meta.method} concept, not a Cones one.")
        rows = {}
        for rec in records:
            rows.update(C.embedding_rows(pipe.text_encoder, pipe.tokenizer, rec.embeddings))
        kv = C.kv_weights(pipe.unet)
        written = [targets(r) for r in records if C.scope_of(r) == "all"]
        handle = ConesHandle(C.write_values(kv, merge_targets(written)))
        try:
            scoped = [r for r in records if C.scope_of(r) == "concept"]
            if scoped:
                handle.scope = C.token_scope(pipe.unet)
                for rec in scoped:
                    check_positions(kv, neurons(rec))
                    handle.scope.add(rec.name, C.anchor(pipe.tokenizer, rec.meta.token, rec.meta.class_word),
                                     targets(rec))
                    handle.scoped.append(rec.name)
            handle.rows = C.write_rows(pipe.text_encoder, rows)
        except BaseException:
            self.remove(handle)
            raise
        return handle

    def remove(self, handle: ConesHandle) -> None:
        for name in handle.scoped:
            handle.scope.remove(name)
        handle.scoped = []
        C.restore_values(handle.values)
        handle.values.old.clear()
        if handle.rows is not None:
            C.restore_rows(handle.rows)


def merge_targets(parts: list[dict[str, tuple[np.ndarray, np.ndarray]]]
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Several concepts' targets as one write per tensor; at a shared position the later wins."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part in parts:
        for name, (idx, vals) in part.items():
            if name in out:
                idx = np.concatenate([out[name][0], idx])
                vals = np.concatenate([out[name][1], vals])
            last = len(idx) - 1 - np.unique(idx[::-1], return_index=True)[1]
            out[name] = (idx[last], vals[last])
    return out


def joint_finetune(pipe, items: list[tuple[ConceptRecord, list[Path]]], *, steps: int = 10,
                   rho: float | None = None, tau: float = 0.0, seed: int = 0,
                   cache_dir: Path | None = None, progress: ProgressFn | None = None,
                   cancel: CancelToken | None = None) -> dict[str, np.ndarray]:
    """Paper §3.3: A2 on the sum of the subjects' concept-implanting losses, with ξ moving only
    inside the union of their concept neurons; returns the neurons of that union with M_p > τ
    (shut these instead of the plain union when generating the subjects together)."""
    if not items:
        raise BadInput("No concepts were given for the joint fine-tune.")
    tuned = [rec.name for rec, _ in items if not rec.masks]
    if tuned:   # its answer is a set to shut, which would throw trained values away
        raise BadInput(f"{tuned[0]} holds trained values: the joint fine-tune refines the paper's "
                       "shut neurons only.", "Give concepts learned with values=shut.")
    losses = []
    hp = None
    for rec, photos in items:
        hp = C.parse_options(ConesParams, {k: v for k, v in rec.meta.hparams.items()
                                           if k in ConesParams.__dataclass_fields__})
        spec = LearnSpec(rec.name, rec.meta.class_word, seed=seed, cache_dir=cache_dir)
        prep = prepare(pipe, photos, rec.meta.token, spec, hp, progress=progress, cancel=cancel)
        losses.append(implanting_loss(pipe, prep, spec, hp))
    union = C.union_indices([neurons(rec) for rec, _ in items])
    scores = a2_scores(pipe, lambda k: sum(l(k) for l in losses), steps,
                       rho if rho is not None else hp.rho, restrict=union,
                       progress=progress, cancel=cancel)
    refined, _ = select_neurons(scores, tau=tau)
    return refined


METHOD = ConesMethod()
