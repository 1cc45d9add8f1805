"""Quality benchmark on the toy world: CNS, Cones, Cones 2 and two baselines, learning six
personal concepts in sequence, judged by the attribute probe.

    python -m bench.quality                 # full run (32 generations per cell)
    python -m bench.quality --quick         # fewer images and steps; the learns as in the full run (~10 min a method on 2 CPU cores)
    python -m bench.quality --quick --json  # the table, then one JSON object on the last line
    python -m bench.quality --methods cns --set cns.top_p=3 --set cns.steps=150   # a sweep point

Each method gets a fresh copy of the base model and learns concepts c1..c6 (4 photos each) one
after another through its public interface (`learn`; CNS and the baselines keep what they learned
live, Cones and Cones 2 are applied per request by the generation routine). Figures, all in [0, 1]
unless noted, each from fixed seeds:

- fidelity: "a photo of <ci>" right after ci was learned: the probe reads ci's named look (shape,
  colour, pattern and second colour: words could say them, but the concepts learn from
  template captions that do not). `unnamed`: on the same images, ci's tilt (the look no word
  says; chance 1/2 of the patterned images). `fidelity_final` / `unnamed_final`: the same after
  all concepts were learned (with `--concepts 20`, the CNS paper's protocol). `base_fidelity` /
  `base_unnamed`: the base model's rates for "a photo of a <class>" (chance of that look).
- forgetting: c1's fidelity right after it was learned minus after all (a drop; > 0 = forgot).
- prompt fidelity: "a photo of <ci> on the grass" (a background per concept) after all: the
  background the prompt asks for is honoured. `prompt_look`: ci's named look in those same
  images (a concept that gives way to the scene by losing its look scores high on the first
  and low on this one).
- prior drop: plain prompts ("a photo of a red circle on the sand": shape, colour, background
  honoured) before any learning minus after all. `prior_drop_two`: the same for plain
  two-object prompts (per half).
- composition: "a photo of <a> and <b> on the grass" for the pairs (c1, c2), (c3, c4), (c5, c6),
  with boxes (a left and b right, and b left and a right; averaged): both named looks right,
  each in its box (`composition_guided`); the same prompt without boxes judged against the
  same arrangements (`composition_unguided`); `placement_*`: both shapes in their boxes (where,
  not how well). Mixed pairs (`cns+cones2`, `cones+cones2`): a from the first method's
  records, b from the second's, on a base model holding the first method's CNS concepts live.
- stored bytes and learn seconds per concept; K/V share each concept trains, and for CNS the
  share of those that are general neurons (0 by construction).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bench._cells import (Generator, MethodResult, measure_base, mixed_composition, placement_sweep,
                          run_method)
from bench._world import CAPTIONS, Concept, Judge, make_concepts, prompt_background
from cns_daemon.api.errors import BadInput
from cns_daemon.api.names import METHODS as PRODUCT

METHODS = (*PRODUCT, "naive", "ti")   # the product's methods and the two baselines
MIXED = ("cns+cones2", "cones+cones2")  # the mixed-method compositions


@dataclass
class QualityConfig:
    methods: tuple[str, ...] = METHODS
    concepts: int = 6
    photos: int = 4
    generations: int = 32           # images per cell (per concept, per plain-prompt set, per pair)
    gen_steps: int | None = None    # DDIM steps per generation; None: the model's own, as generation uses
    cfg_scale: float | None = None  # CFG; None: the model's own (its cones.json), as generation uses
    guidance_weight: float | None = None  # layout guidance w; None: GuidanceConfig's default
    guidance_suppress: str | None = None  # layout guidance suppress; None: GuidanceConfig's default
    seed: int = 0
    steps: dict[str, int] = field(default_factory=dict)          # per method; absent = default
    options: dict[str, dict] = field(default_factory=dict)       # per method LearnSpec.options
    model: str | None = None        # None: the toy-world fixture
    tiny: bool = False              # the tiny random test model instead (smoke tests)
    captions: str = "none"          # photos' sidecar captions: none (templates) | background

    @classmethod
    def quick(cls, **kw) -> "QualityConfig":
        """8 generations per cell and 10 DDIM steps; every method learns with its default steps
        (Cones 2 used to take 100 here, when it learned nothing at any count)."""
        return cls(**{"generations": 8, "gen_steps": 10, **kw})


# --- models and methods --------------------------------------------------------------------------

def load_model(cfg: QualityConfig):
    if cfg.tiny:
        from cns_daemon.model import build_tiny_pipeline

        return build_tiny_pipeline(seed=0)
    from cns_daemon.model import load_pipeline

    return load_pipeline(cfg.model, device="cpu", dtype="float32")


def method_for(name: str):
    if name in ("naive", "ti"):
        from bench.baselines import get_baseline

        return get_baseline(name)
    from cns_daemon.methods import get_method

    return get_method(name)


def check_methods(cfg: QualityConfig, set_for: set[str] = frozenset()) -> None:
    """Method names and their options, refused (BadInput) before the base model's measurement
    takes its minutes, not found one method at a time after it. `set_for`: the methods --set
    names, each of which must be run."""
    from cns_daemon.methods import common as C

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise BadInput(f"Unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}.",
                       f"Use some of: {', '.join(METHODS)}.")
    unused = sorted(set(set_for) - set(cfg.methods))
    if unused:
        raise BadInput(f"--set for {', '.join(unused)}, not in --methods.", "Add it to --methods, or drop the --set.")
    for name in cfg.methods:
        options, steps = cfg.options.get(name, {}), cfg.steps.get(name)
        if name in ("naive", "ti"):
            from bench.baselines import parse_options

            parse_options(name, options, steps)
        else:
            C.parse_options(method_for(name).Params, options, steps)


# --- running --------------------------------------------------------------------------------------

def _generator(pipe, cfg: QualityConfig, weight: float | None = None) -> Generator:
    from cns_daemon.model import recommended_guidance, recommended_steps

    scale = recommended_guidance(pipe) if cfg.cfg_scale is None else cfg.cfg_scale
    steps = recommended_steps(pipe) if cfg.gen_steps is None else cfg.gen_steps
    return Generator(pipe, steps, scale,
                     cfg.guidance_weight if weight is None else weight, cfg.guidance_suppress)


def run_one(name: str, cfg: QualityConfig, concepts: list[Concept], judge: Judge, work: Path):
    pipe = load_model(cfg)
    return run_method(method_for(name), name, pipe, _generator(pipe, cfg), judge, concepts,
                      cfg.generations, cfg.seed, cfg.steps.get(name), cfg.options.get(name, {}), work)


def run(cfg: QualityConfig, judge: Judge | None = None, log=print) -> dict:
    judge = judge or Judge()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cones-bench-") as tmp:
        work = Path(tmp)
        (work / "photos").mkdir()
        concepts = make_concepts(cfg.concepts, cfg.photos, cfg.seed, work / "photos", cfg.captions)
        base_pipe = load_model(cfg)
        from cns_daemon.model import recommended_guidance, recommended_steps

        # the model's own, as a user's generate gets them, recorded with the figures they gave
        if cfg.cfg_scale is None:
            cfg = replace(cfg, cfg_scale=recommended_guidance(base_pipe))
        if cfg.gen_steps is None:
            cfg = replace(cfg, gen_steps=recommended_steps(base_pipe))
        base = measure_base(_generator(base_pipe, cfg), judge, concepts, cfg.generations,
                            cfg.seed)
        log(f"base model: fidelity {_mean(base.fidelity):.3f}, plain prompts {base.prior:.3f} "
            f"(two objects {base.prior_two:.3f}) "
            f"({time.perf_counter() - started:.0f} s)")
        results, records = {}, {}
        for name in cfg.methods:
            t0 = time.perf_counter()
            try:
                results[name], records[name] = run_one(name, cfg, concepts, judge, work)
            except Exception as exc:  # one broken method must not hide the others' numbers
                results[name] = MethodResult(name, error=f"{type(exc).__name__}: {exc}")
            log(f"{name}: done in {time.perf_counter() - t0:.0f} s"
                + (f" ({results[name].error})" if results[name].error else ""))
        mixed = {}
        for combo in MIXED:
            first, second = combo.split("+")
            if first in records and second in records and len(concepts) >= 2:
                pipe = load_model(cfg)
                mixed[combo] = asdict(mixed_composition(pipe, _generator(pipe, cfg), judge, concepts,
                                                        records[first], records[second], cfg.generations))
            elif {first, second} <= set(cfg.methods):   # asked for, not measured: said, not dropped
                log(f"{combo}: not measured ({'one concept' if len(concepts) < 2 else 'a method failed'})")
    return {"config": asdict(cfg), "concepts": [_describe(c) for c in concepts],
            "base": asdict(base), "methods": {k: asdict(v) | {"forgetting": _forgetting(v)}
                                              for k, v in results.items()},
            "mixed": mixed, "wall_s": time.perf_counter() - started}


def _describe(c: Concept) -> str:
    o = c.obj
    return f"{c.name}: {o.tilt} {o.pattern} {o.second_color}-on-{o.color} {o.shape}"


def _forgetting(r: MethodResult) -> float | None:
    """None with one concept: nothing came after it (it read 0.000, a goal met by nothing)."""
    return r.forgetting if len(r.fidelity) > 1 and r.fidelity_final else None


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summary(result: dict) -> dict:
    base = result["base"]
    out: dict = {"base_fidelity": _mean(base["fidelity"]), "base_unnamed": _mean(base["unnamed"]),
                 "prior_before": base["prior"], "prior_two_before": base["prior_two"]}
    for m, r in result["methods"].items():
        ok = r["error"] is None
        comp = r["composition"]
        values = {
            "fidelity": _mean(r["fidelity"]), "fidelity_final": _mean(r["fidelity_final"]),
            "unnamed": _mean(r["unnamed"]), "unnamed_final": _mean(r["unnamed_final"]),
            "forgetting": r["forgetting"], "prior_drop": base["prior"] - r["prior_after"],
            "prior_drop_two": base["prior_two"] - r["prior_two_after"],
            "prompt_fidelity": _mean(r["prompt_fidelity"]), "prompt_look": _mean(r["prompt_look"]),
            "composition_guided": comp["guided"], "composition_unguided": comp["unguided"],
            "placement_guided": comp["placement_guided"],
            "placement_unguided": comp["placement_unguided"],
            "bytes_per_concept": _mean(r["stored_bytes"]), "learn_s_per_concept": _mean(r["learn_s"]),
            "kv_share": _mean(r["kv_share"]), "general_share": _mean(r["general_share"])}
        for key, value in values.items():
            out[f"{m}_{key}"] = value if ok else None
        if not ok:
            out[f"{m}_error"] = r["error"]
    for combo, comp in result.get("mixed", {}).items():
        out[f"{combo}_composition_guided"] = comp["guided"]
        out[f"{combo}_composition_unguided"] = comp["unguided"]
        out[f"{combo}_placement_guided"] = comp["placement_guided"]
        out[f"{combo}_placement_unguided"] = comp["placement_unguided"]
    out["wall_s"] = round(result["wall_s"], 1)
    return out


def print_table(result: dict) -> None:
    s = summary(result)
    cfg = result["config"]
    print(f"Toy-world quality: {cfg['concepts']} concepts x {cfg['photos']} photos, "
          f"{cfg['generations']} generations per cell, {cfg['gen_steps']} DDIM steps, CFG "
          f"{cfg['cfg_scale']:g}, seed {cfg['seed']}"
          + (f", photos captioned ({cfg['captions']})" if cfg.get("captions", "none") != "none" else ""))
    print("Concepts: " + "; ".join(result["concepts"]))
    print(f"Base model: named look (class prompt) {s['base_fidelity']:.3f}, tilt {s['base_unnamed']:.3f}, "
          f"plain prompts {s['prior_before']:.3f}, two-object plain prompts {s['prior_two_before']:.3f}")
    cols = [("named", "fidelity"), ("final", "fidelity_final"), ("forget", "forgetting"),
            ("tilt", "unnamed"), ("tilt_fin", "unnamed_final"), ("prompt", "prompt_fidelity"),
            ("in_scene", "prompt_look"), ("prior_drop", "prior_drop"), ("prior2_drop", "prior_drop_two"),
            ("comp_box", "composition_guided"), ("comp_nobox", "composition_unguided"),
            ("place_box", "placement_guided"), ("place_nobox", "placement_unguided"),
            ("kv_share", "kv_share"), ("general", "general_share"), ("KB/concept", "bytes_per_concept"),
            ("learn s", "learn_s_per_concept")]
    print(f"{'method':>8}" + "".join(f"{h:>12}" for h, _ in cols))
    for m in result["methods"]:
        if s.get(f"{m}_error"):
            print(f"{m:>8}  unavailable: {s[m + '_error']}")
            continue
        cells = []
        for _, key in cols:
            v = s[f"{m}_{key}"]
            cells.append(f"{'-':>12}" if v is None else f"{v / 1e3:12.1f}" if key == "bytes_per_concept"
                         else f"{v:12.1f}" if key == "learn_s_per_concept" else f"{v:12.3f}")
        print(f"{m:>8}" + "".join(cells))
    for combo in result.get("mixed", {}):
        print(f"{combo}: composition with boxes {s[combo + '_composition_guided']:.3f}, "
              f"without {s[combo + '_composition_unguided']:.3f}; placement with boxes "
              f"{s[combo + '_placement_guided']:.3f}, without {s[combo + '_placement_unguided']:.3f}")
    print_per_concept(result)
    for m, r in result["methods"].items():
        for note in r.get("notes", [])[:3]:
            print(f"note ({m}) {note}")
    print(f"Wall time {s['wall_s']:.0f} s. Goals (CNS / Cones, Cones 2): named look >= 0.8 / 0.7, "
          "tilt >= 0.6 (CNS), prompt fidelity >= 0.9, forgetting <= 0.05, prior drops <= 0.03, "
          "composition with boxes >= 0.7 (CNS+CNS, CNS+Cones 2, Cones+Cones 2).")


def print_per_concept(result: dict) -> None:
    """One line per concept and method: which concepts pull a mean down (the photos' backgrounds,
    a colour the prompt's background shares, ...)."""
    keys = [("named", "fidelity"), ("final", "fidelity_final"), ("tilt", "unnamed"),
            ("prompt", "prompt_fidelity"), ("scene", "prompt_look")]
    for m, r in result["methods"].items():
        if r["error"] is not None:
            continue
        print(f"  {'per concept (' + m + ')':<56}" + "".join(f"{h:>7}" for h, _ in keys))
        for i, label in enumerate(result["concepts"]):
            cells = [r[key][i] if i < len(r[key]) else None for _, key in keys]
            label = f"{label} ({prompt_background(i)} asked)"
            print(f"  {label:<56}" + "".join("      -" if v is None else f"{v:7.3f}" for v in cells))


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str]) -> tuple[dict[str, int], dict[str, dict]]:
    """`method.key=value` overrides: `steps` goes to LearnSpec.steps, the rest to options."""
    steps, options = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, opt = key.partition(".")
        if not sep or not dot or method not in METHODS:
            raise SystemExit(f"--set {item!r}: use METHOD.OPTION=VALUE with METHOD in {METHODS}")
        if opt == "steps":
            steps[method] = int(value)
        else:
            options.setdefault(method, {})[opt] = _value(value)
    return steps, options


def _quiet() -> None:
    """No loader warnings or progress bars between the bench's own lines."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 generations per cell, 10 DDIM steps")
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--concepts", type=int, default=6)
    parser.add_argument("--generations", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="a diffusers folder (default: toy world)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (smoke test)")
    parser.add_argument("--captions", default="none", choices=CAPTIONS,
                        help="photos' sidecar captions: none (the methods' templates, the default) "
                             "or background (each says its photo's scene, not the look)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="CFG scale (default: the model's own, from its cones.json)")
    parser.add_argument("--guidance-weight", type=float, default=None, help="layout guidance w")
    parser.add_argument("--guidance-suppress", default=None, choices=("others", "outside"),
                        help="layout guidance: where a concept is held off (default: GuidanceConfig's)")
    parser.add_argument("--placement-sweep", default=None, metavar="W1,W2,...",
                        help="only measure guided placement on the base model for these w (0 = unguided)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _quiet()
    steps, options = parse_sets(args.set)
    kw = dict(methods=tuple(m for m in args.methods.split(",") if m), concepts=args.concepts,
              seed=args.seed, steps=steps, options=options, model=args.model, tiny=args.tiny,
              cfg_scale=args.guidance_scale,
              guidance_weight=args.guidance_weight, guidance_suppress=args.guidance_suppress,
              captions=args.captions)
    if args.generations is not None:
        kw["generations"] = args.generations
    cfg = QualityConfig.quick(**kw) if args.quick else QualityConfig(**kw)
    try:
        check_methods(cfg, set(steps) | set(options))
    except BadInput as exc:
        parser.error(f"{exc.message} {exc.hint or ''}".strip())
    if args.placement_sweep:
        pipe = load_model(cfg)
        rates = placement_sweep(pipe, lambda w: _generator(pipe, cfg, w), Judge(),
                                [float(w) for w in args.placement_sweep.split(",")], cfg.generations)
        for w, r in rates.items():
            print(f"w = {w:g}: both shapes in their boxes: a left {r['a_left']:.3f}, b left {r['b_left']:.3f}")
        if args.json:
            print(json.dumps({f"placement_w{w:g}_{k}": v for w, r in rates.items() for k, v in r.items()}))
        return
    result = run(cfg)
    print_table(result)
    if args.json:
        print(json.dumps(summary(result)))


if __name__ == "__main__":
    main()
