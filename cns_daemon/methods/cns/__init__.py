"""CNS — Concept Neuron Selection (paper 003), the default method.

Selection (selection.py). Concept neurons = base AND NOT general, strictly: no general neuron
is ever trained. General neurons: per row the top `top_p` % of the Eq. 3 score
|W[i, j]| · ||X[:, j]||₂ for any of the shipped calibration prompts (OR), scored on the
pretrained weights. Base neurons, by default (`selection eq3`, the paper's): per row the top
`base_top_p` % of the Eq. 3 score for each of the concept's captions, ANDed. With `selection
movement`: the `movement_percent` % of all K/V weights that move most in a short probe
fine-tune of every K/V weight and the token on the concept's photos (`probe_steps` at
`probe_lr`, prior preservation on), undone before the real training starts. The concept's
metrics record the share of K/V it trains and the share of those that are general (0), and a
note when fewer than `few_percent` % of K/V remain (the concept then lives mostly in its
token). Which settings are default is measured in docs/tuning.md.

Training. Only the concept neurons and the concept's token-embedding row change, with
loss = denoising on the photos + λ_prior · prior preservation on class images made by the base
model + λ₁‖M_reg ⊙ (W − W_prev)‖² + λ₂‖M ⊙ (W − W₀)‖², where M_reg marks the concept neurons
earlier concepts already tuned, W_prev are the live values before this concept (earlier concepts
included) and W₀ the pretrained ones. The weights are full tensors during the forward pass; the
selected values are a separate flat parameter scattered into them after every step, so no other
element can change.
The photos' loss weighs the object above its background (`mask`, common/masks.py; with
`background base` the background aims at what the base model predicts for the caption without the
token instead; with `background scenes` only on steps whose caption got a scene phrase the photo
does not show): a deviation from the paper's plain loss, so that a concept learns its object and
not its photos' backgrounds.

Scope (`scope`, docs/tuning.md "CNS scope"). `concept`, the default: the trained values act only
on prompts that hold the concept's token, on its words and the sequence's end (common/scope.py);
while training they sit in the weights and the scope takes them back out on every other row. A
prompt without the token then sees the base model exactly, so the class-image prior has nothing
to preserve (no class images are drawn) and λ₁ has no earlier values to keep (concepts never
meet). `all`, the paper's: the values are written into the weights for every prompt, with the
prior and λ₁ as above. This deviates from the paper on purpose: on the toy world, written values
moved the plain prompts and the earlier concepts (prior drop 0.219, forgetting 0.594 after six).

Fusion-free. `learn` leaves the concept applied to the live pipeline (written, or in the scope),
with exactly the values the record stores (the stored dtype is applied, so the live model equals
what the store rebuilds). `apply(records)` rebuilds at start-up (already-applied names are
skipped); `remove(handle)` or `unlearn(pipe, name)` takes concepts off again. Removing the most
recent concept restores every weight and token row bit-exactly. Removing an older one restores
its non-shared neurons bit-exactly; on neurons it shares with a later concept that later
concept's values stay (they were trained on top of it, pulled toward its values by λ₁), and
removing the later concept too then returns them to their values before the older one (see
layers.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cns_daemon.memory import loop_context
from cns_daemon.model import scene_phrases
from cns_daemon.api.errors import BadInput
from cns_daemon.methods import common as C
from cns_daemon.methods.base import CancelToken, LearnSpec, ProgressFn, ProgressReporter
from cns_daemon.methods.cns.layers import CNSStack, stack_for
from cns_daemon.methods.data import without_token
from cns_daemon.methods.cns.selection import (  # noqa: F401  (re-exported: the selection API)
    Selection, base_neurons, column_norms, concept_neurons, general_counts, general_neurons,
    general_share, movement_base, row_top, select)
from cones_store.records import ConceptMeta, ConceptRecord, SparseDelta


@dataclass
class CNSParams:
    """CNS's hyper-parameters. The paper's thresholds, λ, steps and learning rates are in a
    supplement we lack; every default here was chosen by measurement on the toy world, and
    docs/tuning.md has the tables and the commands that reproduce them."""

    scope: str = "concept"        # concept: the values act only where the concept is named
                                  # (common/scope.py) | all: written into the weights, as the
                                  # paper does (docs/tuning.md "CNS scope")
    steps: int = 900              # chosen with lr 3e-3 on fixture run 3 (300 at 1e-2: half as much)
    selection: str = "eq3"        # base neurons: eq3 (the paper's) | movement (probe fine-tune)
    movement_percent: float = 5.0  # movement: % of all K/V weights taken as base neurons
    probe_steps: int = 100        # movement: steps of the probe fine-tune (undone afterwards)
    probe_lr: float = 3e-3        # movement: Adam lr of the probe, every K/V weight
    top_p: float = 5.0            # % of each row selected per calibration prompt (general)
    base_top_p: float = 40.0      # eq3: % of each row selected per caption (base neurons); wider
                                  # than top_p, or base ⊆ general leaves nothing; 40 with scope
                                  # concept (20: named 0.76 vs 0.88, docs/tuning.md "CNS scope")
    few_percent: float = 0.1      # below this % of K/V as concept neurons, the learn result says so
    lr: float = 1.2e-2            # Adam, concept neurons (docs/tuning.md "CNS scope")
    lr_token: float = 5e-3        # Adam, the token-embedding row
    lambda_prior: float = 0.6     # prior-preservation weight, scope all only (1.0 held the look
                                  # back; 0.3 let plain prompts drift; measured at lr 6e-3 and
                                  # base_top_p 20: docs/tuning.md "CNS on fixture run 6")
    lambda_prev: float = 1.0      # λ₁: shared neurons toward earlier concepts' values (scope all)
    lambda_base: float = 0.0      # λ₂: all concept neurons toward the pretrained values
    prior_images: int = 8         # class images made by the base model (cached per class)
    prior_batch: int = 2          # class images per step
    prior_steps: int = 20         # denoising steps used to make a class image
    variants: int = 4             # augmented variants per photo
    mask: str = "border"          # border: weigh the object above its background, estimated from
                                  # the photo's border (common/masks.py) | none: the whole photo
    background: str = "photo"     # what a photo's background is held to: photo (the photo) |
                                  # base (what the base model predicts for the caption without the
                                  # token) | scenes (photo, and on half the steps a scene phrase
                                  # joins the caption and the background follows base); base and
                                  # scenes: scope concept only (docs/tuning.md "Object-weighted
                                  # loss", "Prompt fidelity over 20 concepts")
    caption_mix: float = 0.5      # photos with captions of their own (sidecar .txt or the request's)
                                  # train under their template caption on this share of steps, so
                                  # the concept holds with and without the caption's words
                                  # (docs/tuning.md "Photos with captions"); background photo only
                                  # (CNS; the baselines, Cones and Cones 2 train under captions alone)
    mask_background: float = 0.1  # the background's loss weight, relative to the object's, for
                                  # either target (docs/tuning.md "Object-weighted loss")
    delta_dtype: str = "float16"  # stored values: float16 | float32 (half the bytes; not tuned)
    token: str = ""               # specific rare tokens (`vectors` words); "" picks them
    vectors: int = 1              # token vectors per concept: rare words in a row, each a
                                  # trained embedding row (docs/tuning.md "Token vectors")
    token_init: str = "token"     # start the row from the rare token's own row | the "class" word's

    def inert(self) -> dict[str, str]:
        """Options these settings leave unread, and why (common.options.inert_note)."""
        out = {}
        if self.scope == "concept":
            out.update(dict.fromkeys(("lambda_prior", "prior_images", "prior_batch", "prior_steps"),
                                     "scope `concept`: no class prompt sees the values"))
            out["lambda_prev"] = "scope `concept`: concepts' values never meet"
        elif self.lambda_prior == 0:
            out.update(dict.fromkeys(("prior_images", "prior_batch", "prior_steps"),
                                     "lambda_prior 0: no prior term"))
        if self.selection == "eq3":
            out.update(dict.fromkeys(("movement_percent", "probe_steps", "probe_lr"), "selection `eq3`"))
        else:
            out["base_top_p"] = "selection `movement`"
        if self.mask == "none":
            out["mask_background"] = "mask `none`"
        return out

    def validate(self, given: frozenset[str] = frozenset()) -> None:
        if not (0 < self.top_p <= 100 and 0 < self.base_top_p <= 100
                and 0 <= self.few_percent <= 100):
            raise BadInput("top_p and base_top_p must be in (0, 100], few_percent in [0, 100].")
        if self.selection not in ("movement", "eq3"):
            raise BadInput("selection must be `movement` or `eq3`.")
        if not 0 < self.movement_percent <= 100:   # lr, counts: common.options.LOWER_BOUNDS
            raise BadInput("movement_percent must be in (0, 100].")
        if self.steps < 0:
            raise BadInput("steps must be ≥ 0.")
        if self.scope not in ("concept", "all"):
            raise BadInput("scope must be `concept` or `all`.")
        if self.mask not in ("border", "none") or not 0 <= self.mask_background <= 1:
            raise BadInput("mask must be `border` or `none`, mask_background in [0, 1].")
        if not 0 <= self.caption_mix <= 1:
            raise BadInput("caption_mix must be in [0, 1].")
        if self.background not in ("photo", "scenes", "base"):
            raise BadInput("background must be `photo`, `scenes` or `base`.")
        if self.background != "photo" and (self.scope != "concept" or self.mask == "none"):
            # (it trained as `photo` without a word: _distils)
            raise BadInput(f"background `{self.background}` needs scope `concept` and mask `border`: "
                           "it holds the background to what a prompt without the token draws, "
                           "told from the object by the photo's border.",
                           "Leave out the background option, or the scope or mask one.")
        if "caption_mix" in given and self.background != "photo":   # (plain_captions: none to mix)
            raise BadInput(f"caption_mix applies with background `photo` only: with `{self.background}` "
                           "the photos train under their own captions, which the background's target "
                           "is drawn from.", "Leave out caption_mix, or the background option.")
        if not 1 <= self.vectors <= C.MAX_VECTORS:
            raise BadInput(f"vectors must be between 1 and {C.MAX_VECTORS}.")
        if self.token_init not in ("token", "class"):
            raise BadInput("token_init must be `token` or `class`.")
        if self.delta_dtype not in ("float32", "float16"):
            raise BadInput("delta_dtype must be float32 or float16.")


# -- learning -----------------------------------------------------------------------------------

@dataclass
class _Trainee(C.TrainableValues):
    """The selected values of one tensor, trainable, with the references the regularisers pull
    toward (`prev`, what the weight held: the earlier concepts' values where they share it)."""
    base: torch.Tensor
    reg_mask: torch.Tensor  # bool, shared with earlier concepts


def prepare(pipe, photos: list[Path], spec: LearnSpec, hp: "CNSParams",
            progress: ProgressFn | None, cancel: CancelToken | None,
            previous: list[ConceptRecord] | None = None) -> C.Prepared:
    """Token, photos and class images with CNS's settings (also used by the bench baselines).
    The token avoids every token in use: live CNS concepts and `previous` records. The class
    images (scope `all` only) are drawn by the base model, not by the earlier concepts."""
    stack = stack_for(pipe)
    token = C.concept_token(pipe.tokenizer, list(previous or []) + stack.records(), hp.token,
                            hp.vectors)
    ProgressReporter(progress, "prepare", 1)(0, message=f"token {token}")
    # Scoped values and the token row act only on prompts with the token, so the class prompt's
    # loss has no gradient for them: with scope `concept` no class images are drawn.
    prior = (C.Prior(hp.prior_images, hp.prior_steps, drawn_by=stack.base_fingerprint,
                     drawing=stack.base_weights)
             if hp.lambda_prior > 0 and hp.scope == "all" else None)
    return C.prepare(pipe, photos, spec, token, variants=hp.variants, prior=prior,
                     progress=progress, cancel=cancel)


def _distils(hp: CNSParams) -> bool:
    """The background is held to the base model's prediction: with scoped values a caption
    without the token reaches the base model exactly; written values leave no such model."""
    return hp.mask != "none" and hp.background in ("scenes", "base") and hp.scope == "concept"


def plain_captions(prep: C.Prepared, hp: CNSParams) -> list[str] | None:
    """The photos' template captions, to mix with captions of their own; None when no photo
    has one (nothing to mix) or the background follows a teacher (its captions are the photos')."""
    if not prep.photos.captioned or _distils(hp) or hp.caption_mix == 0:
        return None
    return prep.photos.templates


def photo_weights(prep: C.Prepared, hp: CNSParams) -> torch.Tensor | None:
    if hp.mask == "none":
        return None
    return C.loss_weights(prep.masks, prep.latents.shape[-1], hp.mask_background)


def background_teacher(prep: C.Prepared, hp: CNSParams) -> tuple[torch.Tensor, list[str]] | None:
    if not _distils(hp):
        return None
    return (C.latent_masks(prep.masks, prep.latents.shape[-1]),
            [without_token(c, prep.token) for c in prep.photos.captions])


def mask_note(prep: C.Prepared, hp: CNSParams, names: list[str] | None = None) -> str | None:
    """What the learn result says when some photos were trained whole: each by its number in
    the order given and, where known, the name it was given with (`LearnSpec.photo_names`)."""
    missed = [f"{i + 1} ({names[i]})" if names else str(i + 1)
              for i, ok in enumerate(prep.found.tolist()) if not ok]
    if hp.mask == "none" or not missed:
        return None
    return (f"the object could not be told from the background in photo {', '.join(missed)} of "
            f"{len(prep.found)} (a busy border, or the object fills the frame), so it was trained "
            f"whole and its background may show up in generations; photos on a plain "
            f"background avoid this")


def token_rows(pipe, prep: C.Prepared, spec: LearnSpec, hp: CNSParams) -> C.TrainableRows:
    """The concept's trainable token rows, started from the rare words' own rows or (token_init
    `class`) every row from the class word's, as textual inversion starts from a coarse word."""
    init = None
    if hp.token_init == "class":
        class_ids = C.token_ids(pipe.tokenizer, spec.class_word)
        init = pipe.text_encoder.get_input_embeddings().weight[class_ids].mean(0)
    return C.TrainableRows(pipe.text_encoder, pipe.tokenizer, prep.token, init=init)


@dataclass
class _Run:
    trainees: list[_Trainee]
    row: C.TrainableRows
    losses: list[float]


def _train(pipe, stack: CNSStack, prep: C.Prepared, spec: LearnSpec, hp: CNSParams,
           indices: dict[str, np.ndarray], tuned: dict[str, np.ndarray], lr: float, steps: int,
           progress: ProgressFn | None, cancel: CancelToken | None, phase: str = "train") -> _Run:
    """Train the `indices` values of the K/V tensors and the token's embedding row with the CNS
    loss. On return (or on any exception) the weights hold their values from before; the
    trained values are in the returned trainees, the trained row in the returned row."""
    row = token_rows(pipe, prep, spec, hp)
    trainees = _trainees(stack, indices, tuned)
    scoped = contextlib.nullcontext()
    around = None
    if hp.scope == "concept":  # the written values reach only the rows that hold the token
        scope = C.token_scope(pipe.unet)
        scoped = scope.training(C.anchor(pipe.tokenizer, prep.token, spec.class_word),
                                {t_name: t.weight.detach().clone()
                                 for t_name, t in zip(indices, trainees)})
        around = lambda prompts: scope.prompt(C.tokenize(pipe, prompts))  # noqa: E731
    loss = C.ConceptLoss(pipe, prep.latents, prep.photos.captions, prior_latents=prep.prior,
                         prior_prompt=C.prior_prompt(spec.class_word),
                         lambda_prior=hp.lambda_prior, prior_batch=hp.prior_batch,
                         seed=spec.seed, text_grad=True, unet_context=around,
                         photo_weights=photo_weights(prep, hp),
                         background_teacher=background_teacher(prep, hp),
                         scenes=scene_phrases(pipe) if hp.background == "scenes" else (),
                         plain_captions=plain_captions(prep, hp), caption_mix=hp.caption_mix)
    opt = torch.optim.Adam([{"params": [t.values for t in trainees], "lr": lr},
                            {"params": [row.param], "lr": hp.lr_token}])
    weights = [t.weight for t in trainees]
    shared = [bool(t.reg_mask.any()) for t in trainees]
    scale = C.LossScale(pipe.unet.dtype, pipe.unet.device)   # float16 UNets: see LossScale

    def pull(t: _Trainee, has_shared: bool):
        """The regularisers' terms that are not zero by construction (the probe trains every
        K/V weight: a zero-weighted term over all of them each step is wasted work)."""
        out = 0.0
        if hp.lambda_prev and has_shared:
            out = out + hp.lambda_prev * ((t.values - t.prev)[t.reg_mask] ** 2).sum()
        if hp.lambda_base:
            out = out + hp.lambda_base * ((t.values - t.base) ** 2).sum()
        return out

    def step(k: int) -> float:
        opt.zero_grad(set_to_none=True)
        for w in weights:
            w.grad = None
        parts = loss.parts(k)
        scale.backward(parts.total + sum(pull(t, h) for t, h in zip(trainees, shared)))
        for t in trainees:  # the denoising gradient reaches the full weight; keep ours
            t.take_grad()
        scale.step(opt)
        for t in trainees:
            t.write()
        return float(parts.total.detach())

    @contextlib.contextmanager
    def aside():
        """Between two steps (a generate job): the live model without this concept's values
        and token row, then exactly as before."""
        row.__exit__(None, None, None)
        for t in trainees:
            t.restore()
        try:
            with C.training_suspended(pipe.unet):
                yield
        finally:
            for t in trainees:
                t.write()
            row.__enter__()

    try:
        with C.only_trainable(C.pipeline_modules(pipe), weights), row, scoped:
            losses = C.run_steps(steps, step, progress, cancel, phase,
                                 around=lambda: loop_context(pipe, spec.memory), aside=aside)
    finally:
        for t in trainees:  # the live model gets the *stored* values, or nothing
            t.restore()
    return _Run(trainees, row, losses)


def _trainees(stack: CNSStack, indices: dict[str, np.ndarray],
              tuned: dict[str, np.ndarray]) -> list[_Trainee]:
    out = []
    for name, idx_np in indices.items():
        w = stack.params[name]
        reg = np.isin(idx_np, tuned.get(name, np.empty(0, np.int64)))
        idx = torch.as_tensor(idx_np).to(w.device)
        out.append(_Trainee.at(w, idx_np, base=stack.base_values(name, idx).float(),
                               reg_mask=torch.as_tensor(reg).to(w.device)))
    return out


def choose_neurons(pipe, stack: CNSStack, prep: C.Prepared, spec: LearnSpec, hp: CNSParams,
                   progress: ProgressFn | None, cancel: CancelToken | None) -> Selection:
    """The concept neurons: base AND NOT general, with base neurons by Eq. 3 (`selection eq3`)
    or by the probe fine-tune (`selection movement`, see selection.py)."""
    ProgressReporter(progress, "select", 1)(0)
    if hp.selection == "eq3":
        return concept_neurons(pipe, stack, prep.photos.captions, hp.top_p, base_top_p=hp.base_top_p)
    every = {n: np.arange(w.numel()) for n, w in stack.params.items()}
    run = _train(pipe, stack, prep, spec, hp, every, {}, hp.probe_lr, hp.probe_steps, progress,
                 cancel, phase="probe")
    before = {n: t.prev.view(stack.params[n].shape) for n, t in zip(every, run.trainees)}
    after = {n: t.values.detach().view(stack.params[n].shape) for n, t in zip(every, run.trainees)}
    return concept_neurons(pipe, stack, prep.photos.captions, hp.top_p,
                           base=movement_base(before, after, hp.movement_percent))


class CNSMethod:
    name = "cns"
    Params = CNSParams
    resident = True

    def learn(self, pipe, photos: list[Path], spec: LearnSpec, progress: ProgressFn | None = None,
              cancel: CancelToken | None = None, previous: list[ConceptRecord] | None = None
              ) -> ConceptRecord:
        hp = C.parse_options(CNSParams, spec.options, spec.steps)
        ConceptMeta(spec.name, "cns", spec.class_word, "")  # validates the name early
        stack = stack_for(pipe)
        # λ₁ pulls shared neurons toward the values earlier concepts wrote into the weights;
        # scoped concepts write nothing and never meet, so a scoped learn has nothing to keep.
        earlier = ([r for r in (stack.records() if previous is None else previous)
                    if r.meta.method == "cns" and C.scope_of(r) == "all"]
                   if hp.scope == "all" else [])
        prep = prepare(pipe, photos, spec, hp, progress, cancel, previous)
        if cancel is not None:
            cancel.check()
        selection = choose_neurons(pipe, stack, prep, spec, hp, progress, cancel)
        indices = selection.indices
        run = _train(pipe, stack, prep, spec, hp, indices, stack.tuned(earlier), hp.lr, hp.steps,
                     progress, cancel)
        dtype = np.float16 if hp.delta_dtype == "float16" else np.float32
        deltas = {t_name: SparseDelta(idx, t.values.detach().cpu().numpy().astype(dtype),
                                      tuple(stack.params[t_name].shape))
                  for (t_name, idx), t in zip(indices.items(), run.trainees)}
        n = C.count(indices)
        token = prep.token
        share = n / C.kv_total(pipe.unet)
        metrics = {"loss_first": run.losses[0] if run.losses else None,
                   "loss_last": float(np.mean(run.losses[-10:])) if run.losses else None,
                   "kv_share": share, "general_share": general_share(pipe, stack, indices, hp.top_p)}
        notes = [mask_note(prep, hp, spec.photo_names)]
        if share * 100 < hp.few_percent:
            wider = ("base_top_p", hp.base_top_p) if hp.selection == "eq3" else (
                "movement_percent", hp.movement_percent)   # (the one its selection reads)
            notes.insert(0, f"only {n:,} concept neurons ({share:.3%} of K/V) remain once the general "
                            f"ones are left out, so the concept lives mostly in its token; "
                            f"--option {wider[0]}=N (now {wider[1]:g}) selects more")
        if any(notes):
            metrics["note"] = "; ".join(x for x in notes if x)
        if hp.mask != "none":
            metrics["mask_found"] = float(prep.found.float().mean())
        meta = ConceptMeta(
            spec.name, "cns", spec.class_word, token,
            hparams={**C.as_dict(hp), "token": token, "seed": spec.seed, "neurons": n,
                     "fraction_kv": share, "base_neurons": selection.base,
                     "general_neurons": selection.general, "base_general_neurons": selection.base_general},
            metrics=metrics, fingerprint=stack.base_fingerprint)
        # The store computes the overlap with earlier concepts when it keeps the record, and
        # the engine sets which archived photos it came from.
        record = ConceptRecord(meta, deltas=deltas, embeddings=run.row.embeddings())
        stack.push(record)
        return record

    def apply(self, pipe, records: list[ConceptRecord]) -> "CNSHandle":
        stack = stack_for(pipe)
        pushed = []
        for rec in records:
            if rec.meta.method != "cns":
                raise BadInput(f"{rec.name} is a {rec.meta.method} concept, not a CNS one.")
            if rec.name in stack.names():
                continue  # fusion-free: already live
            try:
                stack.push(rec)
            except BaseException:   # no handle goes back: take off the ones pushed before it
                self.remove(CNSHandle(stack, pushed))
                raise
            pushed.append(rec.name)
        return CNSHandle(stack, pushed)

    def remove(self, handle: "CNSHandle") -> None:
        for name in reversed(handle.names):
            handle.stack.pop(name)
        handle.names = []

    def unlearn(self, pipe, name: str) -> None:
        """Take a live concept off (e.g. one `learn` left applied)."""
        stack_for(pipe).pop(name)

    def applied(self, pipe) -> list[str]:
        return stack_for(pipe).names()


@dataclass
class CNSHandle:
    stack: CNSStack
    names: list[str] = field(default_factory=list)


METHOD = CNSMethod()
