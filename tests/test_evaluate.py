"""CLIP-I / CLIP-T on a tiny randomly initialised CLIP built from a config (no download)."""
import numpy as np
import pytest
import torch
from PIL import Image

from cns_daemon.api.errors import BadInput, ModelLoad, Unavailable
from cns_daemon.evaluate import (HFClipScorer, OpenClipScorer, default_prompts, evaluate, fill,
                                 load_prompts, load_scorer, preprocess, strip_concepts)
from cns_daemon.tokenizer import clip_tokenizer
from helpers.clip import tiny_clip_model


@pytest.fixture(scope="module")
def scorer():
    return HFClipScorer(tiny_clip_model(), clip_tokenizer())


def _img(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_preprocess_is_resize_crop_normalise():
    im = Image.new("RGB", (64, 32), (255, 0, 0))
    x = preprocess([im], 32)
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(x[0, 0], torch.full((32, 32), (1 - 0.48145466) / 0.26862954))


def test_metrics_match_an_independent_computation(scorer):
    photos = {"rex": [_img(1), _img(2), _img(3)], "mug": [_img(4), _img(5)]}
    generated = {}

    def generate(prompt, n):
        ims = [_img(100 + len(generated) * 10 + i) for i in range(n)]
        generated[prompt] = ims
        return ims

    prompts = ["a photo of {} on the beach", "a watercolor painting of {}"]
    res = evaluate(generate, photos, {"rex": "dog", "mug": "cup"}, prompts, 2, scorer)

    # Independent: raw model features, normalised with numpy, cosine by hand.
    def feats(images):
        with torch.no_grad():
            f = scorer.model.get_image_features(pixel_values=preprocess(images, 32))
        f = getattr(f, "pooler_output", f).numpy()
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    def tfeat(text):
        ids = clip_tokenizer()([text], return_tensors="pt")
        with torch.no_grad():
            f = scorer.model.get_text_features(input_ids=ids.input_ids)
        f = getattr(f, "pooler_output", f).numpy()[0]
        return f / np.linalg.norm(f)

    ci, ct = [], []
    for template in prompts:
        prompt = fill(template, ["rex", "mug"])
        g = feats(generated[prompt])
        per = [np.mean([g[a] @ r for a in range(len(g)) for r in feats(photos[c])]) for c in photos]
        ci.append(np.mean(per))
        ct.append(np.mean(g @ tfeat(prompt.replace("<rex>", "dog").replace("<mug>", "cup"))))
    assert res.clip_i == pytest.approx(np.mean(ci), abs=1e-5)
    assert res.clip_t == pytest.approx(np.mean(ct), abs=1e-5)
    assert res.n_images == 4 and len(res.prompts) == 2
    assert set(res.prompts[0].per_concept_clip_i) == {"rex", "mug"}
    assert res.prompts[0].prompt == "a photo of <rex> and <mug> on the beach"


def test_identical_images_score_one(scorer):
    ims = [_img(7)]
    res = evaluate(lambda p, n: ims * n, {"rex": ims}, {"rex": "dog"}, ["{}"], 3, scorer)
    assert res.clip_i == pytest.approx(1.0, abs=1e-5)


def test_strip_concepts_and_prompts():
    assert strip_concepts("a photo of <rex> and <mug> on sand", {"rex": "dog", "mug": "cup"}) \
        == "a photo of dog and cup on sand"
    with pytest.raises(BadInput, match="<cat>"):
        strip_concepts("a <cat>", {"rex": "dog"})
    prompts = default_prompts()
    assert len(prompts) >= 20 and all("{}" in p for p in prompts)
    assert any("painting" in p for p in prompts) and any("beach" in p for p in prompts)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(BadInput, match="No prompt file"):
        load_prompts(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(BadInput, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.txt").write_text("a photo of {}\n{} in snow\n")
    assert load_prompts(tmp_path / "p.txt") == ["a photo of {}", "{} in snow"]


def test_missing_clip_is_a_clear_error_not_a_download(tmp_path, scorer):
    # Either open_clip is absent/unimportable here (Unavailable naming the extra), or it is
    # present and a missing weights file is a ModelLoad naming the path — never a hub call.
    with pytest.raises((Unavailable, BadInput)) as info:   # a file named that is not there: exit 2
        OpenClipScorer("ViT-B-32", str(tmp_path / "missing.pt"))
    assert "cones[eval]" in info.value.hint or "missing.pt" in info.value.message
    with pytest.raises(BadInput, match="No CLIP weights at"):
        load_scorer(weights=str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()   # not "open_clip could not be imported"
    with pytest.raises(BadInput, match="a folder without a config.json"):
        load_scorer(weights=str(tmp_path / "empty"))
    with pytest.raises(ModelLoad, match="No CLIP model"):
        HFClipScorer.from_folder(tmp_path)
    # A saved transformers folder is picked up by load_scorer.
    scorer.model.save_pretrained(tmp_path / "clip")
    scorer.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = load_scorer(weights=str(tmp_path / "clip"))
    ims = [_img(3)]
    assert torch.allclose(loaded.embed_images(ims), scorer.embed_images(ims), atol=1e-6)
    # a folder of another model (here: only CLIP's text half), or with no weights, is refused
    # rather than scored with weights made up on loading
    from transformers import CLIPTextModel

    CLIPTextModel(scorer.model.config.text_config).save_pretrained(tmp_path / "text")
    scorer.tokenizer.save_pretrained(tmp_path / "text")
    with pytest.raises(ModelLoad, match="not a whole CLIP model"):
        HFClipScorer.from_folder(tmp_path / "text")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(ModelLoad, match="is not a CLIP model folder"):
        HFClipScorer.from_folder(tmp_path / "noweights")


def test_the_scorer_runs_on_the_device_it_is_given(tmp_path, scorer):
    """A GPU host scored CLIP on the CPU (minutes for ViT-L); the scorer now goes where the
    generating model is, and hands its embeddings back on the CPU. (No GPU here: the move is
    recorded, and the CPU path gives the same numbers.)"""
    model, moved = tiny_clip_model(), []
    real_to = model.to
    model.to = lambda device: moved.append(device) or real_to(device)
    here = HFClipScorer(model, clip_tokenizer(), device=torch.device("cpu"))
    assert moved == [torch.device("cpu")]
    ims = [_img(5)]
    got = here.embed_images(ims)
    assert got.device.type == "cpu" and torch.allclose(got, HFClipScorer(tiny_clip_model(), clip_tokenizer()).embed_images(ims), atol=1e-6)
    assert here.embed_texts(["a photo of a dog"]).device.type == "cpu"
    scorer.model.save_pretrained(tmp_path / "clip")
    scorer.tokenizer.save_pretrained(tmp_path / "clip")
    assert next(load_scorer(weights=str(tmp_path / "clip"), device="cpu").model.parameters()).device.type == "cpu"
