"""The engine binds the one pipeline, the concept store and the methods: it is everything a job
does to the model. Only the worker thread calls the pipeline-touching methods (start, learn,
generate, remove, import); the read-only ones (concepts, check_generate, export) are safe from
the server's threads because they only read the store.

Start-up: load the model, fingerprint the base weights (before any concept is applied), bind the
store to that fingerprint (a store made on another model is refused), then read every stored
concept once and re-apply the resident ones (base.Method.resident; CNS is fusion-free: the
service keeps its concepts in the weights). A concept that cannot be read is "damaged", a
readable one that cannot be used on this model (a resident one that could not be written back)
is "not rebuilt"; both are kept in `problems`, shown by `concepts()` and refused by
`check_generate`, and the service serves the rest. Importing a concept file is the `Importing`
mixin (importing.py); what `cones list` / `show` / `status` read, the `Listing` mixin (listing.py).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cns_daemon.archive import Archive
from cns_daemon.api.errors import (BadInput, Conflict, ConesError, Corrupt, Internal, ModelLoad, ModelMismatch,
                                   NotFound)
from cns_daemon.methods.base import CancelToken, LearnSpec, ProgressFn
from cns_daemon.api.protocol import EvalRequest, GenerateRequest, JobResult, LearnJob
from cns_daemon.api.settings import Paths, Settings
from cns_daemon.outputs import check_room, generation_caption, save_images
from cns_daemon.importing import Importing, acts_everywhere
from cns_daemon.listing import Listing, state_of, store_order
from cones_store.records import ConceptMeta, ConceptRecord
from cones_store.store import values_finite

log = logging.getLogger(__name__)

TINY_MODEL = "tiny"   # settings.model value: the seeded tiny test pipeline (tests, benches)
SAVED_BEFORE_STOP = "stored by its first run, before the service stopped"


@dataclass(frozen=True)
class EngineInfo:
    model: str
    device: str
    dtype: str
    fingerprint: str


def _model_name(model: str | None) -> str:
    """How a store names the model it was made on: a path made absolute, else as given."""
    if model is None:
        return "the shipped toy-world model"
    path = Path(model).expanduser()
    return str(path.absolute()) if path.exists() else model


def _again(problem: ConesError) -> ConesError:
    """A fresh error of the same type and words (one instance must not be raised twice)."""
    return type(problem)(problem.message, problem.hint)


class Engine(Importing, Listing):
    def __init__(self, settings: Settings, store, archive: Archive):
        self.settings = settings
        self.paths: Paths = settings.paths
        self.store = store
        self.archive = archive
        self.pipe = None
        # the path in effect (`cones status`): "../m" read from the CLI's folder points elsewhere
        model = _model_name(settings.model) if settings.model else "toy-world (built in)"
        self.info = EngineInfo(model=model, device="-", dtype="-", fingerprint="")
        self.problems: dict[str, ConesError] = {}   # concept -> why it is damaged / not rebuilt
        self.learning_token: str | None = None   # the token of the learn running now
        self.memory_in_effect: list[str] = []      # `cones status`: set at start-up
        self._tokenizers = threading.local()       # request threads' own (`tokenizer_here`)

    # ------------------------------------------------------------ start-up

    def start(self) -> None:
        from cns_daemon.model import build_tiny_pipeline, choose_placement, load_pipeline, quiet_libraries

        t0 = time.monotonic()
        if self.settings.model == TINY_MODEL:
            if Path(TINY_MODEL).exists():   # the keyword, or the folder of that name here?
                raise ModelLoad(f"'{TINY_MODEL}' names the built-in test model, and there is also a "
                                f"'{TINY_MODEL}' here ({Path(TINY_MODEL).absolute()}).",
                                f"For the folder, give ./{TINY_MODEL} or its absolute path.")
            place = choose_placement(self.settings.device, self.settings.dtype)   # as a real model's
            pipe = build_tiny_pipeline(seed=0)   # (built on the CPU in float32)
            if (place.device.type, place.dtype) != ("cpu", pipe.unet.dtype):
                quiet_libraries()   # diffusers' advice to load with torch_dtype, which no one can take
                pipe = pipe.to(place.device, place.dtype)
        else:
            pipe = load_pipeline(self.settings.model, self.settings.device, self.settings.dtype)
        log.info("model %s loaded in %.1fs", self.info.model, time.monotonic() - t0)
        self.attach(pipe)

    def attach(self, pipe) -> None:
        """Everything start-up does beyond loading the model: fingerprint the base weights, bind
        the store to them, rebuild the resident concepts."""
        import torch

        from cns_daemon.model import base_fingerprints

        t0 = time.monotonic()
        self.pipe = pipe
        # Before any concept is written; resident methods key their bookkeeping by the same digest.
        fp, *older = base_fingerprints(pipe)
        self.info = EngineInfo(model=self.info.model, device=str(pipe.device),
                               dtype=str(pipe.unet.dtype).replace("torch.", ""), fingerprint=fp)
        # Stores and exports made before the digest read bf16 carry one of its older forms.
        moved = self.store.bind(fp, {"model": _model_name(self.settings.model), "dtype": self.info.dtype},
                                aliases=older)
        if moved:
            log.warning("the concept store was carried over from an earlier cones's digest of this model "
                        "(%s) to this one's (%s); cones versions that know only the earlier digest no "
                        "longer open it", moved, fp)
        from cns_daemon.memory import in_effect, prepare_generation

        self.memory = self._memory_options()
        self.memory_in_effect = in_effect(self.memory, pipe.device)
        prepare_generation(pipe, self.memory)
        with torch.no_grad():
            count = self.rebuild()
        log.info("on %s/%s, fingerprint %s, %d resident concepts rebuilt in %.2fs", self.info.device,
                 self.info.dtype, fp, count, time.monotonic() - t0)

    def _memory_options(self):
        """The configured memory options, resolved for the device the model is on."""
        from cns_daemon.memory import MemoryOptions
        from cns_daemon.model import Placement

        place = Placement(self.pipe.device, self.pipe.unet.dtype)
        opts = MemoryOptions.resolve(place, **self.settings.memory_overrides())
        return opts

    def rebuild(self) -> int:
        """Read every stored concept (every checksum) and re-apply the resident ones in the order
        they came into this store (each was trained, or imported, on top of the ones before it).
        One that cannot be read or used is recorded in `problems` (and logged), so one bad
        concept never keeps the service down.
        (Reading records ahead on a second thread was measured: no gain on 2 cores, so it stays
        sequential.) Returns how many resident concepts were rebuilt."""
        self.problems.clear()
        metas = sorted(self.store.list(), key=store_order)
        for name in sorted(set(self.store.names()) - {m.name for m in metas}):
            self._problem(name, self._read_error(name))   # its metadata is unreadable
        count = 0
        for meta in metas:
            try:
                record = self.store.get(meta.name)
                self._check_fingerprint(record)
                count += self._apply_resident(record)
            except Corrupt as exc:
                self._problem(meta.name, exc)
            except ConesError as exc:   # readable, but it does not fit this model
                self._problem(meta.name, ModelMismatch(
                    f"Concept {meta.name!r} cannot be used on this model: {exc.message.rstrip('.')}.",
                    f"Load the base model it was learned on, or remove it with `cones rm {meta.name}`."))
        return count

    def _previous(self) -> list[ConceptRecord]:
        """Every stored concept, whatever its method, for a learn: the methods pick a token no
        concept uses, and a CNS learn of scope `all` keeps the neurons of the CNS concepts that
        act everywhere (λ₁). Only those are read whole; the rest count by their metadata (every
        learn read every concept's tensors: at SD size, 12 MB a concept). One that is damaged or
        does not fit the model counts by its metadata alone (its token stays taken; its neurons
        cannot be read): one bad concept failed every learn."""
        out = []
        for meta in sorted(self.store.list(), key=store_order):
            if meta.name not in self.problems and acts_everywhere(meta):
                try:
                    out.append(self.store.get(meta.name))
                    continue
                except Corrupt as exc:
                    self._problem(meta.name, exc)
            out.append(ConceptRecord(meta=meta))
        return out

    def _read_error(self, name: str) -> ConesError:
        try:
            self.store.get(name)
        except ConesError as exc:
            return exc
        return Internal(f"Concept {name!r} could not be listed.")

    def _problem(self, name: str, exc: ConesError) -> None:
        log.error("concept %s %s: %s", name, state_of(exc).replace("_", " "), exc.message)
        self.problems[name] = exc

    # Resident concepts live in the weights; these three are all the engine does to them (the
    # test double replaces them, having no weights).

    def _apply_resident(self, record: ConceptRecord) -> bool:
        """Write the concept into the live weights if its method is resident; says whether."""
        from cns_daemon.methods import get_method

        method = get_method(record.meta.method)
        if method.resident:
            method.apply(self.pipe, [record])
        return method.resident

    def _unapply_resident(self, name: str) -> None:
        from cns_daemon.methods import resident_methods

        for method in resident_methods():
            if name in method.applied(self.pipe):
                method.unlearn(self.pipe, name)

    def _live(self) -> list[str]:
        """The concepts live in the weights now."""
        from cns_daemon.methods import resident_methods

        return [n for method in resident_methods() for n in method.applied(self.pipe)]

    # ------------------------------------------------------------ jobs (worker thread)

    def learn(self, job: LearnJob, progress: ProgressFn, cancel: CancelToken,
              reserved: Iterable[str] = ()) -> JobResult:
        """`reserved`: the tokens other learns under way hold (an automatic pick skips them)."""
        from cns_daemon.methods import get_method
        from cns_daemon.methods.common import allocate_token
        from cns_daemon.methods.common.options import inert_note, parse_options

        if job.name in self.store:
            raise Conflict(f"A concept named {job.name!r} already exists.",
                           f"Pick another name, or remove it first with `cones rm {job.name}`.")
        photos = [self.archive.path(d) for d in job.photo_digests]
        method = get_method(job.method)
        previous = self._previous()
        names = job.photo_names if len(job.photo_names) == len(photos) else None
        # The captions this request gave (a job written by an older version reads the archive's)
        captions = list(job.photo_captions) if len(job.photo_captions) == len(photos) else None
        hp = parse_options(method.Params, job.options, job.steps)
        options = dict(job.options)
        if hasattr(hp, "token") and not hp.token:
            # Picked here rather than by the method, as it would (the first free rare words):
            # past those queued learns asked for, and known to the service while this runs, so
            # no learn submitted meanwhile is given it (`pinned_tokens`).
            taken = [r.meta.token for r in previous] + list(reserved)
            options["token"] = allocate_token(self.pipe.tokenizer, taken, vectors=getattr(hp, "vectors", 1))
        spec = LearnSpec(name=job.name, class_word=job.class_word, steps=job.steps, seed=job.seed,
                         options=options, photo_names=names, captions=captions,
                         cache_dir=self.paths.data / "class-images" / self.info.fingerprint[:16],
                         memory=self.memory)   # the methods apply it around their loops only
        self.learning_token = options.get("token") or None
        try:
            record = method.learn(self.pipe, photos, spec, progress, cancel, previous=previous)
        finally:
            self.learning_token = None
        inert = inert_note(hp, job.options)
        if inert:   # said with the result (and by `cones show`): the person thought it would act
            record.meta.metrics["note"] = "; ".join(
                x for x in (record.meta.metrics.get("note"), inert) if x)
        record.meta.photo_digests = list(job.photo_digests)
        record.meta.photo_captions = list(captions) if captions is not None else []
        record.meta.hparams["options_given"] = dict(job.options)   # `cones show`: what was asked
        record.meta.hparams.setdefault("seed", job.seed)   # every method's concept says its seed
        record.meta.fingerprint = self.info.fingerprint
        try:
            cancel.check()   # a cancel that arrived during the last step still wins
            if not values_finite(record) or not math.isfinite(record.meta.metrics.get("loss_last") or 0.0):
                raise BadInput(f"Training {job.name!r} diverged: its values are no longer numbers "
                               "(NaN or infinity), so nothing was stored.",
                               "Learn it again with the method's defaults, or smaller steps for "
                               "its optimizer (`--option lr=...`; Cones: `rho=...`).")
            self.store.put(record)
        except BaseException:
            method.unlearn(self.pipe, job.name)   # a resident method left it live; not kept
            raise
        return self._learned(job.name, job.seed, job.method, record.meta.metrics.get("note"))

    def _learned(self, name: str, seed: int, method: str, note) -> JobResult:
        """A learn's result: its method and note, and what it came to in the store."""
        metrics: dict[str, float | int | str] = {"method": method}
        if note:
            metrics["note"] = str(note)
        try:   # the concept is learned whatever these reads do
            metrics |= {"neurons": int(self.store.overlap(name).total),
                        "size_bytes": self.store.size_of(name)}
        except ConesError as exc:
            log.warning("learned %s, but its size could not be read: %s", name, exc)
        return JobResult(concept=name, seed=seed, metrics=metrics)

    def saved_by_first_run(self, job: LearnJob | ConceptMeta) -> JobResult | None:
        """A learn or import run again after a crash whose first run had stored the concept (the
        service died before the job was marked done): its result, instead of "already exists".
        `job`: the learn, or the imported concept's metadata."""
        try:
            meta = self.store.meta(job.name)
        except ConesError:
            return None
        if meta.method != job.method or list(meta.photo_digests) != list(job.photo_digests) or (
                isinstance(job, ConceptMeta) and meta.created != job.created):
            return None   # another concept of that name: the conflict stands
        if isinstance(job, ConceptMeta):
            return JobResult(concept=job.name, metrics={"note": SAVED_BEFORE_STOP})
        return self._learned(job.name, job.seed, job.method, SAVED_BEFORE_STOP)

    def generate(self, req: GenerateRequest, out_dir: Path, progress: ProgressFn,
                 cancel: CancelToken) -> JobResult:
        from cns_daemon.generate import generate, image_size
        from cns_daemon.model import recommended_guidance, recommended_steps
        from cns_daemon.prompts import parse_box, referenced_names

        if req.seed is None:   # a job queued before the service chose seeds at the request
            req = req.model_copy(update={"seed": 0})
        records = {n: self._get(n) for n in referenced_names(req.prompt)}
        steps = req.steps or recommended_steps(self.pipe)
        cfg = recommended_guidance(self.pipe) if req.guidance_scale is None else req.guidance_scale
        check_room(out_dir.parent, req.n, *image_size(self.pipe, req.height, req.width))
        images = generate(self.pipe, req.prompt, records, [parse_box(b) for b in req.boxes],
                          n=req.n, seed=req.seed, progress=progress, cancel=cancel,
                          negative_prompt=req.negative_prompt, guidance_scale=cfg,
                          height=req.height, width=req.width, steps=steps)
        caption = generation_caption(req, images[0].size if images else None, steps, cfg)
        return save_images(images, out_dir, caption, self._readings(images), req.seed)

    def _readings(self, images) -> list[str] | None:
        """In toy-world runs (no model configured): the attribute probe's reading of each image,
        for the contact sheet. None elsewhere (the probe only knows the toy world)."""
        if self.settings.model is not None:
            return None
        from dataclasses import asdict

        from cns_daemon.sheet import describe_reading
        from cns_daemon.toyworld.probe import Probe

        if getattr(self, "_probe", None) is None:
            try:
                self._probe = Probe.load()
            except ConesError as exc:
                log.warning("no probe readings on contact sheets: %s", exc.message)
                return None
        return [describe_reading(asdict(a)) for a in self._probe.read(images)]

    def held_photos(self, metas: dict[str, ConceptMeta]) -> dict[str, list[str]]:
        """Each concept's photos this archive holds (digests). An imported concept's photos
        stayed in the store it was learned in (`cones show` says how many are here): it is
        compared with those held here, and needs one."""
        held = {n: [d for d in m.photo_digests if self.archive.has(d)] for n, m in metas.items()}
        for name, digests in held.items():
            if not digests:
                raise NotFound(f"Concept {name!r} has no photos in this store's archive to compare with.",
                               "Evaluate it in the store it was learned in, or learn it again here from "
                               "its photos (an exported concept carries no photos).")
        return held

    def evaluate(self, req: EvalRequest, progress: ProgressFn, cancel: CancelToken) -> JobResult:
        """CLIP-I / CLIP-T of the named concepts (evaluate.py), generated with the same routine
        as a generate job; each concept's scores are stored in its metadata under `eval_*`."""
        from cns_daemon.evaluate import check_scorer, default_prompts, evaluate, load_scorer
        from cns_daemon.generate import generate
        from cns_daemon.methods.base import ProgressReporter
        from cns_daemon.methods.data import load_photo   # upright, 8-bit: as the methods saw them

        records = {n: self._get(n) for n in req.names}
        held = self.held_photos({n: r.meta for n, r in records.items()})
        # what measures it: a transformers folder says it all, an open_clip file or tag with its
        # model ("openai" alone was stored for --clip ViT-B-32 --clip-weights openai)
        clip_id = (req.clip_weights if check_scorer(req.clip, req.clip_weights) == "transformers" else
                   f"{req.clip} ({req.clip_weights})" if req.clip_weights else req.clip)
        scorer = load_scorer(req.clip, req.clip_weights, self.pipe.device)   # ModelLoad / Unavailable, typed
        photos = {n: [load_photo(self.archive.path(d)) for d in digests] for n, digests in held.items()}
        prompts = list(req.prompts) if req.prompts else default_prompts()
        options = {k: v for k, v in (("steps", req.steps),) if v is not None}
        report = ProgressReporter(progress, "eval", len(prompts))
        report(0)

        def gen(prompt: str, n: int):
            cancel.check()
            # per-step progress stays quiet: the eval bar counts prompts
            return generate(self.pipe, prompt, records, n=n, seed=req.seed, cancel=cancel, **options)

        result = evaluate(gen, photos, {n: r.meta.class_word for n, r in records.items()},
                          prompts, req.n, scorer, progress=lambda i, _t: report(i))
        cancel.check()
        for name in req.names:
            per = [p.per_concept_clip_i[name] for p in result.prompts]
            # scored beside other concepts in every prompt: said, as it differs from alone
            others = ", ".join(f"<{n}>" for n in req.names if n != name) or None
            self.store.update_metrics(name, {
                "eval_clip_i": round(sum(per) / len(per), 4), "eval_clip_t": round(result.clip_t, 4),
                "eval_n_images": result.n_images, "eval_n_prompts": len(result.prompts),
                "eval_clip": clip_id, "eval_with": others})
        return JobResult(metrics={**result.summary(), "clip": clip_id})

    def remove(self, name: str) -> JobResult:
        """Remove a concept without decoding it (a damaged one can be removed too): the store
        drops its keys, the weights drop it if it is live. A concept a salvage left behind is
        forgotten (its photos are no longer kept for it)."""
        if name not in self.store and self.store.drop_lost(name):
            return JobResult(concept=name)
        if name not in self.store:
            raise NotFound(f"No concept named {name!r}.", "`cones list` shows the stored concepts.")
        # Store first: if the process dies between the two steps, the store (which start-up
        # rebuilds from) already says the concept is gone.
        self.store.delete(name)
        self.problems.pop(name, None)
        if name in self._live():
            self._unapply_resident(name)
        return JobResult(concept=name)

    # ------------------------------------------------------------ read-only (any thread)

    def tokenizer_here(self):
        """The tokenizer for this thread: a copy per request thread. The tokenizer keeps its
        padding and truncation settings in itself, and a request's check set them while a learn
        tokenized on the worker thread: the learn failed ("Unable to create tensor")."""
        local = self._tokenizers
        if getattr(local, "source", None) is not self.pipe.tokenizer:
            import copy

            mine = copy.deepcopy(self.pipe.tokenizer)
            # transformers' CLIPTokenizer wraps its backend's decode in __init__ to turn "</w>"
            # into spaces; a deep copy has the bare one (a refusal quoted 'red</w>red</w>')
            rewrap = getattr(mine, "_wrap_decode_method_backend_tokenizer", None)
            if rewrap is not None:
                rewrap()
            local.tokenizer, local.source = mine, self.pipe.tokenizer
        return local.tokenizer

    def check_learn(self, method: str, steps: int | None, options: dict, class_word: str = "",
                    captions: Iterable[tuple[str, str | None]] = (), reserved: Iterable[str] = ()) -> None:
        """Refuse unknown option keys, values of the wrong type or out of range, for this method,
        a token asked for that is not a free rare word (`reserved`: those learns under way hold
        are not free either), and a photo's caption too long to keep
        the concept's token once it is put in, before a learn job is queued (the method parses,
        allocates and captions the same way when the job runs). `captions`: (file, caption)."""
        from cns_daemon.methods import get_method
        from cns_daemon.methods.common import allocate_token, parse_options
        from cns_daemon.methods.common.tokens import token_ids
        from cns_daemon.methods.data import with_token

        hp = parse_options(get_method(method).Params, options, steps)
        taken = [m.token for m in self.store.list()] + list(reserved)
        token = ""
        tok = self.tokenizer_here()
        if method != "cones2":   # Cones 2 reads the concept at its class word: no token
            token = allocate_token(tok, taken, getattr(hp, "token", "") or None,
                                   getattr(hp, "vectors", 1))
        # where the concept is read: its first rare word, or (Cones 2) its class word
        anchor = token_ids(tok, (token or class_word).split()[0])[0]
        for file, caption in captions:
            if not caption:
                continue
            # Cut short by the encoder, a caption whose concept word falls past the end would
            # train without it (a long caption that names it early is read as far as it goes)
            ids = tok(with_token(caption, token, class_word)).input_ids
            if anchor not in ids[:tok.model_max_length - 1]:
                raise BadInput(f"The caption of {file} is {len(ids) - 2} tokens long with the concept's "
                               f"token put in, which comes after the {tok.model_max_length - 2} the "
                               "text encoder reads.", f"Shorten the caption of {file}, or name the "
                               f"{class_word} nearer its start.")

    def check_generate(self, req: GenerateRequest) -> None:
        """Refuse a bad prompt or box before it is queued: unknown, damaged or not rebuilt
        concepts, boxes for names not in the prompt, malformed boxes, a concept in the negative
        prompt, an image size or a number of steps the model cannot make."""
        from cns_daemon.generate import check_negative_prompt, check_steps, image_size
        from cns_daemon.model import recommended_guidance
        from cns_daemon.prompts import check_boxes, expand, referenced_names

        for name in referenced_names(req.prompt):
            if name in self.problems:
                raise _again(self.problems[name])
        metas = {m.name: m for m in self.store.list()}
        expanded = expand(req.prompt, metas, self.tokenizer_here())
        check_boxes(req.boxes, expanded, metas)
        scale = req.guidance_scale if req.guidance_scale is not None else recommended_guidance(self.pipe)
        check_negative_prompt(req.negative_prompt, self.tokenizer_here(), scale, metas)
        image_size(self.pipe, req.height, req.width)
        if req.steps is not None:
            check_steps(self.pipe, req.steps)

    def record(self, name: str) -> ConceptRecord:
        return self._get(name)

    def _get(self, name: str) -> ConceptRecord:
        try:
            return self.store.get(name)
        except KeyError:
            raise NotFound(f"No concept named {name!r}.", "`cones list` shows the stored concepts.") from None
        except Corrupt as exc:
            self.problems.setdefault(name, exc)
            raise

    def _check_fingerprint(self, record: ConceptRecord, hint: str | None = None) -> None:
        if record.meta.fingerprint and not self.store.accepts(record.meta.fingerprint):
            raise ModelMismatch(f"Concept {record.name!r} was learned on another base model "
                                f"({record.meta.fingerprint[:12]}…, this one is "
                                f"{self.info.fingerprint[:12]}…).", hint)
