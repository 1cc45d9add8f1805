"""The quality bench's measurements, one function per kind of cell (bench/quality.py runs them).

A cell is one prompt generated `n` times from fixed seeds (image i of a cell uses seed
cell_seed + i, so every method sees the same noise for the same cell) and read by the probe.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._world import (LEFT_BOX, PAIR_PROMPT, RIGHT_BOX, Concept, Judge, class_prompt,
                          concept_prompt, pairs, prompt_background)
from cns_daemon.toyworld.fidelity import plain_prompt_cases, prompt_fidelity, two_object_fidelity

MAX_BATCH = 16  # generate()'s per-request limit


@dataclass
class Composition:
    """Two concepts in one prompt, each given a box (both arrangements, averaged), and the same
    prompt without boxes judged against the same arrangements."""
    guided: float | None = 0.0          # both named looks right, each in its box (None: no pair)
    unguided: float | None = 0.0
    placement_guided: float | None = 0.0    # both shapes in their boxes (where, not how well)
    placement_unguided: float | None = 0.0


@dataclass
class MethodResult:
    method: str
    fidelity: list[float] = field(default_factory=list)        # per concept, right after learning
    fidelity_final: list[float] = field(default_factory=list)  # per concept, after all
    unnamed: list[float] = field(default_factory=list)         # the tilt, right after learning
    unnamed_final: list[float] = field(default_factory=list)
    prompt_fidelity: list[float] = field(default_factory=list)
    prompt_look: list[float] = field(default_factory=list)     # the named look in those images
    prior_after: float = 0.0
    prior_two_after: float = 0.0
    composition: Composition = field(default_factory=Composition)
    stored_bytes: list[int] = field(default_factory=list)
    learn_s: list[float] = field(default_factory=list)
    kv_share: list[float] = field(default_factory=list)       # K/V values each concept trains
    general_share: list[float] = field(default_factory=list)  # of those, general ones (CNS)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def forgetting(self) -> float:
        return self.fidelity[0] - self.fidelity_final[0]


@dataclass
class BaseResult:
    fidelity: list[float]     # per concept: "a photo of a <class>" on the base model
    unnamed: list[float]      # per concept: its tilt in those images
    prior: float              # plain-prompt fidelity on the base model
    prior_two: float          # the same for plain two-object prompts (per half)


def cell_seed(kind: int, index: int) -> int:
    return 1_000_000 * kind + 10_000 * index


class Generator:
    """`n` images per request through the service's generation routine, in chunks it accepts."""

    def __init__(self, pipe, gen_steps: int, cfg_scale: float, guidance_weight: float | None,
                 suppress: str | None = None):
        self.pipe, self.gen_steps, self.cfg_scale = pipe, gen_steps, cfg_scale
        self.guidance_weight, self.suppress = guidance_weight, suppress

    def __call__(self, prompt: str, records: dict, n: int, seed: int, boxes=()) -> list:
        from cns_daemon.generate import generate
        from cns_daemon.guidance import GuidanceConfig

        kw = {}
        if self.guidance_weight is not None:
            kw["weight"] = self.guidance_weight
        if self.suppress is not None:
            kw["suppress"] = self.suppress
        images = []
        for start in range(0, n, MAX_BATCH):
            images += generate(self.pipe, prompt, records, boxes, n=min(MAX_BATCH, n - start),
                               seed=seed + start, steps=self.gen_steps,
                               guidance_scale=self.cfg_scale, guidance=GuidanceConfig(**kw))
        return images


def measure_prior(gen: Generator, judge: Judge, records: dict, n: int, seed: int) -> tuple[float, float]:
    """Plain prompts (no concept; one image each): shape, colour and background honoured, for
    single-object prompts and (per half) for two-object ones. Through the generation routine
    with every learned record, as the service draws them (it was the bare pipeline). A plain
    prompt names no concept, so a scoped or per-request concept (CNS and Cones scoped, Cones 2)
    leaves it as the base model draws it by design, and reads a drop of 0 either way; what can
    move it is a concept written into the weights (CNS or Cones with scope all, the naive
    baseline), which both routes see."""
    rates = []
    for two, score in ((False, prompt_fidelity), (True, two_object_fidelity)):
        cases = plain_prompt_cases(n, seed, two_objects=two)
        images = [im for c in cases for im in gen(c.prompt, records, 1, c.seed)]
        rates.append(score(judge.probe, images, [c.scene for c in cases]).all_match)
    return rates[0], rates[1]


def measure_base(gen: Generator, judge: Judge, concepts: list[Concept], n: int, seed: int
                 ) -> BaseResult:
    # the seeds of the methods' fidelity cells (kind 3): a rate "above the base" is the same noise
    images = [gen(class_prompt(c), {}, n, cell_seed(3, i)) for i, c in enumerate(concepts)]
    return BaseResult([judge.concept_rate(im, c.obj) for im, c in zip(images, concepts)],
                      [judge.unnamed_rate(im, c.obj) for im, c in zip(images, concepts)],
                      *measure_prior(gen, judge, {}, n, seed))


def composition(gen: Generator, judge: Judge, pairs_: list[tuple[Concept, Concept]],
                records: dict, n: int, kind: int = 5) -> Composition:
    """PAIR_PROMPT for each pair: with the boxes a-left/b-right and b-left/a-right, and once
    without boxes, judged against each arrangement in turn (what the boxes would have asked: a
    model told no arrangement meets one at most, so the unboxed figure is at most 0.5). Every
    pair of methods uses one set of seeds (same-method and mixed cells alike)."""
    guided, unguided, place_g, place_u = [], [], [], []
    for i, (a, b) in enumerate(pairs_):
        prompt = PAIR_PROMPT.format(a=a.name, b=b.name)
        plain = gen(prompt, records, n, cell_seed(kind, i))
        for left, right in ((a, b), (b, a)):
            boxed = gen(prompt, records, n, cell_seed(kind, i),
                        [f"{left.name}={LEFT_BOX}", f"{right.name}={RIGHT_BOX}"])
            guided.append(judge.composition_rate(boxed, left.obj, right.obj))
            unguided.append(judge.composition_rate(plain, left.obj, right.obj))
            place_g.append(judge.placement_rate(boxed, left.obj, right.obj))
            place_u.append(judge.placement_rate(plain, left.obj, right.obj))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731 (one concept: no pair)
    return Composition(mean(guided), mean(unguided), mean(place_g), mean(place_u))


def run_method(method, name: str, pipe, gen: Generator, judge: Judge, concepts: list[Concept],
               n: int, seed: int, steps: int | None, options: dict, work: Path):
    """One method learns every concept in sequence on its own copy of the model; returns its
    MethodResult and the records (for the mixed-method compositions)."""
    from cns_daemon.methods.base import LearnSpec
    from cns_daemon.model import fingerprint
    from cones_store.store import ConceptStore

    result = MethodResult(name)
    records: dict = {}
    learned: list = []
    with ConceptStore.open(work / f"store-{name}", fingerprint=fingerprint(pipe)) as store:
        for i, c in enumerate(concepts):
            # No captions: the methods' templates ("a photo of a <tok> star"), as for photos
            # dropped in the inbox without sidecars; the named look is then the token's to learn.
            spec = LearnSpec(c.name, c.class_word, steps=steps, seed=seed + i, captions=None,
                             options=dict(options), cache_dir=work / "cache")
            t0 = time.perf_counter()
            record = method.learn(pipe, list(c.photos), spec, None, None, previous=list(learned))
            result.learn_s.append(time.perf_counter() - t0)
            learned.append(record)
            records[c.name] = record
            store.put(record)
            result.stored_bytes.append(store.size_of(c.name))
            metrics, hp = record.meta.metrics, record.meta.hparams
            result.kv_share.append(float(metrics.get("kv_share", hp.get("fraction_kv", 0.0)) or 0.0))
            if "general_share" in metrics:
                result.general_share.append(float(metrics["general_share"]))
            if metrics.get("note"):
                result.notes.append(f"{c.name}: {metrics['note']}")
            images = gen(concept_prompt(c), records, n, cell_seed(3, i))
            result.fidelity.append(judge.concept_rate(images, c.obj))
            result.unnamed.append(judge.unnamed_rate(images, c.obj))
    for i, c in enumerate(concepts):
        images = gen(concept_prompt(c), records, n, cell_seed(3, i))
        result.fidelity_final.append(judge.concept_rate(images, c.obj))
        result.unnamed_final.append(judge.unnamed_rate(images, c.obj))
        bg = prompt_background(i)
        images = gen(concept_prompt(c, bg), records, n, cell_seed(4, i))
        result.prompt_fidelity.append(judge.background_rate(images, bg))
        result.prompt_look.append(judge.concept_rate(images, c.obj))
    result.prior_after, result.prior_two_after = measure_prior(gen, judge, records, n, seed)
    result.composition = composition(gen, judge, pairs(concepts), records, n)
    return result, records


def mixed_composition(pipe, gen: Generator, judge: Judge, concepts: list[Concept],
                      first: dict, second: dict, n: int) -> Composition:
    """Pairs (c1, c2), (c3, c4), … with a from the `first` method's records and b from the
    `second`'s, on a fresh base model holding the first method's CNS concepts live (as the
    service would; Cones and Cones 2 records are applied per request by the routine)."""
    from cns_daemon.methods import get_method

    cns = [r for r in first.values() if r.meta.method == "cns"]
    if cns:
        get_method("cns").apply(pipe, cns)
    pairs_ = pairs(concepts)
    records = {a.name: first[a.name] for a, _ in pairs_} | {b.name: second[b.name] for _, b in pairs_}
    return composition(gen, judge, pairs_, records, n)   # the same-method cells' seeds


def placement_sweep(pipe, gen_for, judge: Judge, weights: list[float], n: int) -> dict:
    """Layout guidance alone, on the base model: "a photo of <a> and <b> on the grass" where a
    and b are zero-residual Cones 2 concepts (so the prompt is "a photo of a star and a ring on
    the grass"); per weight w (0 = unguided), the share of images with both shapes in their
    boxes, for both arrangements (a left, b right; b left, a right)."""
    import numpy as np

    from bench._world import ObjectSpec
    from cones_store.records import ConceptMeta, ConceptRecord

    width = pipe.text_encoder.config.hidden_size
    objs = {"a": ObjectSpec("star", "red"), "b": ObjectSpec("ring", "blue")}
    records = {k: ConceptRecord(ConceptMeta(k, "cones2", o.shape, ""),
                                residual=np.zeros(width, np.float32)) for k, o in objs.items()}
    prompt = PAIR_PROMPT.format(a="a", b="b")
    out = {}
    for w in weights:
        gen = gen_for(w or None)
        unguided = None if w else gen(prompt, records, n, cell_seed(6, 0))
        rates = {}
        for order, (left, right) in (("a_left", ("a", "b")), ("b_left", ("b", "a"))):
            images = unguided if unguided is not None else gen(
                prompt, records, n, cell_seed(6, 0), [f"{left}={LEFT_BOX}", f"{right}={RIGHT_BOX}"])
            rates[order] = judge.placement_rate(images, objs[left], objs[right])
        out[w] = rates
    return out
