"""Service benchmark: start-up with many stored CNS concepts, socket round-trip latency, inbox
drop-to-job-start latency.

    python -m bench.service [--json] [--concepts 100] [--fraction 0.01] [--settle 0.5]

The pipeline has SD 1.5's shapes (UNet 859.5M parameters with 32 cross-attention K/V tensors,
19.2M parameters; CLIP-L-sized text encoder) but no trained weights: the K/V tensors and token
embeddings that start-up reads are seeded random values, everything else is allocated and never
touched (no SD weights are reachable here, and loading them is not what is measured). The store
gets `--concepts` synthetic CNS concepts, each touching `--fraction` of every K/V tensor (float16
values) plus one token embedding.

Measured, all through the shipped code (store, Engine.attach, Service, ASGI app on a real Unix
socket, Inbox watcher, worker):
- startup_100_concepts_s: median over --repeat start-ups of store open + Engine.attach (base fingerprint, store binding, every CNS
  concept written back into the weights) + job recovery: start-up beyond model load;
- list / status round trips over the socket with the CLI's client (median and p99);
- inbox_to_job_s: a complete folder appears in the inbox -> its learn job is running (includes
  the configured settle time, reported beside it);
- generate_during_learn_wait_s: on the shipped toy-world model (the default model; real weights
  are not reachable here), a generate job submitted while a CNS learn job is training -> its
  images are written. The goal is at most one training step plus the generation itself
  (train_step_s + generate_alone_s, reported beside it as generate_during_learn_bound_s): the
  learn pauses at its next step boundary for it (worker.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def sd15_shaped_pipeline(seed: int = 0):
    """SD 1.5's module shapes; seeded random K/V weights and token embeddings, the rest empty."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cns_daemon.model import build_tiny_pipeline, kv_weights

    tiny = build_tiny_pipeline(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, bos_token_id=49406,
                                            eos_token_id=49407, pad_token_id=49407, projection_dim=768))
    unet, text = unet.to_empty(device="cpu"), text.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kv_weights(unet).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        emb = text.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=gen) * 0.02)
    return StableDiffusionPipeline(vae=tiny.vae, text_encoder=text, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def synthetic_records(pipe, count: int, fraction: float, fp: str, seed: int = 0):
    from cns_daemon.methods.common.tokens import rare_tokens
    from cns_daemon.model import kv_weights
    from cones_store.records import ConceptMeta, ConceptRecord, SparseDelta

    rng = np.random.default_rng(seed)
    shapes = {name: tuple(p.shape) for name, p in kv_weights(pipe.unet).items()}
    tokens = [t for _, t in zip(range(count), rare_tokens(pipe.tokenizer))]
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for i in range(count):
        deltas = {}
        for name, shape in shapes.items():
            idx = np.flatnonzero(rng.random(int(np.prod(shape))) < fraction).astype(np.int64)
            deltas[name] = SparseDelta(idx, (rng.standard_normal(idx.size) * 0.02).astype(np.float16), shape)
        neurons = sum(d.indices.size for d in deltas.values())
        meta = ConceptMeta(name=f"c{i:03d}", method="cns", class_word="dog", token=tokens[i],
                           hparams={"neurons": neurons, "synthetic": True}, fingerprint=fp)
        yield ConceptRecord(meta, deltas=deltas,
                            embeddings={tokens[i]: rng.standard_normal(width).astype(np.float32)})


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def generate_during_learn(gen_steps: int = 20) -> dict:
    """Submit -> done of a generate job while a learn job trains, beside the generate alone and
    one training step, on the toy-world model through the shipped Service and worker."""
    from cones_cli.demo import FIRST, photos_of
    from cns_daemon.archive import Archive, check_photos
    from cns_daemon.engine import Engine
    from cns_daemon.api.protocol import GenerateRequest
    from cns_daemon.service import Service
    from cns_daemon.api.settings import load_settings
    from cones_store import ConceptStore

    home = Path(tempfile.mkdtemp(prefix="cones-bench-", dir="/tmp"))
    try:
        settings = load_settings(home=str(home), watch_inbox=False)
        paths = settings.paths
        store = ConceptStore.open(paths.store)
        engine = Engine(settings, store, Archive(paths.archive))
        engine.start()
        service = Service(settings, store, engine)
        service.worker.start()
        request = GenerateRequest(prompt="a photo of a red star on the grass", steps=gen_steps, seed=1)

        def timed_generate() -> float:
            t0 = time.perf_counter()
            job = service.generate(request)
            while service.job(job.id).state not in ("done", "failed", "cancelled"):
                time.sleep(0.005)
            assert service.job(job.id).state == "done", service.job(job.id).error
            return time.perf_counter() - t0

        timed_generate()   # warm-up
        alone = statistics.median(timed_generate() for _ in range(3))
        uncaptioned = [(f, d, None) for f, d, _ in photos_of(FIRST, 3, 0)]   # as before captions
        photos, skipped = check_photos(uncaptioned)
        learn = service.submit_learn("benchstar", "star", "cns", 100_000, 0, photos, skipped,
                                     source="cli", options={"prior_images": 0})

        def train_step() -> int:
            p = service.worker.hub.latest(learn.id)
            return p.step if p is not None and p.phase == "train" else 0

        while train_step() < 3:
            time.sleep(0.005)
        s0, t0 = train_step(), time.perf_counter()
        while train_step() < s0 + 10:
            time.sleep(0.005)
        step_s = (time.perf_counter() - t0) / (train_step() - s0)
        waits = [timed_generate() for _ in range(3)]
        service.worker.cancel(learn.id)
        service.worker.stop(timeout=60)
        store.close()
        wait = statistics.median(waits)
        return {"generate_during_learn_wait_s": round(wait, 3),
                "generate_during_learn_runs_s": [round(w, 3) for w in waits],
                "generate_alone_s": round(alone, 3), "train_step_s": round(step_s, 3),
                "generate_during_learn_bound_s": round(step_s + alone, 3),
                "generate_steps": gen_steps, "learn_model": "toy-world (built in)"}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(concepts: int, fraction: float, settle: float, rounds: int, repeat: int = 3) -> dict:
    import torch
    import uvicorn

    from cones_cli.client import Client
    from cns_daemon.archive import Archive
    from cns_daemon.daemon import bind_socket, prepare_runtime
    from cns_daemon.engine import Engine
    from cns_daemon.inbox import Inbox
    from cns_daemon.model import fingerprint, kv_weights
    from cns_daemon.server import App
    from cns_daemon.service import Service
    from cns_daemon.api.settings import load_settings
    from cones_store import ConceptStore

    torch.set_num_threads(2)
    home = Path(tempfile.mkdtemp(prefix="cones-bench-", dir="/tmp"))
    try:
        settings = load_settings(home=str(home), model="sd15-shaped (random)", settle_seconds=settle)
        paths = settings.paths
        t0 = time.perf_counter()
        pipe = sd15_shaped_pipeline()
        fp = fingerprint(pipe)
        with ConceptStore.open(paths.store, fingerprint=fp) as store:
            for record in synthetic_records(pipe, concepts, fraction, fp):
                store.put(record)
            store_bytes = sum(store.size_of(m.name) for m in store.list())
        setup_s = time.perf_counter() - t0

        # --- start-up beyond model load, `repeat` times on fresh pipelines (the machine's load
        # moves single runs a lot); the last start-up's service is the one measured below
        startups = []
        for attempt in range(repeat):
            if attempt:
                store.close()
                pipe = sd15_shaped_pipeline()
            t_start = time.perf_counter()
            store = ConceptStore.open(paths.store)
            t_open = time.perf_counter()
            archive = Archive(paths.archive)
            engine = Engine(settings, store, archive)
            engine.attach(pipe)
            t_attach = time.perf_counter()
            service = Service(settings, store, engine, archive)
            service.worker.recover()
            startups.append((time.perf_counter() - t_start, t_open - t_start, t_attach - t_open))
        startup, open_s, attach_s = sorted(startups)[len(startups) // 2]

        # --- the socket: the real ASGI app on a real Unix socket
        prepare_runtime(paths)
        sock = bind_socket(paths.socket)
        server = uvicorn.Server(uvicorn.Config(App(service, settings.max_request_bytes),
                                               lifespan="off", log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        service.worker.start()
        with Client(paths.socket) as c:
            assert len(c.concepts()) == concepts
            list_ms = timed(c.concepts, rounds)
            status_ms = timed(c.status, rounds * 4)

        # --- inbox: a complete folder appears (rename), until its job runs
        inbox = Inbox(service, paths.inbox, settle, poll=0.05)
        inbox.start()
        from cones_cli.demo import FIRST, photos_of

        staging = paths.inbox / ".staging"
        staging.mkdir(parents=True)
        for name, data, _caption in photos_of(FIRST, 3, 0):   # photos only, as before
            (staging / name).write_bytes(data)
        (staging / "concept.toml").write_text('class = "star"\nsteps = 1\n[options]\nprior_images = 0\n')
        t0 = time.perf_counter()
        staging.rename(paths.inbox / "dropped")
        job = None
        while time.perf_counter() - t0 < 60:
            job = next((j for j in store.jobs(("running", "done", "failed")) if j.kind == "learn"), None)
            if job is not None:
                break
            time.sleep(0.005)
        inbox_s = time.perf_counter() - t0 if job is not None else float("nan")
        if job is not None:
            service.worker.cancel(job.id)
        inbox.stop()
        server.should_exit = True
        thread.join(10)
        service.worker.stop(timeout=30)
        store.close()
        return {
            "concepts": concepts, "fraction_per_tensor": fraction,
            "kv_params": int(sum(p.numel() for p in kv_weights(pipe.unet).values())),
            "store_bytes": int(store_bytes), "setup_s": round(setup_s, 2),
            "startup_100_concepts_s": round(startup, 3),
            "startup_runs_s": [round(s[0], 3) for s in startups],
            "startup_store_open_s": round(open_s, 3),
            "startup_attach_s": round(attach_s, 3),
            "list_p50_ms": round(statistics.median(list_ms), 2), "list_p99_ms": round(p99(list_ms), 2),
            "status_p50_ms": round(statistics.median(status_ms), 2), "status_p99_ms": round(p99(status_ms), 2),
            "inbox_to_job_s": round(inbox_s, 3), "inbox_settle_s": settle,
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--concepts", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.01, help="share of each K/V tensor per concept")
    parser.add_argument("--settle", type=float, default=0.5, help="inbox settle time (s)")
    parser.add_argument("--rounds", type=int, default=50, help="list requests (status: 4x)")
    parser.add_argument("--repeat", type=int, default=3, help="start-ups measured (median reported)")
    parser.add_argument("--no-learn", action="store_true", help="skip generate_during_learn_wait_s")
    args = parser.parse_args(argv)
    result = run(args.concepts, args.fraction, args.settle, args.rounds, args.repeat)
    if not args.no_learn:
        result.update(generate_during_learn())
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cones service: {args.concepts} CNS concepts at SD 1.5 K/V shapes")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, str(value))
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
