"""Toy-world benchmark: the probe, and the shipped fixture model read by the probe.

    python -m bench.toyworld            # tables
    python -m bench.toyworld --json     # the tables, then one JSON object on the last line

Rows (everything seeded: the same model gives the same numbers):
- probe accuracy per attribute on fresh renders (whole single-object photos, and halves of
  two-object photos);
- base-model prompt fidelity over fixed plain single-object prompts (shape, colour and
  background all as named, and each alone), and per half for two-object prompts;
- named-look fidelity over prompts that name pattern and second colour ("a photo of a red star
  with yellow stripes on the grass": shape, colour, pattern, second colour all as named);
- for "a photo of a red star" (no look named) the patterns and tilts the model draws, and their
  entropy in bits: they should stay spread (pinning them down is a concept's job);
- `eq3_base_general_overlap`: the share of a concept caption's Eq. 3 base neurons (top 5 % per
  row of |W| * ||X[:, j]||) that are also general (top 5 % for any calibration prompt), as
  cns/selection.py computes them;
- textual inversion of one concept (4 photos, default steps): named-look and tilt fidelity of
  "a photo of <c>" beside the base model's rate for "a photo of a <class>" — evidence that the
  words' text pathway exists and a learned token can reach it; with one token vector (as
  published; keys `textual_inversion_*`) and with several (`--ti-vectors`, keys
  `textual_inversion_<k>v_*`);
- `vae_roundtrip`: the probe's named-look reading of fresh renders of patterned objects, as
  drawn and after the model's own VAE (encode to the posterior mean, decode): one object, each
  half of a two-object photo, and both halves of one photo. A generated image is a decoded
  latent, so the last estimates the ceiling on composition (both named looks right, one in each
  half) on this model: what its autoencoder keeps of a right image (an estimate, not a bound:
  a latent the encoder would not give might decode better);
- model size on disk; generation time per image (in a batch, and alone).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cns_daemon.methods.common.tokens import MAX_VECTORS
from cns_daemon.model import TOYWORLD_MODEL, load_pipeline, recommended_guidance
from cns_daemon.toyworld.fidelity import (DEFAULT_GUIDANCE, DEFAULT_STEPS, attribute_distribution,
                                          entropy_bits, generate_batch, look_fidelity,
                                          named_look_cases, plain_prompt_cases, prompt_fidelity,
                                          two_object_fidelity)
from cns_daemon.toyworld.probe import Probe
from cns_daemon.toyworld.probe_train import accuracy
from cns_daemon.toyworld.train import to_tensor
from cns_daemon.toyworld.world import (BACKGROUNDS, NAMED_LOOK, PATTERNS, ObjectSpec, SceneSpec,
                                       caption, random_object, render)

UNNAMED_PROMPT = "a photo of a red star"
TOP_P = 5.0


def model_bytes(folder: Path = TOYWORLD_MODEL) -> int:
    """Bytes of the model's weights and configs (for the shipped one, what a user downloads)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def probe_floor(acc: dict[str, dict[str, float]]) -> float:
    """The worst attribute over both readings, the tilt of two-object halves too (the issue asks
    for every attribute; the benches judge halves by their named look, never their tilt, but
    a floor that leaves a reading out reported 0.963 where the worst was 0.945)."""
    return min(v for attrs in acc.values() for v in attrs.values())


def eq3_overlap(pipe, caption_text: str, top_p: float = TOP_P) -> float:
    """Share of `caption_text`'s Eq. 3 base neurons (one caption, top_p % per row) that are
    general (top_p % per row for any calibration prompt, the paper's OR)."""
    from cns_daemon.methods.cns.calibration_prompts import CALIBRATION_PROMPTS
    from cns_daemon.methods.cns.selection import column_norms, row_top
    from cns_daemon.model import kv_weights

    calib = column_norms(pipe, list(CALIBRATION_PROMPTS))
    norms = column_norms(pipe, [caption_text])[0]
    base = shared = 0
    for w in kv_weights(pipe.unet).values():
        mask = row_top(w, norms, top_p)
        general = torch.zeros_like(mask)
        for n in calib:
            general |= row_top(w, n, top_p)
        base += int(mask.sum())
        shared += int((mask & general).sum())
    return shared / base


def patterned_pairs(n: int, seed: int) -> list[SceneSpec]:
    """`n` two-object scenes, both objects patterned (their patterns and shapes differ), the
    backgrounds in turn."""
    rng = np.random.default_rng(seed)
    patterns = [p for p in PATTERNS if p != "solid"]
    scenes = []
    for i in range(n):
        first = random_object(rng, pattern=patterns[i % 3])
        second = random_object(rng, pattern=patterns[(i + 1) % 3])
        while second.shape == first.shape:
            second = random_object(rng, pattern=patterns[(i + 1) % 3])
        scenes.append(SceneSpec((first, second), BACKGROUNDS[i % len(BACKGROUNDS)]))
    return scenes


@torch.no_grad()
def vae_roundtrip(pipe, probe: Probe, n: int, seed: int = 4242) -> dict[str, dict[str, float]]:
    """Named look read on renders and on their VAE round trips: {"single", "half", "both_halves"}
    -> {"render", "vae"}. The single objects are named_look_cases' scenes."""
    vae = pipe.vae

    def roundtrip(images: list) -> np.ndarray:
        x = to_tensor(np.stack([np.asarray(im) for im in images])).to(vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        return ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    singles = [c.scene for c in named_look_cases(n, seed)]
    pairs = patterned_pairs(n, seed + 1)
    single_images = [render(s, seed * 1000 + i) for i, s in enumerate(singles)]
    pair_images = [render(s, (seed + 1) * 1000 + i) for i, s in enumerate(pairs)]
    out: dict[str, dict[str, float]] = {"single": {}, "half": {}, "both_halves": {}}
    for kind, convert in (("render", lambda ims: ims), ("vae", roundtrip)):
        out["single"][kind] = look_fidelity(probe, convert(single_images), singles).all_match
        halves = [[all(getattr(r, k) == getattr(o, k) for k in NAMED_LOOK) for r, o in zip(rr, s.objects)]
                  for rr, s in zip(probe.read_halves(convert(pair_images)), pairs)]
        out["half"][kind] = float(np.mean(halves))
        out["both_halves"][kind] = float(np.mean([all(h) for h in halves]))
    return out


def textual_inversion(pipe, probe: Probe, n: int, steps: int, guidance: float, seed: int = 0,
                      vectors: int = 1) -> dict:
    """Learn one concept by textual inversion (the bench baseline, default settings, `vectors`
    token vectors) on a copy of the model; generate "a photo of <c>" n times and read it."""
    from bench._world import Judge, class_prompt, concept_prompt, make_concepts
    from bench.baselines import TEXTUAL_INVERSION
    from cns_daemon.generate import MAX_IMAGES, generate
    from cns_daemon.methods.base import LearnSpec
    from cns_daemon.methods.cns.layers import stack_for

    judge = Judge(probe)
    with tempfile.TemporaryDirectory(prefix="cones-tw-") as tmp:
        (concept,) = make_concepts(1, 4, seed, Path(tmp))
        spec = LearnSpec(concept.name, concept.class_word, seed=seed, cache_dir=Path(tmp) / "cache",
                         options={"vectors": vectors})
        t0 = time.perf_counter()
        record = TEXTUAL_INVERSION.learn(pipe, list(concept.photos), spec)
        learn_s = time.perf_counter() - t0
        def images_of(prompt: str, records: dict) -> list:
            out = []
            for start in range(0, n, MAX_IMAGES):   # the routine's per-request limit
                out += generate(pipe, prompt, records, (), n=min(MAX_IMAGES, n - start),
                                seed=seed + start, steps=steps, guidance_scale=guidance)
            return out

        images = images_of(concept_prompt(concept), {concept.name: record})
        stack_for(pipe).pop(concept.name)  # learning left the token row written: take it off
        base = images_of(class_prompt(concept), {})
    o = concept.obj
    return {"concept": f"{o.color} {o.shape} with {o.second_color} {o.pattern}, {o.tilt}",
            "named": judge.concept_rate(images, o), "unnamed": judge.unnamed_rate(images, o),
            "base_named": judge.concept_rate(base, o), "base_unnamed": judge.unnamed_rate(base, o),
            "learn_s": learn_s}


def run(n_prompts: int, n_pairs: int, n_pattern: int, steps: int, guidance: float | None,
        ti: bool = True, model: Path = TOYWORLD_MODEL, ti_vectors: tuple[int, ...] = (1, 3),
        n_vae: int = 200) -> dict:
    """`guidance` None: the scale the model's cones.json recommends, as generation uses."""
    probe = Probe.load()
    acc = accuracy(probe)
    pipe = load_pipeline(model, device="cpu")
    guidance = recommended_guidance(pipe) if guidance is None else guidance

    def batch(cases):
        return generate_batch(pipe, [c.prompt for c in cases], [c.seed for c in cases],
                              steps=steps, guidance_scale=guidance)

    cases = plain_prompt_cases(n_prompts, seed=1)
    t0 = time.perf_counter()
    images = batch(cases)
    per_image = (time.perf_counter() - t0) / len(cases)
    single = prompt_fidelity(probe, images, [c.scene for c in cases])

    named_cases = named_look_cases(n_prompts, seed=3)
    named = look_fidelity(probe, batch(named_cases), [c.scene for c in named_cases])

    pairs = plain_prompt_cases(n_pairs, seed=2, two_objects=True)
    two = two_object_fidelity(probe, batch(pairs), [c.scene for c in pairs])

    pattern_images = generate_batch(pipe, [UNNAMED_PROMPT] * n_pattern, list(range(n_pattern)),
                                    steps=steps, guidance_scale=guidance)
    patterns = attribute_distribution(probe, pattern_images, "pattern")
    tilts = attribute_distribution(probe, pattern_images, "tilt")

    t0 = time.perf_counter()
    generate_batch(pipe, [UNNAMED_PROMPT], [0], steps=steps, guidance_scale=guidance)
    alone = time.perf_counter() - t0

    from cns_daemon.methods.common import allocate_token

    token = allocate_token(pipe.tokenizer, set())
    star = SceneSpec((ObjectSpec("star", "red", "stripes", "yellow"),), "grass")
    overlaps = {f"a photo of a {token} star": eq3_overlap(pipe, f"a photo of a {token} star"),
                caption(star, look="full"): eq3_overlap(pipe, caption(star, look="full"))}

    out = {
        "probe_accuracy": acc,
        "probe_accuracy_min": probe_floor(acc),
        "base_prompt_fidelity": single.all_match,
        "base_prompt_fidelity_per_attribute": single.per_attribute,
        "named_look_fidelity": named.all_match,
        "named_look_fidelity_per_attribute": named.per_attribute,
        "two_object_fidelity": two.all_match,
        "two_object_fidelity_per_attribute": two.per_attribute,
        "unnamed_prompt": UNNAMED_PROMPT,
        "unnamed_prompt_pattern_distribution": patterns,
        "unnamed_prompt_pattern_entropy": entropy_bits(patterns),
        "unnamed_prompt_tilt_distribution": tilts,
        "unnamed_prompt_tilt_entropy": entropy_bits(tilts),
        "eq3_base_general_overlap": next(iter(overlaps.values())),
        "eq3_base_general_overlap_per_caption": overlaps,
        "vae_roundtrip": vae_roundtrip(pipe, probe, n_vae),
        "n_vae_roundtrip": n_vae,
        "model_bytes": model_bytes(model),
        "gen_seconds_per_image": per_image,
        "gen_seconds_single_image": alone,
        "n_generations": single.n, "n_named": named.n, "n_two_object_halves": two.n,
        "n_unnamed": n_pattern, "steps": steps, "guidance_scale": guidance,
        "torch_threads": torch.get_num_threads(),
    }
    for k in ti_vectors if ti else ():
        r = textual_inversion(pipe, probe, n_pattern, steps, guidance, vectors=k)
        key = ti_key(k)
        out.update({f"{key}_named_fidelity": r["named"], f"{key}_unnamed_fidelity": r["unnamed"],
                    f"{key}_base_named": r["base_named"], f"{key}_base_unnamed": r["base_unnamed"],
                    f"{key}_concept": r["concept"], f"{key}_learn_s": r["learn_s"]})
    return out


def ti_key(vectors: int) -> str:
    """JSON key prefix of the textual-inversion figures with `vectors` token vectors."""
    return "textual_inversion" if vectors == 1 else f"textual_inversion_{vectors}v"


def print_tables(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="Probe accuracy on fresh renders")
    t.add_column("attribute")
    for part in r["probe_accuracy"]:
        t.add_column(part, justify="right")
    for attr in next(iter(r["probe_accuracy"].values())):
        t.add_row(attr, *(f"{r['probe_accuracy'][p][attr]:.3f}" for p in r["probe_accuracy"]))
    con.print(t)

    t = Table(title=f"Base-model fidelity ({r['steps']} DDIM steps, CFG {r['guidance_scale']})")
    for col in ("prompts", "n", "all", "per attribute"):
        t.add_column(col, justify="right")
    for label, key, n in (("plain, one object (shape+colour+background)", "base_prompt_fidelity",
                           r["n_generations"]),
                          ("naming the look (shape+colour+pattern+second colour)", "named_look_fidelity",
                           r["n_named"]),
                          ("plain, two objects, per half", "two_object_fidelity", r["n_two_object_halves"])):
        per = r[f"{key}_per_attribute"]
        t.add_row(label, str(n), f"{r[key]:.3f}", ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
    con.print(t)

    for attr in ("pattern", "tilt"):
        dist = r[f"unnamed_prompt_{attr}_distribution"]
        con.print(f"{attr} drawn for '{r['unnamed_prompt']}' ({r['n_unnamed']} images): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in dist.items())
                  + f"; entropy {r[f'unnamed_prompt_{attr}_entropy']:.2f} bits")
    for text, v in r["eq3_base_general_overlap_per_caption"].items():
        con.print(f"Eq. 3 base neurons that are general, '{text}': {v:.3f}")
    rt = r["vae_roundtrip"]
    con.print(f"Named look of patterned objects through the model's VAE ({r['n_vae_roundtrip']} renders "
              "each; render -> round trip): one object "
              f"{rt['single']['render']:.3f} -> {rt['single']['vae']:.3f}, a half of a two-object photo "
              f"{rt['half']['render']:.3f} -> {rt['half']['vae']:.3f}, both halves "
              f"{rt['both_halves']['render']:.3f} -> {rt['both_halves']['vae']:.3f} (composition's ceiling, estimated)")
    for k in range(1, MAX_VECTORS + 1):
        key = ti_key(k)
        if f"{key}_named_fidelity" in r:
            con.print(f"Textual inversion, {k} token vector{'s' if k > 1 else ''} ({r[f'{key}_concept']}): "
                      f"named look {r[f'{key}_named_fidelity']:.3f} (base model "
                      f"{r[f'{key}_base_named']:.3f}), tilt {r[f'{key}_unnamed_fidelity']:.3f} "
                      f"(base {r[f'{key}_base_unnamed']:.3f}); learned in {r[f'{key}_learn_s']:.0f} s")
    con.print(f"model size {r['model_bytes'] / 1e6:.1f} MB; generation {r['gen_seconds_per_image']:.3f} s/image "
              f"in batches, {r['gen_seconds_single_image']:.3f} s alone ({r['torch_threads']} threads)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Toy-world benchmark (probe + fixture model).")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--prompts", type=int, default=120, help="single-object prompts (plain, and naming the look)")
    p.add_argument("--pairs", type=int, default=40, help="two-object plain prompts")
    p.add_argument("--pattern-samples", type=int, default=64,
                   help=f"images of '{UNNAMED_PROMPT}' (and of the textual-inversion concept)")
    p.add_argument("--vae-renders", type=int, default=200,
                   help="renders of each kind read through the model's VAE (one object, two objects)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=None,
                   help=f"CFG scale (default: the model's own, from its cones.json; {DEFAULT_GUIDANCE:g} "
                        "for the shipped fixture)")
    p.add_argument("--no-ti", action="store_true", help="leave out the textual-inversion rows")
    p.add_argument("--ti-vectors", default="1,3",
                   help="token vectors of the textual-inversion rows, comma-separated (1: as published)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", type=Path, default=TOYWORLD_MODEL,
                   help="a toy-world fixture folder to measure (default: the shipped one)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        vectors = tuple(int(v) for v in a.ti_vectors.split(","))
    except ValueError:
        p.error(f"--ti-vectors {a.ti_vectors!r}: give numbers such as 1,3")
    if not vectors or not all(1 <= v <= MAX_VECTORS for v in vectors):
        p.error(f"--ti-vectors: each between 1 and {MAX_VECTORS}")
    r = run(a.prompts, a.pairs, a.pattern_samples, a.steps, a.guidance, ti=not a.no_ti,
            model=a.model, ti_vectors=vectors, n_vae=a.vae_renders)
    print_tables(r)
    if a.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
