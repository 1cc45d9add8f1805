"""A generate job between two training steps of a learn job: it sees the model without the
concept being learned (its images equal those of a generate before the learn, bit for bit),
and the learn goes on exactly as if it had not paused (the same record, bit for bit). For all
three methods on the tiny pipeline, then on a real daemon process (`cones serve --model tiny`)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from cns_daemon.generate import generate
from cns_daemon.methods import get_method
from cns_daemon.methods.base import CancelToken, LearnSpec
from cns_daemon.model import kv_weights
from helpers.service import cli_in_process, running_daemon, wait_until, write_photos

FAST = {"cns": {"prior_images": 2, "prior_steps": 2, "prior_batch": 1, "variants": 2},
        "cones": {"prior_images": 2, "prior_steps": 2, "prior_batch": 1, "variants": 2, "tune_steps": 6},
        "cones2": {"variants": 2, "reg_batch": 2}}
PROMPT = "a photo of a dog on the grass"


@pytest.fixture(autouse=True)
def _one_thread():
    """Other modules leave torch at 2 threads; on a shared 2-core machine the tiny model's small
    ops then spend most of their time waiting for each other (70 s instead of 2 s here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in kv_weights(pipe.unet).items()}
    out["token_embedding"] = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def record_arrays(record) -> dict[str, np.ndarray]:
    out = {f"mask/{k}": v for k, v in record.masks.items()}
    out.update({f"delta/{k}/i": d.indices for k, d in record.deltas.items()})
    out.update({f"delta/{k}/v": d.values for k, d in record.deltas.items()})
    out.update({f"emb/{k}": v for k, v in record.embeddings.items()})
    if record.residual is not None:
        out["residual"] = record.residual
    return out


@pytest.mark.parametrize("method_name, phase", [("cns", "train"), ("cones", "train"),
                                                ("cones", "tune"), ("cones2", "train")])
def test_generate_between_steps_sees_the_model_without_the_concept(fresh_tiny_pipe, tmp_path,
                                                                   method_name, phase):
    """Cones pauses in A2's walk (train) and while its neurons' values are trained (tune)."""
    pipe = fresh_tiny_pipe
    method = get_method(method_name)
    photos = write_photos(tmp_path / "photos", 2)
    spec = LearnSpec("rex", "dog", steps=6, options=FAST[method_name], cache_dir=tmp_path / "cache")
    before = snapshot(pipe)
    baseline = generate(pipe, PROMPT, {}, n=1, seed=5, steps=3, output_type="np")[0]

    reference = method.learn(pipe, photos, spec, None, CancelToken())
    if method_name == "cns":   # CNS leaves what it learned live (fusion-free): take it off
        method.unlearn(pipe, "rex")
    assert same(snapshot(pipe), before)

    seen = {}
    token: CancelToken

    def interleaved():   # what the worker runs inside the pause: a generate job
        seen["model"] = snapshot(pipe)
        seen["image"] = generate(pipe, PROMPT, {}, n=1, seed=5, steps=3, output_type="np")[0]

    def progress(ev):
        if ev.phase == phase:
            seen.setdefault("steps", []).append(ev.step)
            if ev.step == 3:   # a generate arrives while step 3 runs
                token.request_pause()

    token = CancelToken(interleave=interleaved)
    record = method.learn(pipe, photos, spec, progress, token)
    assert "image" in seen, "the learn never paused"
    assert seen["steps"][-1] == 6
    assert np.array_equal(seen["image"], baseline)    # the model without the concept in training
    assert same(seen["model"], before)
    got, want = record_arrays(record), record_arrays(reference)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    if method_name == "cns":
        method.unlearn(pipe, "rex")
    assert same(snapshot(pipe), before)


@pytest.mark.parametrize("method_name, phase", [("cns", "train"), ("cones", "tune")])
def test_a_generate_in_the_pause_draws_a_written_cones_concept(fresh_tiny_pipe, tmp_path,
                                                              method_name, phase):
    """A review's find: a scoped learn (CNS; Cones's value training) left the scope's training
    open through the pause, which took (weight − the learn's starting copy) out of every row, so
    a Cones concept of scope `all`, written into the weights for the generate, was drawn as if
    absent. The paused generate's image is the one before the learn."""
    from cones_store.records import ConceptMeta, ConceptRecord

    pipe = fresh_tiny_pipe
    g = torch.Generator().manual_seed(0)
    masks = {n: np.sort(torch.randperm(p.numel(), generator=g)[: p.numel() * 3 // 10].numpy())
             for n, p in kv_weights(pipe.unet).items()}
    shut = ConceptRecord(ConceptMeta("mug", "cones", "cup", "ohwx", hparams={"scope": "all"}), masks=masks)
    prompt = "a photo of <mug> on the grass"
    want = generate(pipe, prompt, {"mug": shut}, n=1, seed=5, steps=3, output_type="np")[0]
    assert not np.array_equal(want, generate(pipe, "a photo of a ohwx cup on the grass", {}, n=1,
                                             seed=5, steps=3, output_type="np")[0])
    seen = {}
    token: CancelToken

    def interleaved():
        seen["image"] = generate(pipe, prompt, {"mug": shut}, n=1, seed=5, steps=3, output_type="np")[0]

    def progress(ev):
        if ev.phase == phase and ev.step == 2:
            token.request_pause()

    token = CancelToken(interleave=interleaved)
    spec = LearnSpec("rex", "dog", steps=4, options=FAST[method_name], cache_dir=tmp_path / "cache")
    get_method(method_name).learn(pipe, write_photos(tmp_path / "photos", 2), spec, progress, token)
    assert np.array_equal(seen["image"], want)


@pytest.mark.slow   # ~15 s: the same on the worker is in the default suite (test_service, FakeEngine)
def test_generate_during_a_learn_on_the_daemon_waits_about_one_step(tmp_path, monkeypatch):
    from cones_cli.client import Client
    from cns_daemon.api.protocol import AddRequest, GenerateRequest, Photo

    with running_daemon(fake=False, args=("--model", "tiny"), timeout=180) as d:
        cones = cli_in_process(d.home, monkeypatch)
        photos = [Photo(filename=p.name, data=p.read_bytes()) for p in write_photos(tmp_path / "p", 2)]
        with Client(d.socket) as c:
            quiet = c.generate(GenerateRequest(prompt=PROMPT, steps=4, seed=1))
            wait_until(lambda: c.job(quiet.id).state == "done", timeout=60, what="generate alone")
            alone = c.job(quiet.id)
            learn = c.add(AddRequest(name="slow", class_word="dog", steps=100_000, photos=photos,
                                     options={"prior_images": 0}))

            def train_step():
                p = c.job(learn.id).progress
                return p.step if p and p.phase == "train" else 0

            wait_until(lambda: train_step() >= 3, timeout=120, what="learn training")
            t0 = time.monotonic()
            job = c.generate(GenerateRequest(prompt=PROMPT, steps=4, seed=1))
            wait_until(lambda: c.job(job.id).state == "done", timeout=60, what="generate during learn")
            waited = time.monotonic() - t0
            step_at = train_step()
            wait_until(lambda: train_step() > step_at, timeout=60, what="learn resumed")
            assert c.job(learn.id).state == "running"
            done = c.job(job.id)
            code, out, err = cones("cancel", learn.id)
            assert code == 0, out + err
            wait_until(lambda: c.job(learn.id).state == "cancelled", timeout=60, what="learn cancelled")
        # a training step of the tiny model is a fraction of a second; the generate did not wait
        # for the learn's 100,000 steps, only for one step boundary and its own run
        gen_s = alone.finished - alone.started
        assert waited < 10 + 3 * gen_s, (waited, gen_s)
        assert learn.id not in json.dumps(done.model_dump())   # its own result, not the learn's
        from PIL import Image

        a = np.asarray(Image.open(alone.result.images[0]))
        b = np.asarray(Image.open(done.result.images[0]))
        assert np.array_equal(a, b)   # the same request gives the same image during the learn


def test_a_generate_waits_for_one_batch_of_class_images_not_all_of_them(tiny_pipe, tmp_path):
    """A learn drawing 48 class images kept a generate waiting 20-30 s: it now runs between two
    batches, with the live model back (outside the weights that draw them)."""
    import contextlib

    from cns_daemon.methods.common.prior import class_images

    drawing_now = []
    drawn = []   # batches drawn so far
    seen = []    # (inside the drawing weights?, batches drawn) when the generate ran

    @contextlib.contextmanager
    def drawing():
        drawing_now.append(True)
        try:
            yield
        finally:
            drawing_now.pop()
            drawn.append(True)
            if len(drawn) == 1:   # a generate arrives while the first batch is drawn
                token.request_pause()

    token = CancelToken(interleave=lambda: seen.append((bool(drawing_now), len(drawn))))
    images = class_images(tiny_pipe, "dog", 3, size=32, drawn_by="base-A", steps=2, batch=2,
                          cancel=token, drawing=drawing)
    assert images.shape == (3, 3, 32, 32) and len(drawn) == 2
    assert seen == [(False, 1)]   # once, between the two batches, outside the drawing weights
