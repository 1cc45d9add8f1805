"""The two baselines the quality bench compares the methods with (bench code, not product code).

- naive: sequential fine-tuning of ALL cross-attention K/V weights plus the concept's token
  embedding (Custom-Diffusion-like), with the published methods' loss (denoising on the whole
  photos + prior preservation on class images made by the base model) and CNS's step budget.
  CNS's own additions to that loss (the photo's border weighted down, the background teacher,
  scene phrases and caption mix) are not the baselines': they are what CNS is compared with.
- ti: textual inversion, only the concept's token embedding, the same loss and budget.

Both take their hyper-parameters from CNS's dataclass (`CNSParams`: steps, lr, lr_token,
lambda_prior, prior_images, prior_batch, prior_steps, variants, and the token's), so "same
budget" holds by construction; CNS-only fields (top_p, λ₁, λ₂, scope, masks) are refused. Their records are CNS-shaped
(`deltas` + `embeddings`; naive's delta covers every K/V position, ti's none), tagged with
`hparams["baseline"]`, and live on the pipeline through the CNS layer stack exactly like CNS
concepts: learn leaves the concept applied (sequential fine-tuning keeps what it did),
generation expands `<name>` to "<token> <class>", and removal is exact.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cns_daemon.api.errors import BadInput
from cns_daemon.memory import loop_context
from cns_daemon.methods import common as C
from cns_daemon.methods.base import CancelToken, LearnSpec, ProgressFn
from cns_daemon.methods.cns import CNSParams, prepare, token_rows
from cns_daemon.methods.cns.layers import stack_for
from cones_store.records import ConceptMeta, ConceptRecord, SparseDelta

BASELINES = ("naive", "ti")
# The CNSParams fields a baseline reads. The others (selection, scope, masks, the background's
# handling) are CNS's own: given to a baseline they are refused, not accepted and ignored.
READS = frozenset({"steps", "lr", "lr_token", "lambda_prior", "prior_images", "prior_batch",
                   "prior_steps", "variants", "token", "vectors", "token_init"})


def parse_options(name: str, options: dict, steps: int | None = None) -> CNSParams:
    """A baseline's hyper-parameters: CNS's defaults, `options` over them (only fields it reads);
    BadInput for any other."""
    unread = sorted(set(options) - READS)
    if unread:
        raise BadInput(f"The {name} baseline does not read {', '.join(map(repr, unread))}.",
                       f"It reads: {', '.join(sorted(READS - {'steps'}))} (and the steps).")
    # The baselines write their values into the weights (scope `all`), as they are published.
    return C.parse_options(CNSParams, {**options, "scope": "all"}, steps)


class MasterAdam:
    """Adam over parameter groups whose weights may be fp16/bf16 (a GPU's model): it steps fp32
    master copies and writes them back rounded. On the half weights themselves Adam's eps (1e-8)
    rounds to 0 in fp16 and the weights went to -inf within three steps."""

    def __init__(self, groups: list[dict]):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        masters = []
        for group in groups:
            params = []
            for p in group["params"]:
                if p.dtype in (torch.float16, torch.bfloat16):
                    master = p.detach().float().clone().requires_grad_(True)
                    self.pairs.append((p, master))
                    p = master
                params.append(p)
            masters.append({**group, "params": params})
        self.opt = torch.optim.Adam(masters)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for p, _ in self.pairs:
            p.grad = None

    def step(self) -> None:
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for p, master in self.pairs:
                p.copy_(master)


class BaselineMethod:
    """`kv=True`: naive (all K/V + token); `kv=False`: textual inversion (token only)."""

    def __init__(self, name: str, kv: bool):
        self.name, self.kv = name, kv

    def learn(self, pipe, photos: list[Path], spec: LearnSpec, progress: ProgressFn | None = None,
              cancel: CancelToken | None = None, previous: list | None = None) -> ConceptRecord:
        hp = parse_options(self.name, spec.options, spec.steps)
        prep = prepare(pipe, photos, spec, hp, progress, cancel)
        stack = stack_for(pipe)
        weights = stack.params if self.kv else {}
        before = {n: w.detach().clone() for n, w in weights.items()}
        row = token_rows(pipe, prep, spec, hp)
        loss = C.ConceptLoss(pipe, prep.latents, prep.photos.captions, prior_latents=prep.prior,
                             prior_prompt=C.prior_prompt(spec.class_word),
                             lambda_prior=hp.lambda_prior, prior_batch=hp.prior_batch,
                             seed=spec.seed, text_grad=True)
        groups = [{"params": [row.param], "lr": hp.lr_token}]
        if weights:
            groups.append({"params": list(weights.values()), "lr": hp.lr})
        opt = MasterAdam(groups)

        def step(k: int) -> float:
            opt.zero_grad()
            total = loss.parts(k).total
            total.backward()
            opt.step()
            return float(total.detach())

        try:
            with C.only_trainable(C.pipeline_modules(pipe), list(weights.values())), row:
                losses = C.run_steps(hp.steps, step, progress, cancel,
                                     around=lambda: loop_context(pipe, spec.memory))
            trained = {n: w.detach().cpu().numpy().reshape(-1).astype(np.float32)
                       for n, w in weights.items()}
        finally:
            with torch.no_grad():  # the stack writes the stored values back below
                for n, w in weights.items():
                    w.copy_(before[n])
        deltas = {n: SparseDelta(np.arange(v.size, dtype=np.int64), v, tuple(weights[n].shape))
                  for n, v in trained.items()}
        n_touched = sum(v.size for v in trained.values())
        meta = ConceptMeta(spec.name, "cns", spec.class_word, prep.token,
                           hparams={**C.as_dict(hp), "baseline": self.name, "token": prep.token,
                                    "seed": spec.seed, "neurons": n_touched,
                                    "fraction_kv": n_touched / C.kv_total(pipe.unet)},
                           metrics={"loss_first": losses[0] if losses else None,
                                    "loss_last": float(np.mean(losses[-10:])) if losses else None},
                           fingerprint=stack.base_fingerprint)
        record = ConceptRecord(meta, deltas=deltas, embeddings=row.embeddings())
        stack.push(record)
        return record

    # Applying and removing is the CNS layer stack's job: the records have its shape.
    def apply(self, pipe, records: list[ConceptRecord]):
        from cns_daemon.methods.cns import METHOD as CNS

        return CNS.apply(pipe, records)

    def remove(self, handle) -> None:
        from cns_daemon.methods.cns import METHOD as CNS

        CNS.remove(handle)


NAIVE = BaselineMethod("naive", kv=True)
TEXTUAL_INVERSION = BaselineMethod("ti", kv=False)


def get_baseline(name: str) -> BaselineMethod:
    return {"naive": NAIVE, "ti": TEXTUAL_INVERSION}[name]
