"""One overhead measurement in a fresh process (so its peak RSS is its own):

    python -m bench._overhead_worker '<Task as JSON>'   → prints one JSON line (a Measurement)

kinds:
- "learn": build the model, learn one concept with `method` (or "plain": a plain diffusers-style
  K/V fine-tune with the same loss and batch) for `steps` steps under the memory options; report
  per-step seconds (from the progress events), apply+remove milliseconds, stored bytes, the
  fraction of K/V weights touched, and the process's peak RSS.
- "generate": plain vs layout-guided generation time (best of `repeats`) and peak RSS.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Task:
    kind: str                       # "learn" | "generate"
    method: str = "plain"           # learn: plain | cns | cones | cones_paper | cones2 | naive | ti
    small: bool = False             # the scaled-down architecture (tests)
    size: int = 256                 # image pixels
    steps: int = 3                  # learn: 1 warm-up + timed steps; None-like 0 = method default
    photos: int = 1
    memory: dict = field(default_factory=dict)   # MemoryOptions fields
    device: str = "cpu"
    threads: int = 1
    gen_steps: int = 3
    repeats: int = 2
    full_learn: bool = False        # learn with the method's default steps and options (CUDA)


@dataclass
class Measurement:
    task: dict
    step_s: list[float] = field(default_factory=list)
    learn_s: float | None = None
    apply_remove_ms: float | None = None
    stored_bytes: int | None = None
    residual_raw_bytes: int | None = None
    fraction_kv: float | None = None
    plain_gen_s: float | None = None
    guided_gen_s: float | None = None
    peak_rss_kb: int = 0
    model_rss_kb: int = 0           # RSS right after the model was built
    cuda_peak_bytes: int | None = None
    error: str | None = None


CONES_PAPER = {"values": "shut", "scope": "all", "sparsity": 1.3}   # also in a full learn
# Small step budgets: the bench measures per-step cost, not quality.
FAST_OPTIONS = {
    "cns": {"prior_images": 1, "prior_batch": 1, "prior_steps": 2, "variants": 1, "probe_steps": 1},
    "naive": {"prior_images": 1, "prior_batch": 1, "prior_steps": 2, "variants": 1},
    "ti": {"prior_images": 1, "prior_batch": 1, "prior_steps": 2, "variants": 1},
    "plain": {"prior_images": 1, "prior_batch": 1, "prior_steps": 2, "variants": 1},
    # Cones as a user gets it: A2 picks the neurons, then their values train (`tune_steps` is
    # set to the task's steps); only the value-training steps are timed.
    "cones": {"prior_images": 1, "prior_batch": 1, "prior_steps": 2, "variants": 1},
    # Cones in the paper's binary form (a mask alone), the form its 1.43 MB per subject is of
    "cones_paper": {"prior_images": 1, "prior_batch": 1, "prior_steps": 2, "variants": 1,
                    **CONES_PAPER},
    "cones2": {"variants": 1},
}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _model(task: Task):
    from bench._sd15 import SD15, SMALL, build

    pipe = build(SMALL if task.small else SD15, task.size)
    if task.device != "cpu":
        from cns_daemon.model import choose_placement

        place = choose_placement(task.device)
        pipe = pipe.to(place.device, place.dtype)
    return pipe


def _photos(n: int, folder: Path, size: int) -> list[Path]:
    from cns_daemon.toyworld.world import ObjectSpec, render_concept_photos

    out = []
    for i, (img, _) in enumerate(render_concept_photos(ObjectSpec("star", "red", "stripes", "blue"),
                                                       n, seed=1)):
        path = folder / f"p{i}.png"
        img.resize((size, size)).save(path)
        out.append(path)
    return out


def _method(name: str):
    if name == "cones_paper":
        name = "cones"
    if name in ("naive", "ti"):
        from bench.baselines import get_baseline

        return get_baseline(name)
    from cns_daemon.methods import get_method

    return get_method(name)


class _StepClock:
    """Progress callback: wall time between consecutive training-step events. CNS's probe
    fine-tune (selection, every K/V weight) counts as setup: it is in learn_s, not step_s."""

    SETUP = ("prepare", "class-images", "select", "probe")

    def __init__(self, setup: tuple[str, ...] = SETUP):
        self.setup = setup
        self.last: float | None = None
        self.times: list[float] = []

    def __call__(self, event) -> None:
        if event.phase in self.setup:
            return
        now = time.perf_counter()
        if event.step > 0 and self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def _plain_learn(pipe, photos: list[Path], spec, progress) -> None:
    """A plain K/V fine-tune: the same photos, prior images and loss as the methods, Adam on
    every K/V weight (fp32 masters of a half model's), text encoded once (no token training),
    nothing else. The memory options act on the loop, as for the methods. Its prior term is
    CNS's `scope all` one: with the default `scope concept` CNS draws no class images (its
    values act only where its token is), and this row had lost half its batch with it (its step
    halved, and every ratio to it doubled)."""
    from bench.baselines import MasterAdam
    from cns_daemon.memory import loop_context
    from cns_daemon.methods.cns import prepare
    from cns_daemon.methods import common as C
    from cns_daemon.methods.cns import CNSParams

    hp = C.parse_options(CNSParams, {**spec.options, "scope": "all"}, spec.steps)
    prep = prepare(pipe, photos, spec, hp, None, None)
    loss = C.ConceptLoss(pipe, prep.latents, prep.photos.captions, prior_latents=prep.prior,
                         prior_prompt=C.prior_prompt(spec.class_word), lambda_prior=hp.lambda_prior,
                         prior_batch=hp.prior_batch, seed=spec.seed)
    weights = list(C.kv_weights(pipe.unet).values())
    before = [w.detach().clone() for w in weights]
    opt = MasterAdam([{"params": weights, "lr": hp.lr}])

    def step(k: int) -> float:
        opt.zero_grad()
        total = loss(k)
        total.backward()
        opt.step()
        return float(total.detach())

    try:
        with C.only_trainable(C.pipeline_modules(pipe), weights):
            C.run_steps(hp.steps, step, progress, None,
                        around=lambda: loop_context(pipe, spec.memory, text_encoder_needed=False))
    finally:
        with torch.no_grad():
            for w, b in zip(weights, before):
                w.copy_(b)


def _best_ms(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def learn(task: Task, out: Measurement) -> None:
    from cns_daemon.memory import MemoryOptions, set_attention
    from cns_daemon.methods.base import LearnSpec
    from cns_daemon.methods.common import kv_total
    from cns_daemon.model import fingerprint
    from cones_store.store import ConceptStore

    pipe = _model(task)
    out.model_rss_kb = _status_kb("VmRSS")
    opts = MemoryOptions(**task.memory)
    set_attention(pipe.unet, opts.sdpa)
    with tempfile.TemporaryDirectory(prefix="cones-overhead-") as tmp:
        photos = _photos(task.photos, Path(tmp), task.size)
        options = dict(FAST_OPTIONS[task.method])
        if task.full_learn:   # the method's defaults (Cones's paper row keeps its form)
            options = dict(CONES_PAPER) if task.method == "cones_paper" else {}
        clock = _StepClock()
        if task.method == "cones" and not task.full_learn:
            # A2's steps ("train", 3 by default) choose the neurons; the learn's time is in
            # the value training that follows (900 steps by default): that is the step timed.
            options["tune_steps"] = task.steps
            clock = _StepClock(_StepClock.SETUP + ("train",))
        # The memory options act on the training loop only, as in the service: wrapped around
        # the whole learn, offload parked the VAE before the photos were encoded and the class
        # images drawn (on CUDA a device mismatch; elsewhere CPU time counted as the learn's).
        spec = LearnSpec("bench", "star", steps=None if task.full_learn else task.steps,
                         options=options, cache_dir=Path(tmp) / "cache", memory=opts)
        t0 = time.perf_counter()
        if task.method == "plain":
            _plain_learn(pipe, photos, spec, clock)
            record = None
        else:
            record = _method(task.method).learn(pipe, photos, spec, clock, None)
        out.learn_s = time.perf_counter() - t0
        out.step_s = clock.times
        if record is None:
            return
        if record.meta.method == "cns":  # CNS-shaped records stay live after learning
            from cns_daemon.methods.cns import METHOD as CNS

            CNS.unlearn(pipe, record.name)
        method = _method(task.method)
        out.apply_remove_ms = _best_ms(lambda: method.remove(method.apply(pipe, [record])))
        with ConceptStore.open(Path(tmp) / "store", fingerprint=fingerprint(pipe)) as store:
            store.put(record)
            out.stored_bytes = store.size_of(record.name)
        if record.residual is not None:
            out.residual_raw_bytes = int(record.residual.nbytes)
        touched = record.meta.hparams.get("neurons", 0) if record.meta.method != "cones2" else 0
        out.fraction_kv = touched / kv_total(pipe.unet)


def generate(task: Task, out: Measurement) -> None:
    import numpy as np

    from cns_daemon.generate import guidance_overhead
    from cns_daemon.memory import MemoryOptions, prepare_generation
    from cones_store.records import ConceptMeta, ConceptRecord

    pipe = _model(task)
    out.model_rss_kb = _status_kb("VmRSS")
    prepare_generation(pipe, MemoryOptions(**task.memory))
    # Two concepts for the boxes; zero Cones 2 residuals leave the images those of the plain
    # prompt, so the comparison is guidance alone.
    width = pipe.text_encoder.config.hidden_size
    records = {n: ConceptRecord(ConceptMeta(n, "cones2", cls, ""), residual=np.zeros(width, np.float32))
               for n, cls in (("a", "star"), ("b", "ring"))}
    oh = guidance_overhead(pipe, "a photo of <a> and <b>", records, ["a=0,0,0.5,1", "b=0.5,0,1,1"],
                           steps=task.gen_steps, repeats=task.repeats)
    out.plain_gen_s, out.guided_gen_s = oh.plain_s, oh.guided_s


def run(task: Task) -> Measurement:
    torch.set_num_threads(task.threads)
    out = Measurement(asdict(task))
    if task.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        (learn if task.kind == "learn" else generate)(task, out)
    except Exception as exc:  # reported in the table; the other rows still count
        out.error = f"{type(exc).__name__}: {exc}"
    out.peak_rss_kb = _status_kb("VmHWM")
    if task.device == "cuda":
        out.cuda_peak_bytes = int(torch.cuda.max_memory_allocated())
    return out


if __name__ == "__main__":
    result = run(Task(**json.loads(sys.argv[1])))
    print("MEASUREMENT " + json.dumps(asdict(result)))
