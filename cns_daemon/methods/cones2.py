"""Cones 2: a subject as a residual on its class word's text-encoder output (paper 002, §3.2).

Learning fine-tunes a float32 COPY of the text encoder (the UNet and the live encoder stay
frozen and untouched) with

    L = L_sub + λ · L_reg

L_sub is the shared denoising loss on the photos captioned with the plain class word ("a photo of
a dog", Eq. 2). L_reg (Eq. 3) keeps the tuned encoder's output equal to the frozen one at every
position except the class word's tokens, over the shipped sentences (cones2_sentences.txt,
templates × fillers); we average it per position and channel (an MSE) so λ is on the scale of the
denoising loss. The residual (Eq. 5) is the mean over those sentences of (tuned − frozen) output
at the class word's last token: one vector of the encoder width.

Generation (Eq. 6) adds the residual to the CONDITIONAL encoder output at that concept's class
word position only (see `Cones2Handle.add_residuals`); the weights are never changed, so
`apply`/`remove` only carry the residuals.

The end of the sequence (`tail`, on by default). On the toy-world fixture a look is read from the
end of the sequence (EOS and the padding after it), not from the class word: with the paper's one
vector the concept read the base model's rate (named look 0.010), and even a vector distilled from
the named words' own prediction reached 0.375 (docs/tuning.md, "Token vectors per concept"). With
`tail`, L_reg leaves the positions from EOS on free too, and the record keeps, beside the class
word's vector, the mean shift at EOS and the mean shift of each padding position (by its absolute
position, which the padding's output depends on: averaged from EOS instead it drew nothing).
Generation adds them on the concept's share of the end of the sequence (`generate.prompt_tails`,
the share CNS's scope and layout guidance use). docs/tuning.md, "Cones 2 on the end of the
sequence", has the measurements. A record is then (2 + T, d): the class word's row, EOS's row,
one row per position; a record of one row (d,), the paper's form and a public `residual.pt`,
acts on the class word alone.

What is trained: the encoder's transformer layers and final norm. The token and position
embedding tables are left out: they are a third of SD's encoder, Adam would hold two more copies
of them, and the output at the class word moves through the layers anyway.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cns_daemon.memory import loop_context
from cns_daemon.api.errors import BadInput, ModelMismatch
from cns_daemon.methods.base import CancelToken, LearnSpec, PerRequest, ProgressFn
from cns_daemon.methods.common import (ConceptLoss, LossScale, as_dict, only_trainable, parse_options,
                                       pipeline_modules, prepare, run_steps, step_generator, tokenize)
from cns_daemon.prompts import expand
from cones_store.records import ConceptMeta, ConceptRecord

SENTENCES_FILE = Path(__file__).with_name("cones2_sentences.txt")


@dataclass
class Cones2Params:
    steps: int = 900            # the paper's 3,000 at lr 1e-6 on SD 2.1; these two are the fixture's
    lr: float = 1e-3            # AdamW on the encoder copy (no weight decay)
    lambda_reg: float = 1.0     # weight of the text-embedding-preservation loss
    reg_batch: int = 8          # preservation sentences per step
    variants: int = 4           # augmented variants per photo
    grad_clip: float = 1.0
    tail: bool = True           # residuals at the end of the sequence too (EOS and padding)

    def inert(self) -> dict[str, str]:
        """Options these settings leave unread, and why (common.options.inert_note)."""
        return {"reg_batch": "lambda_reg 0: no preservation term"} if self.lambda_reg == 0 else {}

    def validate(self, given: frozenset[str] = frozenset()) -> None:   # the shared bounds (lr, counts): common.options.LOWER_BOUNDS
        if self.steps < 1:
            raise BadInput("steps must be ≥ 1.")


# --- the shipped sentences ------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def sentence_templates() -> tuple[str, ...]:
    """Every template × every filler from the data file, with `{cls}` still open."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in SENTENCES_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is not None:
            current.append(line)
    return tuple(t.replace("{ctx}", f) for t, f in
                 itertools.product(sections["templates"], sections["fillers"]))


def sentences(class_word: str) -> list[str]:
    return [t.format(cls=class_word) for t in sentence_templates()]


@dataclass
class SentenceSet:
    """The preservation sentences for one class word, tokenized, with the class word located."""
    ids: torch.Tensor       # (S, T) padded token ids
    anchors: torch.Tensor   # (S,) the class word's last token (where the residual is measured)
    keep: torch.Tensor      # (S, T) bool: positions L_reg preserves (all but the class word)
    eos: torch.Tensor       # (S,) each sentence's EOS position


def sentence_set(pipe, class_word: str, tail: bool = False) -> SentenceSet:
    """Locate the class word with the prompt expander, so training and generation agree on
    positions by construction: each sentence is written as a Cones 2 reference."""
    meta = {"subject": ConceptMeta("subject", "cones2", class_word, "")}
    texts, anchors, classes, ends = [], [], [], []
    for template in sentence_templates():
        e = expand(template.replace("{cls}", "<subject>"), meta, pipe.tokenizer)
        texts.append(e.text)
        anchors.append(e.anchors("subject")[0])
        classes.append(e.positions("subject"))
        ends.append(len(e.token_ids) - 1)   # EOS, where generate.encode finds it
    ids = tokenize(pipe, texts)
    keep = torch.ones(ids.shape, dtype=torch.bool)
    for row, positions in enumerate(classes):
        keep[row, positions] = False
    eos = torch.tensor(ends)
    if tail:   # the end of the sequence is the concept's too: not preserved
        keep &= torch.arange(ids.shape[1])[None] < eos[:, None]
    return SentenceSet(ids, torch.tensor(anchors), keep.to(ids.device), eos)


# --- learning -------------------------------------------------------------------------------

@dataclass
class _EncoderView:
    """The pipeline as the shared loss sees it, with the text encoder swapped for the copy."""
    unet: object
    vae: object
    scheduler: object
    tokenizer: object
    text_encoder: object


def _trainable(encoder) -> list[torch.nn.Parameter]:
    return [p for n, p in encoder.named_parameters() if ".embeddings." not in f".{n}"]


@torch.no_grad()
def _encode(encoder, ids: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    return torch.cat([encoder(part)[0].float() for part in ids.split(chunk)])


def preservation_loss(tuned, frozen_out: torch.Tensor, ids: torch.Tensor,
                      keep: torch.Tensor) -> torch.Tensor:
    """Eq. 3 as an MSE over the kept positions and all channels. In fp32 as `frozen_out` was
    drawn, outside the loop's autocast (a GPU's): bf16 rounding alone left a floor of loss the
    encoder was pushed around by."""
    with torch.autocast(ids.device.type, enabled=False):
        diff = (tuned(ids)[0].float() - frozen_out) ** 2
    weights = keep[..., None].to(diff.dtype)
    return (diff * weights).sum() / (weights.sum() * diff.shape[-1])


def class_residual(tuned, frozen_out: torch.Tensor, sset: SentenceSet, tail: bool = False
                   ) -> torch.Tensor:
    """Eq. 5: mean over the sentences of the output shift at the class word, (d,). With `tail`
    (2 + T, d): that row, the mean shift at EOS, and per position p the mean shift over the
    sentences whose padding holds p (positions no sentence pads take the first padded one's)."""
    shift = _encode(tuned, sset.ids) - frozen_out
    rows = torch.arange(len(sset.anchors), device=shift.device)
    word = shift[rows, sset.anchors.to(shift.device)].mean(0)
    if not tail:
        return word
    eos = sset.eos.to(shift.device)
    n_tokens = shift.shape[1]
    padding = torch.arange(n_tokens, device=shift.device)[None] > eos[:, None]   # (S, T)
    count = padding.sum(0)
    by_position = (shift * padding[..., None]).sum(0) / count.clamp(min=1)[:, None]
    first = int(torch.nonzero(count)[0]) if count.any() else n_tokens
    if first < n_tokens:
        by_position[:first] = by_position[first]
    return torch.cat([word[None], shift[rows, eos].mean(0)[None], by_position])


class Cones2Method(PerRequest):
    name = "cones2"
    Params = Cones2Params

    def learn(self, pipe, photos: list[Path], spec: LearnSpec, progress: ProgressFn | None,
              cancel: CancelToken | None, previous: list | None = None) -> ConceptRecord:
        hp = parse_options(Cones2Params, spec.options, spec.steps)
        # No token (the class word's own embedding carries the concept) and no class images.
        prep = prepare(pipe, photos, spec, "", variants=hp.variants)

        tuned = copy.deepcopy(pipe.text_encoder).to(torch.float32).train(False)
        sset = sentence_set(pipe, spec.class_word, tail=hp.tail)
        # The frozen outputs from the fp32 copy before it trains, not from the live encoder: in
        # bf16/fp16 their rounding alone made a residual (norm 0.003 untrained on the toy model).
        with torch.no_grad():
            frozen_out = _encode(tuned, sset.ids)
        view = _EncoderView(pipe.unet, pipe.vae, pipe.scheduler, pipe.tokenizer, tuned)
        concept_loss = ConceptLoss(view, prep.latents, prep.photos.captions, lambda_prior=0.0,
                                   seed=spec.seed, text_grad=True)
        params = _trainable(tuned)
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=0.0)
        # the encoder copy is float32, but its gradient comes back through a float16 UNet
        scale = LossScale(pipe.unet.dtype, pipe.unet.device)
        reg_values: list[float] = []

        def step(k: int) -> float:
            gen = step_generator(spec.seed + 7919, k)
            pick = torch.randperm(len(sset.ids), generator=gen)[:hp.reg_batch].to(sset.ids.device)
            reg = preservation_loss(tuned, frozen_out[pick], sset.ids[pick], sset.keep[pick])
            loss = concept_loss(k) + hp.lambda_reg * reg
            opt.zero_grad(set_to_none=True)
            scale.backward(loss)
            scale.unscale(opt)   # clipped as they are, not as scaled
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
            scale.step(opt)
            reg_values.append(float(reg.detach()))
            return float(loss.detach())

        with only_trainable(pipeline_modules(pipe) + [tuned], params):
            # the live pipeline is never changed (a copy of the encoder trains): a generate job
            # can run between two steps with nothing set aside
            losses = run_steps(hp.steps, step, progress, cancel,
                               around=lambda: loop_context(pipe, spec.memory),
                               aside=contextlib.nullcontext)
        with torch.no_grad():
            residual = class_residual(tuned, frozen_out, sset, tail=hp.tail)
        del tuned, opt
        word = residual if residual.dim() == 1 else residual[0]
        tail_metrics = {} if residual.dim() == 1 else {"tail_norm": float(residual[1:].norm(dim=1).mean())}

        meta = ConceptMeta(spec.name, "cones2", spec.class_word, "", hparams=as_dict(hp),
                           metrics={"loss_first": losses[0], "loss_last": losses[-1],
                                    "preservation_last": reg_values[-1],
                                    "residual_norm": float(word.norm()), **tail_metrics,
                                    "sentences": len(sset.ids)})
        return ConceptRecord(meta, residual=residual.cpu().numpy().astype(np.float32))

    def apply(self, pipe, records: list[ConceptRecord]) -> "Cones2Handle":
        return Cones2Handle({r.name: torch.from_numpy(residual_rows(r, pipe)) for r in records})

    def remove(self, handle: "Cones2Handle") -> None:
        handle.residuals.clear()   # nothing in the pipeline was changed


@dataclass
class Cones2Handle:
    residuals: dict[str, torch.Tensor]   # concept name → (d,) or (2 + T, d) float32

    def add_residuals(self, cond: torch.Tensor, anchors: dict[str, list[int]],
                      tails: dict[str, list[int]] | None = None, eos: int | None = None
                      ) -> torch.Tensor:
        """Eq. 6 on conditional embeddings (batch, tokens, d): a copy with each concept's
        class-word residual added at its anchor positions and, for a record with end-of-sequence
        rows, its EOS row at `eos` and its position rows at the rest of its share of the end
        (`tails`); nothing else changed."""
        out = cond.clone()
        for name, res in self.residuals.items():
            res = res.to(out.device, out.dtype)
            word = res if res.dim() == 1 else res[0]
            for pos in anchors.get(name, ()):
                out[:, pos] += word
            if res.dim() == 2:
                for pos in (tails or {}).get(name, ()):
                    out[:, pos] += res[1] if pos == eos else res[2 + pos]
        return out


def residual_rows(record: ConceptRecord, pipe) -> np.ndarray:
    """The record's residual as float32, (width,) or (2 + n_tokens, width) (with end-of-sequence
    rows) for this pipeline's encoder; ModelMismatch for any other shape."""
    width, n_tokens = encoder_width(pipe), int(pipe.tokenizer.model_max_length)
    arr = np.asarray(record.residual, dtype=np.float32) if record.residual is not None else None
    if arr is None or arr.shape not in ((width,), (2 + n_tokens, width)):
        got = "none" if arr is None else "x".join(map(str, arr.shape))
        raise ModelMismatch(f"Concept {record.name!r} has a residual of shape {got}; this model's "
                            f"text encoder takes width {width} (one row, or {2 + n_tokens} rows "
                            f"with the end of its {n_tokens}-token sequence).")
    return arr


def encoder_width(pipe) -> int:
    return int(pipe.text_encoder.config.hidden_size)


def import_residual(path: Path, pipe) -> np.ndarray:
    """A public Cones 2 `residual.pt` (a float tensor of shape (1, d) or (d,)) as (d,) float32."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"No residual file at {path}.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors come in many types
        raise BadInput(f"{path.name} is not a readable residual file ({exc}).",
                       "Give the residual.pt that Cones 2 training saved.") from None
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() \
            or data.dim() not in (1, 2) or (data.dim() == 2 and data.shape[0] != 1):
        what = f"tensor of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) \
            else type(data).__name__
        raise BadInput(f"{path.name} holds a {what}, not a float tensor of shape (1, d) or (d,).")
    vec = data.reshape(-1).to(torch.float32)
    width = encoder_width(pipe)
    if vec.numel() != width:
        raise BadInput(f"{path.name} is a residual of width {vec.numel()}, but this model's text "
                       f"encoder has width {width}.",
                       "Use a residual trained on the same base model family (768 for SD 1.x, "
                       "1024 for SD 2.x).")
    if not torch.isfinite(vec).all():
        raise BadInput(f"{path.name} contains NaN or infinite values.")
    return vec.numpy().copy()


def imported_record(name: str, class_word: str, path: Path, pipe) -> ConceptRecord:
    """A Cones 2 concept made from an imported residual."""
    meta = ConceptMeta(name, "cones2", class_word, "", metrics={"imported_from": Path(path).name})
    return ConceptRecord(meta, residual=import_residual(path, pipe))


METHOD = Cones2Method()
