"""The machinery all methods share: photos, captions, tokens, sparse writes, loss, prior cache,
options, the step loop and the registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cns_daemon.api.errors import BadInput, BadPhoto, Cancelled, Conflict
from cns_daemon.methods import CancelToken, get_method
from cns_daemon.methods import common as C
from cns_daemon.methods.data import (augment_pool, load_photo, photo_captions, prepare_photos,
                                     resolution)


def write_photo(path: Path, size=40, color=(200, 30, 30), offset=0) -> Path:
    a = np.full((size, size, 3), 240, np.uint8)
    a[4 + offset:size - 6, 6:size - 4] = color
    Image.fromarray(a).save(path)
    return path


# -- photos ---------------------------------------------------------------------------------

def test_bad_photos_are_reported_by_name(tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(BadPhoto, match="notes.png is not an image"):
        load_photo(tmp_path / "notes.png")
    good = write_photo(tmp_path / "good.png", size=64)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadPhoto, match="cut.png"):
        load_photo(tmp_path / "cut.png")
    write_photo(tmp_path / "tiny.png", size=20)
    with pytest.raises(BadPhoto, match=r"tiny.png is too small \(20x20"):
        load_photo(tmp_path / "tiny.png")
    assert load_photo(good).size == (64, 64)


def test_prepare_photos_crops_to_pipeline_resolution(tiny_pipe, tmp_path):
    size = resolution(tiny_pipe)
    assert size == 32
    a = np.zeros((48, 80, 3), np.uint8)
    a[:, :16], a[:, 16:64], a[:, 64:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    img = Image.fromarray(a)
    pool = augment_pool(img, size, 5, seed=3)
    assert pool.shape == (5, 3, size, size)
    assert pool.min() >= -1 and pool.max() <= 1
    assert torch.equal(pool, augment_pool(img, size, 5, seed=3))       # deterministic per seed
    assert not torch.equal(pool[1:], augment_pool(img, size, 5, seed=4)[1:])
    # variant 0 is the plain centre crop: only the green middle square of the wide photo
    inner = pool[0][:, :, 1:-1]
    assert torch.allclose(inner[1], torch.ones_like(inner[1]), atol=0.05)
    assert inner[0].max() < -0.95 and inner[2].max() < -0.95


def test_captions_sidecar_template_and_given(tmp_path):
    a, b = write_photo(tmp_path / "a.png"), write_photo(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a red star on the grass\n")
    caps = photo_captions([a, b], "sks", "star")
    assert caps[0] == "a red sks star on the grass"
    assert "sks star" in caps[1] and caps[1] != caps[0]
    assert photo_captions([a], "sks", "dog", ["my pet in a field"]) == ["sks dog, my pet in a field"]
    # a class of several words is found whole; Cones 2 (no token) still gets its class word
    assert photo_captions([a], "sks", "teddy bear", ["a teddy bear on a bed"]) == ["a sks teddy bear on a bed"]
    assert photo_captions([a], "", "dog", ["my buddy at the park"]) == ["a dog, my buddy at the park"]
    assert photo_captions([a], "", "dog", ["my dog at the park"]) == ["my dog at the park"]
    with pytest.raises(BadInput, match="2 photos"):
        photo_captions([a, b], "sks", "star", ["one"])
    ps = prepare_photos([a, b], 32, "sks", "star", variants=3)
    assert ps.pixels.shape == (2, 3, 3, 32, 32) and ps.captions == caps
    # every photo keeps its template too; a set is "captioned" when some photo has its own
    assert ps.templates[1] == caps[1] and ps.templates[0] != caps[0] and ps.captioned
    assert not prepare_photos([b], 32, "sks", "star", variants=1).captioned


# -- tokens ---------------------------------------------------------------------------------

def test_rare_tokens_are_single_ids_and_distinct(tiny_pipe):
    tok = tiny_pipe.tokenizer
    first = C.allocate_token(tok, [])
    second = C.allocate_token(tok, [first])
    assert first != second
    for word in (first, second):
        assert len(C.token_ids(tok, word)) == 1
        assert word.isalpha() and word.islower()
    assert C.allocate_token(tok, []) == first                            # deterministic
    assert len(C.rare_tokens(tok)) >= 100
    with pytest.raises(Conflict):
        C.allocate_token(tok, [first], requested=first)
    with pytest.raises(BadInput):
        C.allocate_token(tok, [], requested="two words")


def test_embedding_rows_restore_exactly(tiny_pipe):
    enc = tiny_pipe.text_encoder
    before = enc.get_input_embeddings().weight.detach().clone()
    tid = C.token_id(tiny_pipe.tokenizer, "sks")
    saved = C.write_rows(enc, {tid: np.ones(before.shape[1], np.float32)})
    assert torch.equal(enc.get_input_embeddings().weight[tid], torch.ones(before.shape[1]))
    C.restore_rows(saved)
    assert torch.equal(enc.get_input_embeddings().weight, before)


def test_trainable_row_changes_only_its_token(tiny_pipe):
    enc = tiny_pipe.text_encoder
    tid = C.token_id(tiny_pipe.tokenizer, "sks")
    ids = C.tokenize(tiny_pipe, ["a sks star", "a red star"])
    emb = enc.get_input_embeddings()
    with torch.no_grad():
        plain = emb(ids)
    row = C.TrainableRows(enc, tiny_pipe.tokenizer, "sks", init=torch.zeros(plain.shape[-1]))
    with C.only_trainable([enc], [row.param]), row:
        swapped = emb(ids)
        swapped.sum().backward()
        assert row.param.grad is not None and emb.weight.grad is None
    assert emb.weight.requires_grad and row.param.grad is None          # flags restored
    hit = ids == tid
    assert hit.sum() == 1
    assert torch.equal(swapped[hit], torch.zeros(1, plain.shape[-1]))
    assert torch.equal(swapped[~hit], plain[~hit])
    with torch.no_grad():
        assert torch.equal(emb(ids), plain)                             # hook removed on exit


def test_trainable_rows_of_a_multi_word_token(tiny_pipe):
    """A token of several rare words trains one row per word; the record form names each."""
    enc, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    words = C.rare_tokens(tok)[:3]
    token = " ".join(words)
    ids = C.tokenize(tiny_pipe, [f"a {token} star", "a red star"])
    emb = enc.get_input_embeddings()
    with torch.no_grad():
        plain = emb(ids)
    row = C.TrainableRows(enc, tok, token)
    assert row.param.shape == (3, plain.shape[-1])
    with torch.no_grad():
        row.param.copy_(torch.arange(3.0)[:, None].expand(3, plain.shape[-1]))
    with row, torch.no_grad():
        swapped = emb(ids)
    for j, tid in enumerate(C.concept_ids(tok, token)):
        hit = ids == tid
        assert hit.sum() == 1 and torch.all(swapped[hit] == j)
    other = ~sum((ids == t) for t in C.concept_ids(tok, token)).bool()
    assert torch.equal(swapped[other], plain[other])
    rec = row.embeddings()
    assert list(rec) == list(words) and all(rec[w][0] == j for j, w in enumerate(words))
    rows = C.embedding_rows(enc, tok, rec)
    assert sorted(rows) == sorted(C.concept_ids(tok, token))


def test_allocate_token_with_several_vectors(tiny_pipe):
    tok = tiny_pipe.tokenizer
    rare = C.rare_tokens(tok)
    first = C.allocate_token(tok, set(), vectors=3)
    assert first.split() == list(rare[:3])
    # a word of a taken multi-word token is not handed out again
    second = C.allocate_token(tok, {first}, vectors=2)
    assert not set(second.split()) & set(first.split())
    assert C.allocate_token(tok, {first}) == rare[3]
    with pytest.raises(Conflict):
        C.allocate_token(tok, {first}, requested=f"{rare[1]} {rare[5]}", vectors=2)
    with pytest.raises(BadInput):
        C.allocate_token(tok, set(), requested=rare[5], vectors=2)     # one word for two vectors
    assert C.allocate_token(tok, {first}, requested=f"{rare[5]} {rare[6]}", vectors=2) == f"{rare[5]} {rare[6]}"


def test_a_store_out_of_rare_words_says_how_many_there_are(tiny_pipe):
    """From a scale review: a store stops at CLIP's 802 rare words (305 concepts, some of 8
    vectors, reached it), and the refusal said only "Every rare token is taken"."""
    tok = tiny_pipe.tokenizer
    rare = C.rare_tokens(tok)
    assert len(rare) == 802   # CLIP's vocabulary, as real SD's encoders have it
    with pytest.raises(Conflict, match=f"has {len(rare)} rare words, 2 of them free, and the concept needs 3"):
        C.allocate_token(tok, set(rare[2:]), vectors=3)
    assert C.allocate_token(tok, set(rare[2:]), vectors=2) == f"{rare[0]} {rare[1]}"


# -- sparse K/V writes ----------------------------------------------------------------------

def test_write_values_restore_bit_identical(tiny_pipe):
    params = C.kv_weights(tiny_pipe.unet)
    before = {k: v.detach().clone() for k, v in params.items()}
    name = sorted(params)[0]
    idx = np.array([0, 5, 17], np.int64)
    saved = C.write_values(params, {name: (idx, 0.0)})
    assert torch.count_nonzero(params[name].detach().reshape(-1)[idx]) == 0
    changed = (params[name].detach() != before[name]).reshape(-1).nonzero().reshape(-1).numpy()
    assert set(changed) <= set(idx)
    C.restore_values(saved)
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert C.union_indices([{name: idx}, {name: np.array([5, 99])}])[name].tolist() == [0, 5, 17, 99]


def test_trainable_values_train_only_their_positions_and_restore(tiny_pipe):
    """CNS and Cones train selected K/V values through this: the weight's gradient reaches
    only the selected values, writes touch only their positions, restore is exact."""
    params = C.kv_weights(tiny_pipe.unet)
    name = sorted(params)[0]
    weight = params[name]
    before = weight.detach().clone()
    idx = np.array([3, 8, 40], np.int64)
    t = C.TrainableValues.at(weight, idx, start=torch.zeros(3))
    assert torch.equal(t.prev, before.reshape(-1)[idx].float())
    with torch.no_grad():
        t.values += torch.tensor([1.0, 2.0, 3.0])
    t.write()
    flat = weight.detach().reshape(-1)
    assert flat[idx].tolist() == [1.0, 2.0, 3.0]
    assert torch.count_nonzero((weight.detach() != before).reshape(-1)) == 3
    weight.grad = torch.arange(weight.numel(), dtype=weight.dtype).reshape(weight.shape)
    t.take_grad()
    t.take_grad()   # accumulates, as a second loss term's gradient would
    assert t.values.grad.tolist() == [6.0, 16.0, 80.0]
    t.restore()
    weight.grad = None
    assert torch.equal(weight.detach(), before)


# -- options --------------------------------------------------------------------------------

def test_options_typed_and_unknown_keys_rejected():
    from dataclasses import dataclass

    @dataclass
    class HP:
        steps: int = 10
        lr: float = 1e-3
        prior: bool = True

    hp = C.parse_options(HP, {"lr": 1, "prior": False}, steps=3)
    assert (hp.steps, hp.lr, hp.prior) == (3, 1.0, False)
    with pytest.raises(BadInput, match="'lrr'"):
        C.parse_options(HP, {"lrr": 1})
    with pytest.raises(BadInput, match="steps"):
        C.parse_options(HP, {"steps": "many"})


@pytest.mark.parametrize("method,options,needle", [
    ("cns", {"lr": -1}, "'lr' must be > 0"),
    ("cns", {"lr_token": 0}, "'lr_token' must be > 0"),
    ("cns", {"prior_batch": 0}, "'prior_batch' must be ≥ 1"),
    ("cns", {"prior_steps": 0}, "'prior_steps' must be ≥ 2"),
    ("cns", {"lambda_prior": -0.5}, "'lambda_prior' must be ≥ 0"),
    ("cns", {"mask_background": float("nan")}, "finite"),
    ("cones", {"variants": 0}, "'variants' must be ≥ 1"),
    ("cones", {"tau": -1}, "'tau' must be ≥ 0"),
    ("cones", {"prior_images": -2}, "'prior_images' must be ≥ 0"),
    ("cones2", {"lr": float("inf")}, "finite"),
    # counts past what makes sense: a pool of 1,000 variants of each photo, 16 GB at 512 px
    ("cns", {"variants": 1000}, "'variants' must be ≤ 64"),
    ("cones", {"tune_steps": 10**12}, "'tune_steps' must be ≤ 100,000"),
    ("cones2", {"reg_batch": 5000}, "'reg_batch' must be ≤ 1,024"),
    ("cns", {"prior_images": 10**12}, "'prior_images' must be ≤ 1,000"),
    ("cns", {"lr": 10**400}, "'lr' must be a finite number"),   # was an OverflowError: a 500
])
def test_out_of_range_options_are_refused_for_every_method(method, options, needle):
    from cns_daemon.methods import get_method

    with pytest.raises(BadInput, match=needle):
        C.parse_options(get_method(method).Params, options)
    C.parse_options(get_method(method).Params, {"prior_images": 0} if method != "cones2" else {})


# -- loss, prior images, loop ---------------------------------------------------------------

def test_concept_loss_is_deterministic_per_step(tiny_pipe):
    lat = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prior = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = C.ConceptLoss(tiny_pipe, lat, ["a sks star", "a sks star"], prior_latents=prior,
                         prior_prompt="a photo of a star", lambda_prior=0.5, seed=1)
    with torch.no_grad():
        a, b, c = loss.parts(0), loss.parts(0), loss.parts(1)
    assert a.total.item() == b.total.item()
    assert a.total.item() != c.total.item()
    assert a.total.item() == pytest.approx(a.photos + 0.5 * a.prior, rel=1e-5)


class _Prompts:
    """unet_context that records each step's prompts."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        import contextlib

        self.calls.append(list(prompts))
        return contextlib.nullcontext()


def test_captioned_photos_also_train_under_their_template(tiny_pipe):
    """With plain captions, each photo's step uses its own caption or its template, about
    `caption_mix` of the steps the template; the noise and timesteps are those of the loss
    without them, so a step that drew every photo's own caption is that loss exactly."""
    lat = torch.randn(4, 2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    own = [f"a photo of a sks star {bg}" for bg in ("in the snow", "on the sand", "in the sky", "on the grass")]
    plain = ["a photo of a sks star"] * 4
    rec = _Prompts()
    mixed = C.ConceptLoss(tiny_pipe, lat, own, seed=3, plain_captions=plain, unet_context=rec)
    alone = C.ConceptLoss(tiny_pipe, lat, own, seed=3)
    used_plain = 0
    with torch.no_grad():
        for step in range(12):
            rec.calls.clear()
            got = mixed.parts(step).photos
            batch = rec.calls[0]
            assert all(p in (o, "a photo of a sks star") for p, o in zip(batch, own))
            used_plain += sum(p != o for p, o in zip(batch, own))
            if batch == own:
                assert got == pytest.approx(alone.parts(step).photos, rel=1e-6)
    assert 12 <= used_plain <= 36   # about half of 48 photo-steps
    for mix, want in ((0.0, own), (1.0, plain)):
        rec.calls.clear()
        C.ConceptLoss(tiny_pipe, lat, own, seed=3, plain_captions=plain, caption_mix=mix,
                      unet_context=rec).parts(0)
        assert rec.calls[0] == want
    with pytest.raises(ValueError, match="do not combine"):
        C.ConceptLoss(tiny_pipe, lat, own, plain_captions=plain,
                      background_teacher=(torch.ones(4, 2, 1, 16, 16), plain))
    with pytest.raises(ValueError, match="one plain caption per photo"):
        C.ConceptLoss(tiny_pipe, lat, own, plain_captions=plain[:2])


def test_class_images_are_cached_per_class(tiny_pipe, tmp_path):
    events = []
    imgs = C.class_images(tiny_pipe, "star", 2, size=32, steps=2, cache_dir=tmp_path,
                          drawn_by="base-0123", progress=events.append)
    assert imgs.shape == (2, 3, 32, 32)
    assert events[-1].phase == "class-images" and events[-1].step == 2
    files = sorted((tmp_path / "class-images" / "star").rglob("*.png"))
    assert len(files) == 2

    class Exploding:  # a cached set must not run the model again
        def __getattr__(self, name):
            return getattr(tiny_pipe, name)

        def __call__(self, *a, **k):
            raise AssertionError("generated although cached")

    again = C.class_images(Exploding(), "star", 2, size=32, steps=2, cache_dir=tmp_path,
                           drawn_by="base-0123")
    assert torch.equal(imgs, again)
    # Other weights (e.g. the live model with CNS concepts, which Cones draws with) never get
    # the base model's cached pictures: they are drawn again, into a folder of their own.
    with pytest.raises(AssertionError, match="generated although cached"):
        C.class_images(Exploding(), "star", 2, size=32, steps=2, cache_dir=tmp_path, drawn_by="live-4567")
    with pytest.raises(ValueError):
        C.class_images(tiny_pipe, "star", 1, size=32, steps=2, cache_dir=tmp_path, drawn_by="")


def test_cns_and_cones_key_their_class_images_by_the_weights_that_drew_them(tiny_pipe, tmp_path, monkeypatch):
    """CNS draws class images with the base weights, Cones with the live ones: with a CNS
    concept live the two get different cache folders; without one, the same."""
    from cns_daemon.methods import cns, cones
    from cns_daemon.methods.cns.layers import stack_for
    from cns_daemon.model import fingerprint

    from cns_daemon.methods.common import inputs as shared   # where both methods prepare

    seen = []
    monkeypatch.setattr(shared, "class_images", lambda *a, drawn_by, **k: seen.append(drawn_by) or
                        torch.zeros(1, 3, 32, 32))
    monkeypatch.setattr(shared, "encode_pixels", lambda pipe, px: torch.zeros(len(px), 4, 16, 16))
    stack = stack_for(tiny_pipe)
    assert fingerprint(tiny_pipe) == stack.base_fingerprint   # nothing live yet
    with torch.no_grad():
        w = next(iter(stack.params.values()))
        original = w.view(-1)[0].clone()
        w.view(-1)[0] += 1.0                                    # as a live CNS concept would
    try:
        live = fingerprint(tiny_pipe)
        from cns_daemon.methods.base import LearnSpec
        photos = [tmp_path / f"{i}.png" for i in range(2)]
        from PIL import Image
        for p in photos:
            Image.new("RGB", (32, 32), (200, 10, 10)).save(p)
        spec = LearnSpec("x", "star", steps=1, cache_dir=tmp_path)
        cns.prepare(tiny_pipe, photos, spec, cns.CNSParams(prior_images=1, variants=1, scope="all"),
                    None, None)
        cones.prepare(tiny_pipe, photos, "tok", spec, cones.ConesParams(prior_images=1, variants=1),
                      progress=None, cancel=None)
    finally:
        with torch.no_grad():   # put the value back exactly (x + 1 - 1 need not be x)
            w.view(-1)[0] = original
    assert seen == [stack.base_fingerprint, live] and live != stack.base_fingerprint


def test_run_steps_reports_progress_and_cancels():
    events = []
    losses = C.run_steps(3, lambda k: 1.0 / (k + 1), events.append, CancelToken())
    assert losses == [1.0, 0.5, 1.0 / 3]
    assert [e.step for e in events] == [0, 1, 2, 3]
    assert events[-1].total == 3 and events[-1].loss == pytest.approx(1 / 3)
    assert events[1].eta_s is not None and events[1].eta_s >= 0
    token, seen = CancelToken(), []

    def step(k):
        seen.append(k)
        if k == 1:
            token.cancel()
        return 0.0

    with pytest.raises(Cancelled):
        C.run_steps(5, step, None, token)
    assert seen == [0, 1]


def test_get_method_unknown_is_bad_input():
    with pytest.raises(BadInput, match="Unknown method"):
        get_method("dreambooth")


def test_class_images_take_two_steps_at_least():
    """prior_steps = 1 drew class images of pure noise (one step of SD's schedule denoises
    nothing) and trained against them."""
    from cns_daemon.api.errors import BadInput
    from cns_daemon.methods.cns import CNSParams
    from cns_daemon.methods.cones import ConesParams

    for params in (CNSParams, ConesParams):
        with pytest.raises(BadInput, match="prior_steps"):
            C.parse_options(params, {"prior_steps": 1})
        assert C.parse_options(params, {"prior_steps": 2}).prior_steps == 2


def test_options_that_change_nothing_under_the_others_are_said():
    """A review's find: `--option lambda_prior=0.3` with CNS's default scope, or `tau=3` with
    Cones's default sparsity, was taken without a word and shown as "learned with"."""
    from cns_daemon.methods import get_method
    from cns_daemon.methods.common.options import inert_note

    def note(method, options):
        return inert_note(C.parse_options(get_method(method).Params, options), options)

    said = note("cns", {"lambda_prior": 0.3, "probe_steps": 7, "lr": 1e-2})
    assert said.startswith("options that changed nothing: ") and "lr " not in said
    assert "lambda_prior (scope `concept`" in said and "probe_steps (selection `eq3`)" in said
    assert note("cns", {"lambda_prior": 0.3, "scope": "all"}) is None
    assert note("cns", {"base_top_p": 20, "selection": "movement"}) == (
        "options that changed nothing: base_top_p (selection `movement`)")
    assert "tau (sparsity is not 0" in note("cones", {"tau": 3.0})
    assert note("cones", {"tau": 3.0, "sparsity": 0}) is None
    assert "tune_steps (values `shut`" in note("cones", {"values": "shut", "tune_steps": 5})
    assert note("cones2", {"lr": 1e-3}) is None
    # options a zero elsewhere leaves unread (a review's find: they were taken without a word)
    assert "prior_images (lambda_prior 0" in note("cns", {"scope": "all", "lambda_prior": 0, "prior_images": 4})
    assert note("cns", {"scope": "all", "lambda_prior": 0.5, "prior_images": 4}) is None
    assert "prior_batch (lambda_prior 0" in note("cones", {"lambda_prior": 0, "prior_batch": 4})
    assert note("cones", {"lambda_prior": 0.5, "prior_batch": 4}) is None
    assert "reg_batch (lambda_reg 0" in note("cones2", {"lambda_reg": 0, "reg_batch": 4})
    assert note("cones2", {"lambda_reg": 0.5, "reg_batch": 4}) is None
