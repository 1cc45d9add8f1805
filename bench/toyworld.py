"""Toy-world benchmark: the probe, and the shipped fixture model read by the probe.

    python -m bench.toyworld            # tables
    python -m bench.toyworld --json     # the tables, then one JSON object on the last line

Rows: probe accuracy per attribute on fresh renders (whole single-object photos, and halves of
two-object photos); base-model prompt fidelity over fixed plain single-object prompts (shape,
colour and background all as named, and each alone), and per half for two-object prompts; the
pattern distribution the base model draws for one shape/colour/background prompt (it should
vary: pinning it down is a concept's job); model size on disk; generation time per image (in a
batch, and alone). Everything is seeded: the same model gives the same fidelity numbers.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from cns_daemon.model import TOYWORLD_MODEL, load_pipeline
from cns_daemon.toyworld.fidelity import (DEFAULT_GUIDANCE, DEFAULT_STEPS, attribute_distribution,
                                          generate_batch, plain_prompt_cases, prompt_fidelity,
                                          two_object_fidelity)
from cns_daemon.toyworld.probe import Probe
from cns_daemon.toyworld.probe_train import accuracy
from cns_daemon.toyworld.world import ObjectSpec, SceneSpec, caption


def model_bytes() -> int:
    """Bytes of the shipped model's weights and configs (what a user downloads)."""
    return sum(f.stat().st_size for f in TOYWORLD_MODEL.rglob("*") if f.is_file())


def run(n_prompts: int, n_pairs: int, n_pattern: int, steps: int, guidance: float) -> dict:
    probe = Probe.load()
    acc = accuracy(probe)
    pipe = load_pipeline(None, device="cpu")

    cases = plain_prompt_cases(n_prompts, seed=1)
    t0 = time.perf_counter()
    images = generate_batch(pipe, [c.prompt for c in cases], [c.seed for c in cases],
                            steps=steps, guidance_scale=guidance)
    per_image = (time.perf_counter() - t0) / len(cases)
    single = prompt_fidelity(probe, images, [c.scene for c in cases])

    pairs = plain_prompt_cases(n_pairs, seed=2, two_objects=True)
    pair_images = generate_batch(pipe, [c.prompt for c in pairs], [c.seed for c in pairs],
                                 steps=steps, guidance_scale=guidance)
    two = two_object_fidelity(probe, pair_images, [c.scene for c in pairs])

    scene = SceneSpec((ObjectSpec("star", "red"),), "white")
    pattern_prompt = caption(scene)
    pattern_images = generate_batch(pipe, [pattern_prompt] * n_pattern, list(range(n_pattern)),
                                    steps=steps, guidance_scale=guidance)
    patterns = attribute_distribution(probe, pattern_images, "pattern")

    t0 = time.perf_counter()
    generate_batch(pipe, [pattern_prompt], [0], steps=steps, guidance_scale=guidance)
    alone = time.perf_counter() - t0

    return {
        "probe_accuracy": acc,
        "probe_accuracy_min": min(min(v.values()) for v in acc.values()),
        "base_prompt_fidelity": single.all_match,
        "base_prompt_fidelity_per_attribute": single.per_attribute,
        "two_object_fidelity": two.all_match,
        "two_object_fidelity_per_attribute": two.per_attribute,
        "pattern_prompt": pattern_prompt,
        "pattern_distribution": patterns,
        "model_bytes": model_bytes(),
        "gen_seconds_per_image": per_image,
        "gen_seconds_single_image": alone,
        "n_generations": single.n, "n_two_object_halves": two.n, "steps": steps,
        "guidance_scale": guidance, "torch_threads": torch.get_num_threads(),
    }


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

    t = Table(title=f"Base-model prompt fidelity ({r['steps']} DDIM steps, guidance {r['guidance_scale']})")
    for col in ("prompts", "n", "all of shape+colour+background", "shape", "colour", "background"):
        t.add_column(col, justify="right")
    for label, key, n in (("one object", "base_prompt_fidelity", r["n_generations"]),
                          ("two objects, per half", "two_object_fidelity", r["n_two_object_halves"])):
        per = r[f"{key}_per_attribute"]
        t.add_row(label, str(n), f"{r[key]:.3f}", f"{per['shape']:.3f}", f"{per['color']:.3f}",
                  f"{per['background']:.3f}")
    con.print(t)

    t = Table(title=f"Patterns drawn for '{r['pattern_prompt']}'")
    t.add_column("pattern")
    t.add_column("fraction", justify="right")
    for k, v in r["pattern_distribution"].items():
        t.add_row(k, f"{v:.2f}")
    con.print(t)
    con.print(f"model size {r['model_bytes'] / 1e6:.1f} MB; generation {r['gen_seconds_per_image']:.3f} s/image "
              f"in batches, {r['gen_seconds_single_image']:.3f} s alone ({r['torch_threads']} threads)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Toy-world benchmark (probe + fixture model).")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--prompts", type=int, default=120, help="single-object plain prompts")
    p.add_argument("--pairs", type=int, default=40, help="two-object plain prompts")
    p.add_argument("--pattern-samples", type=int, default=48)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = run(a.prompts, a.pairs, a.pattern_samples, a.steps, a.guidance)
    print_tables(r)
    if a.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
