"""The generation routine: determinism, exact restore of everything it applies, cancel, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cns_daemon.api.errors import BadInput, Cancelled, Internal, NotFound
from cns_daemon.generate import generate
from cns_daemon.guidance import GuidanceConfig, LayoutAttnProcessor
from cns_daemon.methods import get_method
from cns_daemon.methods.base import CancelToken
from cns_daemon.model import kv_weights
from cones_store.records import ConceptMeta, ConceptRecord, SparseDelta

WIDTH = 64
STEPS = 4


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _available(method: str) -> bool:
    try:
        get_method(method)
        return True
    except Internal:
        return False


def _snapshot(pipe):
    return {"unet": {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()},
            "text": {k: v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()},
            "procs": dict(pipe.unet.attn_processors)}


def _assert_same(pipe, snap):
    for part, module in (("unet", pipe.unet), ("text", pipe.text_encoder)):
        now = module.state_dict()
        assert now.keys() == snap[part].keys()
        bad = [k for k in now if not torch.equal(now[k], snap[part][k])]
        assert not bad, f"{part} changed: {bad[:3]}"
    procs = pipe.unet.attn_processors
    assert procs.keys() == snap["procs"].keys()
    assert all(procs[k] is snap["procs"][k] for k in procs)


def _records(pipe) -> dict[str, ConceptRecord]:
    """One hand-made record per available method (values chosen to visibly change things)."""
    rng = np.random.default_rng(0)
    name, param = sorted(kv_weights(pipe.unet).items())[0]
    idx = np.arange(0, param.numel(), 7, dtype=np.int64)
    recs = {"pot": ConceptRecord(ConceptMeta("pot", "cones2", "teapot", ""),
                                 residual=rng.normal(0, 2, WIDTH).astype(np.float32))}
    if _available("cns"):
        recs["rex"] = ConceptRecord(
            ConceptMeta("rex", "cns", "dog", "sks"),
            deltas={name: SparseDelta(idx, rng.normal(0, 1, len(idx)).astype(np.float32),
                                      tuple(param.shape))},
            embeddings={"sks": rng.normal(0, 1, WIDTH).astype(np.float32)})
    if _available("cones"):
        recs["mug"] = ConceptRecord(ConceptMeta("mug", "cones", "mug", "ohwx"),
                                    masks={name: idx[1::2]})
    return recs


def _arrays(images):
    return [np.asarray(i) for i in images]


def test_deterministic_and_image_i_does_not_depend_on_n(tiny_pipe):
    a = _arrays(generate(tiny_pipe, "a photo of a dog", {}, n=2, seed=5, steps=STEPS))
    b = _arrays(generate(tiny_pipe, "a photo of a dog", {}, n=1, seed=6, steps=STEPS))
    c = _arrays(generate(tiny_pipe, "a photo of a dog", {}, n=2, seed=5, steps=STEPS))
    assert all(np.array_equal(x, y) for x, y in zip(a, c))
    # Same noise; only batch-size-dependent float rounding may differ.
    assert np.abs(a[1].astype(int) - b[0].astype(int)).max() <= 1
    assert not np.array_equal(a[0], a[1])


def test_everything_applied_is_taken_off_again(tiny_pipe):
    recs = _records(tiny_pipe)
    names = list(recs)
    prompt = "a photo of " + " and ".join(f"<{n}>" for n in names)
    boxes = [f"{n}={i / len(names)},0,{(i + 1) / len(names)},1" for i, n in enumerate(names)]
    snap = _snapshot(tiny_pipe)
    seen = {}

    def spy(event):
        if event.step == 1:   # inside the request: the concepts and the guidance are on
            seen["procs"] = [type(p) for k, p in tiny_pipe.unet.attn_processors.items()
                             if ".attn2." in k]
            seen["unet_changed"] = any(not torch.equal(v, snap["unet"][k])
                                       for k, v in tiny_pipe.unet.state_dict().items())
            seen["text_changed"] = any(not torch.equal(v, snap["text"][k])
                                       for k, v in tiny_pipe.text_encoder.state_dict().items())

    images = generate(tiny_pipe, prompt, recs, boxes, n=2, seed=1, steps=2, progress=spy,
                      apply_resident=True)
    assert len(images) == 2
    _assert_same(tiny_pipe, snap)
    assert seen["procs"] and all(t is LayoutAttnProcessor for t in seen["procs"])
    assert seen["unet_changed"] == ("rex" in recs or "mug" in recs)
    assert seen["text_changed"] == ("rex" in recs)
    # The residual reached the images, and nothing of it stayed behind.
    plain = _arrays(generate(tiny_pipe, "a photo of a teapot", {}, seed=1, steps=STEPS))[0]
    with_pot = _arrays(generate(tiny_pipe, "a photo of a <pot>", recs, seed=1, steps=STEPS))[0]
    again = _arrays(generate(tiny_pipe, "a photo of a teapot", {}, seed=1, steps=STEPS))[0]
    assert not np.array_equal(plain, with_pot) and np.array_equal(plain, again)


def test_cancel_stops_at_the_next_step_and_restores(tiny_pipe):
    recs = _records(tiny_pipe)
    snap = _snapshot(tiny_pipe)
    token = CancelToken()
    steps_seen = []

    def progress(event):
        steps_seen.append(event.step)
        if event.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        generate(tiny_pipe, "<pot> on the grass", recs, ["pot=0,0,0.5,0.5"], steps=10,
                 progress=progress, cancel=token, apply_resident=True)
    assert max(steps_seen) == 2
    _assert_same(tiny_pipe, snap)
    with pytest.raises(Cancelled):   # already cancelled: nothing runs
        generate(tiny_pipe, "a dog", {}, steps=2, cancel=token)


def test_a_cancel_is_told_even_when_taking_a_concept_off_fails(fresh_tiny_pipe, monkeypatch, caplog):
    """A review's find: a removal failing while a cancel unwound the request raised the
    removal's error in place of the cancel. The cancel is told; the removal's error is logged;
    without a cancel, the removal's error is the request's."""
    import logging

    recs = _records(fresh_tiny_pipe)
    cones = get_method("cones")
    real = cones.remove

    def broken(handle):
        real(handle)
        raise RuntimeError("could not take it off")

    monkeypatch.setattr(cones, "remove", broken)
    token = CancelToken()

    def progress(event):
        if event.step == 1:
            token.cancel()

    with caplog.at_level(logging.ERROR, logger="cns_daemon.generate"), pytest.raises(Cancelled):
        generate(fresh_tiny_pipe, "a photo of <mug>", recs, steps=4, progress=progress, cancel=token)
    assert "could not take it off" in caplog.text
    with pytest.raises(RuntimeError, match="could not take it off"):
        generate(fresh_tiny_pipe, "a photo of <mug>", recs, steps=2)


def test_bad_requests_fail_before_anything_is_applied(tiny_pipe):
    recs = _records(tiny_pipe)
    snap = _snapshot(tiny_pipe)
    with pytest.raises(NotFound, match="<ghost>"):
        generate(tiny_pipe, "<pot> and <ghost>", recs)
    with pytest.raises(BadInput, match="not in the prompt"):
        generate(tiny_pipe, "<pot> alone", recs, ["rex=0,0,1,1"])
    with pytest.raises(BadInput, match="not in the prompt") as err:   # a box for a word of it
        generate(tiny_pipe, "<pot> on the grass", recs, ["grass=0,0,1,1"])
    assert "plain word of the prompt" in err.value.hint
    with pytest.raises(BadInput, match="x0,y0,x1,y1"):
        generate(tiny_pipe, "<pot> alone", recs, ["pot=0,0,1"])
    with pytest.raises(BadInput, match="multiple of 8"):
        generate(tiny_pipe, "a dog", {}, height=36)   # the VAE divides it, the pipeline does not
    with pytest.raises(BadInput, match="between 2 and 999"):
        generate(tiny_pipe, "a dog", {}, steps=1000)  # DDIM's offset would index timestep 1000
    with pytest.raises(BadInput, match="its one step denoises nothing"):   # a picture of noise
        generate(tiny_pipe, "a dog", {}, steps=1)
    with pytest.raises(BadInput):
        generate(tiny_pipe, "a dog", {}, n=0)
    # "<rex>" in the negative prompt is refused, not passed to the encoder as raw text
    with pytest.raises(BadInput, match="negative prompt"):
        generate(tiny_pipe, "<pot> alone", recs, negative_prompt="blurry, <rex>")
    with pytest.raises(BadInput, match="The negative prompt is .* tokens long"):
        generate(tiny_pipe, "<pot> alone", recs, negative_prompt="blurry " * 80)
    with pytest.raises(BadInput, match="blank"):
        generate(tiny_pipe, "<pot> alone", recs, negative_prompt="   ")
    with pytest.raises(BadInput, match="guidance scale of 1: it would change nothing") as info:
        generate(tiny_pipe, "<pot> alone", recs, negative_prompt="blurry", guidance_scale=1.0)
    assert "above 1" in info.value.hint
    _assert_same(tiny_pipe, snap)


def test_guidance_moves_the_image_and_weight_zero_is_plain(tiny_pipe):
    recs = _records(tiny_pipe)
    args = dict(n=1, seed=2, steps=STEPS)
    plain = _arrays(generate(tiny_pipe, "<pot> on the sand", recs, **args))[0].astype(int)
    guided = _arrays(generate(tiny_pipe, "<pot> on the sand", recs, ["pot=0,0,0.5,0.5"],
                              guidance=GuidanceConfig(weight=0.5), **args))[0].astype(int)
    zero = _arrays(generate(tiny_pipe, "<pot> on the sand", recs, ["pot=0,0,0.5,0.5"],
                            guidance=GuidanceConfig(weight=0.0), **args))[0].astype(int)
    assert np.abs(guided - plain).max() > 2
    assert np.abs(zero - plain).max() <= 1   # same math through SDPA with a zero mask


def test_non_square_guided_generation(tiny_pipe):
    recs = _records(tiny_pipe)
    images = generate(tiny_pipe, "<pot> on the sand", recs, ["pot=0.5,0,1,0.5"], steps=2,
                      height=32, width=48, guidance=GuidanceConfig(weight=0.5))
    assert images[0].size == (48, 32)


def test_image_sides_are_bounded_both_ways_around_the_models_own():
    """SD 1.5's shape (64 latent cells × 8): sides from 128 to 2,048 px, multiples of 8."""
    from types import SimpleNamespace

    from cns_daemon.generate import image_size

    sd15 = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)), vae_scale_factor=8)
    assert image_size(sd15, None, None) == (512, 512)
    assert image_size(sd15, 128, 2048) == (128, 2048)
    for h, w, words in ((120, 512, "under 128 px a side"), (512, 64, "under 128 px a side"),
                        (2056, 512, "over 2048 px a side"), (500, 512, "multiple of 8")):
        with pytest.raises(BadInput, match=words) as info:
            image_size(sd15, h, w)
        assert "8" in info.value.hint
