"""Overhead benchmark at SD 1.5 shape (random weights, no download; 256 px on CPU):

    python -m bench.overhead            # a table
    python -m bench.overhead --json     # the table, then one JSON object on the last line

Every row is measured in a fresh subprocess (bench/_overhead_worker.py), so its peak RSS
(VmHWM) is its own:
- learning: per-step seconds of each method (1 warm-up step, then timed steps, read from the
  method's own progress events) and peak RSS, as ratios to a plain diffusers-style K/V
  fine-tune step with the same loss and batch; apply+remove milliseconds of one concept; stored
  bytes per concept (through the store); the fraction of K/V weights each method touches.
  Cones has two rows: its defaults (`learn/cones`: A2, then its neurons' values trained, the
  value-training step timed) and the paper's binary form (`learn/cones_paper`: a mask, shut).
- generation: layout-guided vs plain generation time (best of repeats, same request).
- memory options (cns_daemon/memory.py): CNS learning peak RSS without SDPA, with SDPA (the CPU
  default) and with SDPA + gradient checkpointing; generation peak RSS with and without VAE
  tiling. Offload and autocast only act on CUDA. With a CUDA device, the same at 512 px plus
  seconds per learned concept (default steps and options) for each method; without one those
  rows are skipped.
Times are noisy on a shared CPU: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench._overhead_worker import Measurement, Task
from cns_daemon.api.names import METHODS as PRODUCT

PRODUCT_METHODS = PRODUCT
# with Cones's paper form (values shut, a mask) and the two baselines
METHODS = (*PRODUCT_METHODS, "cones_paper", "naive", "ti")
PAPER_CONES_BYTES = 1.43e6  # Cones paper: 1.43 MB per subject as int indices
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class OverheadConfig:
    methods: tuple[str, ...] = METHODS
    small: bool = False           # the scaled-down architecture (smoke tests)
    size: int = 256
    steps: int = 3                # 1 warm-up + 2 timed
    threads: int = 1              # per worker; 1 is fastest when the 2 cores are shared
    gen_steps: int = 3
    repeats: int = 2
    memory_rows: bool = True
    cuda: bool | None = None      # None: when a CUDA device is present
    timeout_s: int = 900


@dataclass
class Row:
    name: str
    m: Measurement


def run_task(task: Task, timeout_s: int) -> Measurement:
    """One worker subprocess; its stdout's MEASUREMENT line is the result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    try:
        proc = subprocess.run([sys.executable, "-m", "bench._overhead_worker",
                               json.dumps(asdict(task))], capture_output=True, text=True,
                              timeout=timeout_s, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return Measurement(asdict(task), error=f"timed out after {timeout_s} s")
    for line in proc.stdout.splitlines():
        if line.startswith("MEASUREMENT "):
            return Measurement(**json.loads(line[len("MEASUREMENT "):]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return Measurement(asdict(task), error=f"worker exited {proc.returncode}: {' | '.join(tail)}")


def tasks(cfg: OverheadConfig, cuda: bool) -> list[tuple[str, Task]]:
    base = Task("learn", small=cfg.small, size=cfg.size, steps=cfg.steps, threads=cfg.threads,
                gen_steps=cfg.gen_steps, repeats=cfg.repeats)
    out = [("learn/plain", base)]
    out += [(f"learn/{m}", replace(base, method=m)) for m in cfg.methods]
    out.append(("generate", replace(base, kind="generate")))
    if cfg.memory_rows:
        out += [("memory/cns/no-sdpa", replace(base, method="cns", memory={"sdpa": False})),
                ("memory/cns/sdpa+checkpointing",
                 replace(base, method="cns", memory={"gradient_checkpointing": True})),
                ("memory/generate/vae-tiling", replace(base, kind="generate",
                                                       memory={"vae_tiling": True}))]
    if cuda:
        gpu = replace(base, device="cuda", size=512 if not cfg.small else cfg.size)
        all_on = {"gradient_checkpointing": True, "autocast": True, "offload": True,
                  "vae_tiling": True}
        out += [("cuda/learn/plain", gpu), ("cuda/learn/plain/all-options", replace(gpu, memory=all_on))]
        out += [(f"cuda/learn-full/{m}", replace(gpu, method=m, full_learn=True, memory=all_on))
                for m in cfg.methods]
    return out


def run(cfg: OverheadConfig, log=print) -> dict:
    cuda = cfg.cuda
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    rows = []
    for name, task in tasks(cfg, cuda):
        m = run_task(task, cfg.timeout_s)
        rows.append(Row(name, m))
        log(f"{name}: " + (m.error or f"peak RSS {m.peak_rss_kb / 1e6:.2f} GB"))
    return {"config": asdict(cfg), "cuda": cuda, "rows": {r.name: asdict(r.m) for r in rows}}


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _step(row: dict) -> float | None:
    """Mean of the timed steps (the first, a warm-up, is left out when there are more)."""
    times = row["step_s"][1:] if len(row["step_s"]) > 1 else row["step_s"]
    return _mean(times)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def summary(result: dict) -> dict:
    rows = result["rows"]
    plain = rows["learn/plain"]
    out: dict = {"plain_step_s": _step(plain), "plain_peak_rss_gb": plain["peak_rss_kb"] / 1e6}
    for name, r in rows.items():
        if name.startswith("learn/") and name != "learn/plain":
            m = name.split("/", 1)[1]
            out[f"train_step_s_{m}"] = _step(r)
            out[f"train_step_ratio_{m}"] = _ratio(_step(r), _step(plain))
            out[f"peak_rss_gb_{m}"] = r["peak_rss_kb"] / 1e6
            out[f"peak_rss_ratio_{m}"] = _ratio(r["peak_rss_kb"], plain["peak_rss_kb"])
            out[f"apply_remove_ms_{m}"] = r["apply_remove_ms"]
            out[f"stored_bytes_{m}"] = r["stored_bytes"]
            out[f"fraction_kv_{m}"] = r["fraction_kv"]
            if r["error"]:
                out[f"error_{m}"] = r["error"]
    gen = rows["generate"]
    out["plain_gen_s"], out["guided_gen_s"] = gen["plain_gen_s"], gen["guided_gen_s"]
    out["guidance_ratio"] = _ratio(gen["guided_gen_s"], gen["plain_gen_s"])
    # The goal (< 50 ms per concept) is the product methods'; the baselines are listed apart.
    ar = [out.get(f"apply_remove_ms_{m}") for m in PRODUCT_METHODS]
    ar = [v for v in ar if v is not None]
    out["apply_remove_ms"] = max(ar) if ar else None   # the slowest product method's
    out["cones_mask_bytes"] = out.get("stored_bytes_cones_paper")
    out["cones_mask_vs_paper"] = _ratio(out.get("stored_bytes_cones_paper"), PAPER_CONES_BYTES)
    out["cones_values_bytes"] = out.get("stored_bytes_cones")
    out["cns_delta_bytes"] = out.get("stored_bytes_cns")
    out["residual_bytes"] = out.get("stored_bytes_cones2")
    out["residual_raw_bytes"] = rows.get("learn/cones2", {}).get("residual_raw_bytes")
    for name, r in rows.items():
        if name.startswith(("memory/", "cuda/")):
            key = name.replace("/", "_").replace("-", "_").replace("+", "_")
            out[f"{key}_peak_rss_gb"] = r["peak_rss_kb"] / 1e6
            if r["cuda_peak_bytes"] is not None:
                out[f"{key}_cuda_peak_gb"] = r["cuda_peak_bytes"] / 1e9
            if name.startswith("cuda/learn-full/"):
                out[f"{key}_learn_s"] = r["learn_s"]
            if r["error"]:
                out[f"{key}_error"] = r["error"]
    out["memory_cns_sdpa_peak_rss_gb"] = out.get("peak_rss_gb_cns")
    out["memory_generate_plain_peak_rss_gb"] = gen["peak_rss_kb"] / 1e6
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_table(result: dict) -> None:
    s = summary(result)
    rows = result["rows"]
    cfg = result["config"]
    shape = "scaled-down SD-1.5 architecture" if cfg["small"] else "SD 1.5 shape, random weights"
    print(f"Overhead at {shape}, {cfg['size']} px, CPU, {cfg['threads']} thread(s) per worker; "
          f"{cfg['steps']} learn steps (first is warm-up)")
    print(f"{'row':>28}{'step s':>9}{'x plain':>9}{'peak GB':>9}{'x plain':>9}"
          f"{'apply+rm':>10}{'stored':>12}{'K/V frac':>10}")
    for name, r in rows.items():
        if not name.startswith("learn/"):
            continue
        m = name.split("/", 1)[1]
        if r["error"]:
            print(f"{name:>28}  error: {r['error']}")
            continue
        plain = m == "plain"
        print(f"{name:>28}{_f(_step(r), '9.2f')}"
              f"{_f(1.0 if plain else s[f'train_step_ratio_{m}'], '9.2f')}"
              f"{r['peak_rss_kb'] / 1e6:9.2f}{_f(1.0 if plain else s[f'peak_rss_ratio_{m}'], '9.2f')}"
              f"{_f(r['apply_remove_ms'], '8.1f') + ' ms' if r['apply_remove_ms'] is not None else '-':>10}"
              f"{_f(r['stored_bytes'], ',d'):>12}"
              f"{_f(r['fraction_kv'], '.4f'):>10}")
    print(f"Generation ({cfg['gen_steps']} DDIM steps, best of {cfg['repeats']}): plain "
          f"{_f(s['plain_gen_s'], '.2f')} s, layout-guided {_f(s['guided_gen_s'], '.2f')} s, "
          f"ratio {_f(s['guidance_ratio'], '.3f')} (goal <= 1.15)")
    print(f"Cones mask (paper form, values shut) {_f(s['cones_mask_bytes'], ',')} B stored vs the "
          f"paper's 1.43 MB; Cones trained values (default) {_f(s['cones_values_bytes'], ',')} B; CNS delta "
          f"{_f(s['cns_delta_bytes'], ',')} B; Cones 2 residual {_f(s['residual_bytes'], ',')} B "
          f"stored ({_f(s['residual_raw_bytes'], ',')} B raw; goal <= 4 KB); apply+remove "
          f"slowest of CNS/Cones/Cones 2 {_f(s['apply_remove_ms'], '.1f')} ms (goal < 50 ms)")
    print("Memory options (peak RSS, GB):")
    mem = [("CNS learn, classic attention", "memory/cns/no-sdpa"),
           ("CNS learn, SDPA (CPU default)", "learn/cns"),
           ("CNS learn, SDPA + checkpointing", "memory/cns/sdpa+checkpointing"),
           ("generate, plain (no tiling)", "generate"),
           ("generate, VAE tiling", "memory/generate/vae-tiling")]
    for label, key in mem:
        if key in rows:
            r = rows[key]
            print(f"  {label:<34}" + (f"error: {r['error']}" if r["error"]
                                      else f"{r['peak_rss_kb'] / 1e6:6.2f}"))
    if result["cuda"]:
        for name, r in rows.items():
            if name.startswith("cuda/"):
                print(f"  {name:<34}" + (f"error: {r['error']}" if r["error"] else
                                         f"CUDA peak {_f(r['cuda_peak_bytes'] and r['cuda_peak_bytes'] / 1e9, '.2f')} GB, "
                                         f"learn {_f(r['learn_s'], '.1f')} s"))
    else:
        print("  (no CUDA device: the 512 px GPU rows and seconds per learned concept are skipped)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--small", action="store_true", help="scaled-down architecture (smoke)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory-rows", action="store_true")
    args = parser.parse_args(argv)
    cfg = OverheadConfig(methods=tuple(m for m in args.methods.split(",") if m), small=args.small,
                         steps=args.steps, threads=args.threads,
                         memory_rows=not args.no_memory_rows)
    result = run(cfg, log=lambda msg: print(msg, file=sys.stderr))
    print_table(result)
    if args.json:
        print(json.dumps(summary(result)))


if __name__ == "__main__":
    main()
