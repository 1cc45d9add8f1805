"""Smoke test of the overhead bench on the scaled-down SD-1.5 architecture: real worker
subprocesses (plain K/V step, CNS, generation), the documented summary keys, sane values."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from bench import overhead
from bench import _overhead_worker as worker
from bench._overhead_worker import Measurement, Task


@pytest.fixture(scope="module")
def small_result():
    cfg = overhead.OverheadConfig(methods=("cns",), small=True, size=64, steps=2, gen_steps=2,
                                  repeats=1, memory_rows=False, cuda=False, timeout_s=300)
    return overhead.run(cfg, log=lambda *_: None)


@pytest.mark.slow   # 25 s: SD-1.5-shaped worker subprocesses (CI runs -m slow)
def test_overhead_smoke(small_result, capsys):
    rows = small_result["rows"]
    assert set(rows) == {"learn/plain", "learn/cns", "generate"}
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        assert r["peak_rss_kb"] >= r["model_rss_kb"] > 0   # measured in the worker itself
    assert len(rows["learn/cns"]["step_s"]) == 2 and len(rows["learn/plain"]["step_s"]) == 2
    s = overhead.summary(small_result)
    for key in ("guidance_ratio", "train_step_ratio_cns", "peak_rss_ratio_cns", "plain_step_s"):
        assert s[key] > 0, key
    assert 0 <= s["apply_remove_ms"] < 10_000
    assert s["cns_delta_bytes"] > 0
    assert 0 < s["fraction_kv_cns"] < 1                  # CNS touches a sparse subset
    for key in ("cones_mask_bytes", "residual_bytes"):   # methods not run: reported as absent
        assert key in s and s[key] is None
    overhead.print_table(small_result)
    assert "learn/cns" in capsys.readouterr().out
    json.dumps(s)  # the --json line must serialise


def test_worker_failure_is_reported_not_fatal():
    import torch

    threads = torch.get_num_threads()
    try:  # in-process: the same code path as the subprocess, without its start-up cost
        m = worker.run(Task("learn", method="nosuch", small=True, size=64, steps=1))
    finally:
        torch.set_num_threads(threads)
    assert isinstance(m, Measurement) and m.error and "nosuch" in m.error
    assert m.peak_rss_kb > 0


def test_cuda_rows_only_when_asked():
    cfg = overhead.OverheadConfig(small=True)
    names = [n for n, _ in overhead.tasks(cfg, cuda=False)]
    assert not any(n.startswith("cuda/") for n in names)
    assert {"learn/plain", "generate", "memory/cns/no-sdpa"} <= set(names)
    gpu = dict(overhead.tasks(cfg, cuda=True))
    assert gpu["cuda/learn-full/cns"].device == "cuda" and gpu["cuda/learn-full/cns"].full_learn


def test_the_plain_row_trains_on_photos_and_class_images_as_the_methods_do(monkeypatch):
    """With CNS's default `scope concept` (no class images) the plain row lost its prior half
    of the batch: its step halved and every ratio to it doubled (Cones read 1.74 x plain)."""
    import torch

    from cns_daemon.methods.common import training

    batches = []
    real = training.ConceptLoss.__init__

    def spy(self, *args, prior_latents=None, **kw):
        batches.append(prior_latents is not None)
        real(self, *args, prior_latents=prior_latents, **kw)

    monkeypatch.setattr(training.ConceptLoss, "__init__", spy)
    threads = torch.get_num_threads()
    try:
        m = worker.run(Task("learn", method="plain", small=True, size=64, steps=2))
    finally:
        torch.set_num_threads(threads)
    assert m.error is None and batches == [True], (m.error, batches)


def test_cones_rows_time_its_value_training_and_keep_the_papers_form_apart():
    """`learn/cones` is Cones as a user gets it (values trained after A2: only those steps are
    timed, and a value per neuron is stored); `learn/cones_paper` is the paper's mask."""
    import torch

    threads = torch.get_num_threads()
    try:
        tuned = worker.run(Task("learn", method="cones", small=True, size=64, steps=2))
        paper = worker.run(Task("learn", method="cones_paper", small=True, size=64, steps=2))
    finally:
        torch.set_num_threads(threads)
    assert tuned.error is None and paper.error is None, (tuned.error, paper.error)
    assert len(tuned.step_s) == 2 and len(paper.step_s) == 2
    # 10 % of K/V with a float16 value each against 1.3 % as positions alone
    assert tuned.fraction_kv > 5 * paper.fraction_kv > 0
    assert tuned.stored_bytes > paper.stored_bytes > 0
    result = {"rows": {"learn/plain": asdict(paper), "learn/cones": asdict(tuned),
                       "learn/cones_paper": asdict(paper),
                       "generate": asdict(Measurement({}, plain_gen_s=1.0, guided_gen_s=1.0))}}
    s = overhead.summary(result)
    assert (s["cones_values_bytes"], s["cones_mask_bytes"]) == (tuned.stored_bytes, paper.stored_bytes)
