"""The object-weighted loss: masks from the photo's border, loss weights, the weighted denoising
loss, and what a CNS learn reports about them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cns_daemon.api.errors import BadInput
from cns_daemon.methods import LearnSpec, cns, get_method
from cns_daemon.methods import common as C
from cns_daemon.toyworld.world import ObjectSpec, SceneSpec, render
from helpers.methods import FAST, photos


def _pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images → (n, 1 variant, 3, H, W) in [-1, 1], as PhotoSet holds them."""
    x = torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])
    return x[:, None]


def test_the_mask_is_the_object_grown_by_one_pixel():
    a = np.full((32, 32, 3), 200, np.uint8)
    a[10:20, 12:22] = (220, 30, 30)
    masks, found = C.object_masks(_pixels([a]))
    want = np.zeros((32, 32), bool)
    want[9:21, 11:23] = True
    assert found.tolist() == [True]
    assert np.array_equal(masks[0, 0, 0].numpy().astype(bool), want)


def test_a_toy_world_photo_on_textured_grass_is_found():
    obj = ObjectSpec("star", "red", "dots", "orange", "diagonal")
    img = np.asarray(render(SceneSpec((obj,), "grass"), 3))
    masks, found = C.object_masks(_pixels([img]))
    m = masks[0, 0, 0]
    assert bool(found[0]) and 0.1 < float(m.mean()) < 0.6
    assert float(m[14:18, 14:18].mean()) == 1.0          # the middle of the star
    assert float(m[:3, :3].mean()) == 0.0                 # a corner of the lawn


def test_a_busy_or_filled_photo_is_trained_whole():
    busy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    filled = np.full((32, 32, 3), 90, np.uint8)           # no object told from the border
    ok = np.full((32, 32, 3), 200, np.uint8)
    ok[8:24, 8:24] = 0
    masks, found = C.object_masks(_pixels([busy, filled, ok]))
    assert found.tolist() == [False, False, True]
    assert float(masks[0].min()) == 1.0 and float(masks[1].min()) == 1.0


def test_loss_weights_put_the_background_at_its_share_with_mean_one():
    masks = torch.zeros(2, 3, 1, 32, 32)
    masks[..., 8:24, 8:24] = 1
    w = C.loss_weights(masks, 16, 0.1)
    assert w.shape == (2, 3, 1, 16, 16)
    assert torch.allclose(w.mean(dim=(2, 3, 4)), torch.ones(2, 3))
    assert float(w[0, 0, 0, 8, 8] / w[0, 0, 0, 0, 0]) == pytest.approx(10.0)


def test_weighted_denoising_loss(tiny_pipe):
    """Even weights give the unweighted loss; weights of zero on one half leave only the other."""
    schedule = C.noise_schedule(tiny_pipe)
    size = tiny_pipe.unet.config.sample_size
    lat = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0))
    cond = C.encode_text(tiny_pipe, ["a photo of a star"] * 2).detach()
    run = lambda w: C.denoising_losses(tiny_pipe.unet, schedule, lat, cond,  # noqa: E731
                                       torch.Generator().manual_seed(1), w).detach()
    plain = run(None)
    assert torch.allclose(run(torch.ones(2, 1, size, size)), plain)
    left = torch.zeros(2, 1, size, size)
    left[..., : size // 2] = 2.0
    right = 2.0 - left
    assert torch.allclose((run(left) + run(right)) / 2, plain, atol=1e-6)
    assert not torch.allclose(run(left), plain)


def test_cns_learn_reports_masks_and_rejects_bad_options(fresh_tiny_pipe, tmp_path):
    pics = photos(tmp_path / "p")                         # a red block on light grey: found
    busy = tmp_path / "p" / "busy.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(busy)
    spec = LearnSpec("m", "star", steps=1, options={**FAST}, cache_dir=tmp_path / "c")
    rec = get_method("cns").learn(fresh_tiny_pipe, pics + [busy], spec, None, None)
    assert rec.meta.metrics["mask_found"] == pytest.approx(3 / 4)
    assert "in photo 4 of 4" in rec.meta.metrics["note"]
    assert rec.meta.hparams["mask"] == "border" and rec.meta.hparams["mask_background"] == 0.1
    get_method("cns").unlearn(fresh_tiny_pipe, "m")
    for bad in ({"mask": "alpha"}, {"mask_background": 2.0}):
        with pytest.raises(BadInput):
            cns.CNSParams(**bad).validate()


def test_background_teacher_replaces_the_target_only_off_the_object(tiny_pipe):
    """Masks of ones: the plain loss. Masks of zeros with the teacher reading the same captions
    through the same (unchanged) model: every target is the model's own prediction, loss 0."""
    size = tiny_pipe.unet.config.sample_size
    lat = torch.randn(2, 3, 4, size, size, generator=torch.Generator().manual_seed(0))
    caps = ["a photo of a star", "a photo of a red star"]
    plain = C.ConceptLoss(tiny_pipe, lat, caps, seed=3).parts(0).photos
    ones = torch.ones(2, 3, 1, size, size)
    kept = C.ConceptLoss(tiny_pipe, lat, caps, seed=3, background_teacher=(ones, caps)).parts(0)
    assert kept.photos == pytest.approx(plain, rel=1e-6)
    zero = C.ConceptLoss(tiny_pipe, lat, caps, seed=3, background_teacher=(0 * ones, caps)).parts(0)
    assert zero.photos == pytest.approx(0.0, abs=1e-10) and plain > 0.01


def test_the_teacher_reads_the_caption_without_the_token():
    from cns_daemon.methods.data import without_token

    assert without_token("a photo of a sks star on the grass", "sks") == "a photo of a star on the grass"
    assert without_token("sks star, a photo", "sks") == "star, a photo"
    assert without_token("a photo of a sks rcn star", "sks rcn") == "a photo of a star"


def test_cns_holds_the_background_to_the_base_model_only_when_asked_and_scoped(fresh_tiny_pipe, tmp_path):
    base = cns.CNSParams(background="base")
    prep = cns.prepare(fresh_tiny_pipe, photos(tmp_path / "p"),
                       LearnSpec("b", "star", cache_dir=tmp_path / "c"), base, None, None)
    masks, captions = cns.background_teacher(prep, base)
    assert masks.shape[-1] == prep.latents.shape[-1] and prep.token not in " ".join(captions)
    assert cns.background_teacher(prep, cns.CNSParams(background="scenes")) is not None
    for hp in (cns.CNSParams(), cns.CNSParams(background="base", scope="all"),
               cns.CNSParams(background="scenes", scope="all"),
               cns.CNSParams(background="base", mask="none")):
        assert cns.background_teacher(prep, hp) is None
    # the background's weight applies to whichever target it has
    w = cns.photo_weights(prep, base)
    assert w is not None and torch.equal(w, cns.photo_weights(prep, cns.CNSParams()))
    with pytest.raises(BadInput):
        cns.CNSParams(background="sky").validate()
    # where it would change nothing it is refused when asked, not trained as `photo` unsaid
    for hp in (cns.CNSParams(background="base", scope="all"), cns.CNSParams(background="scenes", mask="none")):
        with pytest.raises(BadInput, match="needs scope `concept` and mask `border`"):
            hp.validate()
    cns.CNSParams(background="scenes").validate()


class _Recorder:
    """unet_context that records the prompts of every UNet call (the step's batch first, then
    the teacher's, if it runs, inside it)."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, prompts):
        import contextlib

        self.calls.append(list(prompts))
        return contextlib.nullcontext()


def test_scene_steps_add_a_phrase_and_teach_only_those_rows(tiny_pipe):
    """With scenes, about half of a photo's steps append a scene phrase to its caption; the
    teacher then runs on exactly those rows, with the phrase and without the token; a step
    without scenes runs no teacher and is the plain loss."""
    size = tiny_pipe.unet.config.sample_size
    lat = torch.randn(4, 2, 4, size, size, generator=torch.Generator().manual_seed(1))
    caps = [f"a photo of a sks star {i}" for i in range(4)]
    plain_caps = [c.replace("sks ", "") for c in caps]
    masks = torch.zeros(4, 2, 1, size, size)
    scenes = ("in the snow", "on the sand")
    rec = _Recorder()
    loss = C.ConceptLoss(tiny_pipe, lat, caps, seed=5, background_teacher=(masks, plain_caps),
                         scenes=scenes, unet_context=rec)
    plain = C.ConceptLoss(tiny_pipe, lat, caps, seed=5)
    with_scene, without = 0, 0
    for step in range(12):
        rec.calls.clear()
        got = loss.parts(step).photos
        batch = rec.calls[0]
        scened = [i for i, p in enumerate(batch) if p != caps[i]]
        for i in scened:
            assert any(batch[i] == f"{caps[i]} {s}" for s in scenes)
        with_scene += len(scened)
        without += 4 - len(scened)
        if scened:   # the teacher ran too, on the scene rows only, without the token
            assert rec.calls[1] == [plain_caps[i] + batch[i][len(caps[i]):] for i in scened]
        else:        # no teacher call, the photo's target everywhere: the plain loss
            assert len(rec.calls) == 1 and got == pytest.approx(plain.parts(step).photos, rel=1e-6)
    assert with_scene >= 12 and without >= 12   # about half each of 48 photo-steps
    # without a teacher, scenes are ignored (a background the photo does not show cannot be
    # taught from the photo)
    assert C.ConceptLoss(tiny_pipe, lat, caps, seed=5, scenes=scenes).scenes == ()


def test_model_notes_name_the_scenes(tmp_path):
    import json

    from cns_daemon.api.errors import ModelLoad
    from cns_daemon.model import DEFAULT_SCENES, MODEL_NOTES, _model_notes, load_pipeline, scene_phrases

    (tmp_path / MODEL_NOTES).write_text(json.dumps({"guidance_scale": 5, "scenes": ["on the moon"]}))
    assert _model_notes(tmp_path)["scenes"] == ("on the moon",)
    (tmp_path / MODEL_NOTES).write_text(json.dumps({"guidance_scale": 5}))
    assert _model_notes(tmp_path)["scenes"] == DEFAULT_SCENES
    for bad in ([], [""], "on the moon", [3]):
        (tmp_path / MODEL_NOTES).write_text(json.dumps({"scenes": bad}))
        with pytest.raises(ModelLoad):
            _model_notes(tmp_path)
    from cns_daemon.toyworld.world import BACKGROUND_PHRASE

    # the toy-world fixture names the world's own background phrases
    assert set(scene_phrases(load_pipeline(None, device="cpu", dtype="float32"))) == set(BACKGROUND_PHRASE.values())


def test_model_notes_name_the_generation_steps(tmp_path):
    """The fixture's figures are all measured at 20 denoising steps, and a user's generate on it
    took 30 (the SD default): cones.json names the model's own, as it names its CFG scale."""
    import json

    from cns_daemon.api.errors import ModelLoad
    from cns_daemon.model import DEFAULT_SAMPLE_STEPS, MODEL_NOTES, _model_notes, load_pipeline, recommended_steps

    (tmp_path / MODEL_NOTES).write_text(json.dumps({"guidance_scale": 5, "steps": 25}))
    assert _model_notes(tmp_path)["steps"] == 25
    (tmp_path / MODEL_NOTES).write_text(json.dumps({"guidance_scale": 5}))
    assert _model_notes(tmp_path)["steps"] == DEFAULT_SAMPLE_STEPS == 30
    (tmp_path / MODEL_NOTES).write_text(json.dumps({"steps": 30.0}))
    assert _model_notes(tmp_path)["steps"] == 30
    for bad in (1, 1000, 2.5, "20", True):
        (tmp_path / MODEL_NOTES).write_text(json.dumps({"steps": bad}))
        with pytest.raises(ModelLoad, match="steps"):
            _model_notes(tmp_path)
    assert recommended_steps(load_pipeline(None, device="cpu", dtype="float32")) == 20
