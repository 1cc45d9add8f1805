"""CNS on the tiny model: selection maths, training touches only the selected neurons and the
token row, regularisation, cancel, exact apply/remove (including the older-concept rule)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cns_daemon.api.errors import Cancelled
from cns_daemon.methods import CancelToken, LearnSpec, cns, get_method
from cns_daemon.methods import common as C
from cns_daemon.methods.cns.layers import stack_for
from cones_store import ConceptStore
from helpers.methods import FAST, MOVEMENT, changed, fixed_selection, photos, snapshot, synthetic

EMB = "text.embeddings.token_embedding.weight"


# -- selection maths --------------------------------------------------------------------------

def test_row_top_is_eq3_top_p_per_row():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2], [1.0, 0.1, -0.1, 0.3]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])
    got = cns.row_top(w, norms, 50.0)            # top 2 of 4 per row
    score = np.abs(w.numpy()) * norms.numpy()
    want = np.zeros_like(score, bool)
    for i, row in enumerate(score):
        want[i, np.argsort(-row)[:2]] = True
    assert np.array_equal(got.numpy(), want)
    assert got.sum(dim=1).tolist() == [2, 2]


def test_select_and_or():
    w = {"t": torch.tensor([[3.0, 2.0, 1.0]])}
    norms = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 10.0]])   # prompt 2 favours column 2
    assert cns.select(w, norms, 33.0, "and")["t"].tolist() == [[False, False, False]]
    assert cns.select(w, norms, 33.0, "or")["t"].tolist() == [[True, False, True]]


def test_concept_neurons_are_base_and_not_general(tiny_pipe):
    """Strictly: no general neuron is ever a concept neuron, however few remain."""
    stack = stack_for(tiny_pipe)
    caps = ["a photo of a sks star", "a picture of a sks star"]
    general = cns.general_neurons(tiny_pipe, stack, 20.0)
    counts = cns.general_counts(tiny_pipe, stack, 20.0)
    assert cns.general_counts(tiny_pipe, stack, 20.0) is counts       # cached per model
    from cns_daemon.methods.cns import selection

    for top_p in (21.0, 22.0, 23.0):   # one per top_p a person tried stayed for the service's life
        cns.general_counts(tiny_pipe, stack, top_p)
    assert len(selection._GENERAL) == selection._GENERAL_KEPT
    base = cns.select(stack.params, cns.column_norms(tiny_pipe, caps), 20.0, "and")
    plain = cns.concept_neurons(tiny_pipe, stack, caps, 20.0)
    for name in stack.params:
        want = C.mask_indices(base[name] & ~general[name])
        assert np.array_equal(plain.indices.get(name, np.empty(0, np.int64)), want)
    assert plain.base == sum(int(b.sum()) for b in base.values())
    assert plain.base_general == sum(int((base[n] & general[n]).sum()) for n in base)
    assert cns.general_share(tiny_pipe, stack, plain.indices, 20.0) == 0.0
    # a wider base percentile than the general one: base at 60 %, general still at 20 %
    wide = cns.concept_neurons(tiny_pipe, stack, caps, 20.0, base_top_p=60.0)
    base60 = cns.select(stack.params, cns.column_norms(tiny_pipe, caps), 60.0, "and")
    assert C.count(wide.indices) > C.count(plain.indices)
    for name in stack.params:
        want = C.mask_indices(base60[name] & ~general[name])
        assert np.array_equal(wide.indices.get(name, np.empty(0, np.int64)), want)
        assert not general[name].reshape(-1)[torch.as_tensor(want)].any()
    # the share of general neurons in a set that has some is what it says
    every = {n: np.arange(w.numel()) for n, w in stack.params.items()}
    assert cns.general_share(tiny_pipe, stack, every, 20.0) == pytest.approx(
        sum(int(g.sum()) for g in general.values()) / C.kv_total(tiny_pipe.unet))


def test_learn_reports_how_few_concept_neurons_remain(fresh_tiny_pipe, tmp_path):
    """On the random tiny model the general neurons cover almost every base neuron: the
    concept is learned with what remains (never a general neuron), and its metrics say so."""
    spec = LearnSpec("few", "star", steps=2, options={**FAST, "top_p": 20.0, "base_top_p": 20.0},
                     cache_dir=tmp_path / "c")
    rec = get_method("cns").learn(fresh_tiny_pipe, photos(tmp_path / "p"), spec, None, None)
    m = rec.meta.metrics
    assert m["general_share"] == 0.0
    assert m["kv_share"] == pytest.approx(rec.meta.hparams["neurons"] / C.kv_total(fresh_tiny_pipe.unet))
    assert m["kv_share"] * 100 < 0.1 and "concept neurons" in m["note"] and "base_top_p" in m["note"]
    assert rec.meta.hparams["base_general_neurons"] > 0
    get_method("cns").unlearn(fresh_tiny_pipe, "few")


def test_the_note_names_a_photo_trained_whole(fresh_tiny_pipe, tmp_path):
    """The service trains on archived copies: the note names the photo as the person gave it."""
    from PIL import Image

    paths = photos(tmp_path / "p", n=2)
    busy = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(busy).save(tmp_path / "p" / "busy.png")   # no object told from its border
    paths.insert(1, tmp_path / "p" / "busy.png")
    spec = LearnSpec("named", "star", steps=1, options=FAST, cache_dir=tmp_path / "c",
                     photo_names=["IMG_1.jpg", "IMG_2.jpg", "IMG_3.jpg"])
    rec = get_method("cns").learn(fresh_tiny_pipe, paths, spec, None, None)
    assert "in photo 2 (IMG_2.jpg) of 3" in rec.meta.metrics["note"]
    get_method("cns").unlearn(fresh_tiny_pipe, "named")


# -- learning ---------------------------------------------------------------------------------

def test_learn_changes_only_selected_neurons_and_token_row(fresh_tiny_pipe, tmp_path, monkeypatch):
    """Scope `all` (the paper's CNS): the trained values are written into the weights."""
    pipe = fresh_tiny_pipe
    monkeypatch.setattr(cns, "choose_neurons", fixed_selection(0.03, seed=1))
    before = snapshot(pipe)
    events = []
    spec = LearnSpec("rex", "star", steps=4, options={**FAST, "lr": 1e-2, "delta_dtype": "float16",
                                                      "scope": "all"},
                     cache_dir=tmp_path / "cache")
    rec = get_method("cns").learn(pipe, photos(tmp_path / "p"), spec, events.append, None)

    kv = C.kv_weights(pipe.unet)
    assert set(changed(pipe, before)) == {f"unet.{n}" for n in rec.deltas} | {EMB}
    for name, delta in rec.deltas.items():
        now = kv[name].detach().reshape(-1)
        diff = (now != before[f"unet.{name}"].reshape(-1)).nonzero().reshape(-1).numpy()
        assert set(diff) <= set(delta.indices) and len(diff) > 0
        assert delta.values.dtype == np.float16
        assert torch.equal(now[torch.as_tensor(delta.indices)], torch.as_tensor(delta.values).float())
    tid = C.token_id(pipe.tokenizer, rec.meta.token)
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    rows = (emb != before[EMB]).any(dim=1).nonzero().reshape(-1).tolist()
    assert rows == [tid]
    assert torch.equal(emb[tid], torch.as_tensor(rec.embeddings[rec.meta.token]))
    assert rec.meta.hparams["fraction_kv"] == pytest.approx(C.count(
        {n: d.indices for n, d in rec.deltas.items()}) / C.kv_total(pipe.unet))
    train = [e for e in events if e.phase == "train"]
    assert [e.step for e in train] == [0, 1, 2, 3, 4] and train[-1].loss > 0
    assert all(not p.requires_grad or p.grad is None for p in pipe.unet.parameters())

    get_method("cns").unlearn(pipe, "rex")
    assert changed(pipe, before) == []


@pytest.mark.parametrize("vectors", [1, 2])
def test_a_concept_of_several_token_vectors_trains_a_row_each(fresh_tiny_pipe, tmp_path, monkeypatch, vectors):
    """`vectors=N`: N rare words name the concept; learning trains those N rows (and nothing
    else of the encoder), the record stores each, prompts expand to all the words, and the
    record read back from the store draws the same picture as the live concept."""
    from cns_daemon.generate import generate
    from cns_daemon.prompts import expand

    pipe = fresh_tiny_pipe
    monkeypatch.setattr(cns, "choose_neurons", fixed_selection(0.03, seed=1))
    before = snapshot(pipe)
    spec = LearnSpec("rex", "star", steps=3, options={**FAST, "vectors": vectors},
                     cache_dir=tmp_path / "cache")
    rec = get_method("cns").learn(pipe, photos(tmp_path / "p"), spec, None, None)
    words = rec.meta.token.split()
    assert len(words) == vectors and sorted(rec.embeddings) == sorted(words)
    ids = C.concept_ids(pipe.tokenizer, rec.meta.token)
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert sorted((emb != before[EMB]).any(dim=1).nonzero().reshape(-1).tolist()) == sorted(ids)
    for w, i in zip(words, ids):
        assert torch.equal(emb[i], torch.as_tensor(rec.embeddings[w]))
    assert expand("a photo of <rex>", {"rex": rec.meta}, pipe.tokenizer).text == \
        f"a photo of a {rec.meta.token} star"
    live = generate(pipe, "a photo of <rex>", {"rex": rec}, n=1, seed=0, steps=2, output_type="np")[0]
    # kept and read back by the store, taken off and applied again: the same picture
    with ConceptStore.open(tmp_path / "store") as store:
        store.put(rec)
        back = store.get("rex")
    assert sorted(back.embeddings) == sorted(words)
    get_method("cns").unlearn(pipe, "rex")
    assert changed(pipe, before) == []
    again = generate(pipe, "a photo of <rex>", {"rex": back}, n=1, seed=0, steps=2, output_type="np",
                     apply_resident=True)[0]
    assert np.array_equal(live, again)
    assert changed(pipe, before) == []      # applied for that request only
    # the next concept gets words of its own
    nxt = cns.prepare(pipe, photos(tmp_path / "q"), LearnSpec("max", "star"),
                      cns.CNSParams(vectors=2), None, None, previous=[rec])
    assert not set(nxt.token.split()) & set(words)


@pytest.mark.parametrize("selection, phase", [("eq3", "train"), ("movement", "probe"),
                                              ("movement", "train")])
def test_cancel_leaves_pipeline_bit_identical(fresh_tiny_pipe, tmp_path, selection, phase):
    pipe = fresh_tiny_pipe          # real selection here (movement: the probe, then training)
    before = snapshot(pipe)
    token = CancelToken()

    def progress(e):
        if e.phase == phase and e.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        get_method("cns").learn(pipe, photos(tmp_path / "p"), LearnSpec(
            "rex", "star", steps=6, options={**MOVEMENT, "selection": selection, "lr": 1e-2}),
            progress, token)
    assert changed(pipe, before) == []
    assert get_method("cns").applied(pipe) == []


def test_movement_base_pools_the_largest_moves_over_tensors():
    before = {"a": torch.zeros(2, 3), "b": torch.zeros(1, 4)}
    after = {"a": torch.tensor([[0.1, -5.0, 0.0], [0.2, 0.0, 3.0]]),
             "b": torch.tensor([[0.0, -4.0, 0.3, 0.0]])}
    got = cns.movement_base(before, after, 30.0)          # 30 % of 10 weights: the 3 largest |moves|
    assert got["a"].tolist() == [[False, True, False], [False, False, True]]
    assert got["b"].tolist() == [[False, True, False, False]]


def test_movement_selection_probes_all_kv_then_undoes_it(fresh_tiny_pipe, tmp_path):
    """The probe fine-tunes every K/V weight and leaves the pipeline bit-identical; the concept
    neurons are at most `movement_percent` % of K/V, none of them general, and the same again
    for the same seed."""
    pipe, stack = fresh_tiny_pipe, stack_for(fresh_tiny_pipe)
    before = snapshot(pipe)
    spec = LearnSpec("rex", "star", options={**MOVEMENT, "probe_steps": 4}, cache_dir=tmp_path)
    hp = C.parse_options(cns.CNSParams, spec.options, None)
    prep = cns.prepare(pipe, photos(tmp_path / "p"), spec, hp, None, None)
    events = []
    chosen = cns.choose_neurons(pipe, stack, prep, spec, hp, events.append, None)
    assert changed(pipe, before) == []
    assert [e.step for e in events if e.phase == "probe"] == [0, 1, 2, 3, 4]
    total = C.kv_total(pipe.unet)
    general = cns.general_neurons(pipe, stack, hp.top_p)
    assert 0 < C.count(chosen.indices) <= math.ceil(0.05 * total)
    for name, idx in chosen.indices.items():
        assert not general[name].reshape(-1)[torch.as_tensor(idx)].any()
    again = cns.choose_neurons(pipe, stack, prep, spec, hp, None, None)   # seeded: repeatable
    assert {n: i.tolist() for n, i in again.indices.items()} == \
        {n: i.tolist() for n, i in chosen.indices.items()}


def test_regularisation_reduces_drift_on_shared_neurons(fresh_tiny_pipe, tmp_path, monkeypatch):
    pipe = fresh_tiny_pipe
    method = get_method("cns")
    pics = photos(tmp_path / "p")
    monkeypatch.setattr(cns, "choose_neurons", fixed_selection(0.05, seed=1))
    first = method.learn(pipe, pics, LearnSpec("a", "star", steps=3,
                                              options={**FAST, "lr": 1e-2, "scope": "all"},
                                              cache_dir=tmp_path), None, None)
    a_values = {n: C.read_values(C.kv_weights(pipe.unet)[n], d.indices) for n, d in first.deltas.items()}
    monkeypatch.setattr(cns, "choose_neurons", fixed_selection(0.05, seed=2))

    def drift(lambda_prev: float) -> tuple[float, int]:
        rec = method.learn(pipe, photos(tmp_path / "q", (30, 30, 200)), LearnSpec(
            "b", "star", steps=6, options={**FAST, "lr": 1e-2, "lambda_prev": lambda_prev,
                                           "lambda_base": 0.0, "scope": "all"},
            cache_dir=tmp_path), None, None)
        total, shared = 0.0, 0
        for n, d in rec.deltas.items():
            if n in first.deltas:
                _, mine, theirs = np.intersect1d(d.indices, first.deltas[n].indices,
                                                 return_indices=True)
                total += float(((torch.as_tensor(d.values[mine]) - a_values[n][theirs]) ** 2).sum())
                shared += len(mine)
        with ConceptStore.open(tmp_path / "store") as store:   # the store owns the overlap count
            if "a" not in store:
                store.put(first)
            assert store.intersect({n: d.indices for n, d in rec.deltas.items()}) == {"a": shared}
        method.unlearn(pipe, "b")
        return total, shared

    free, shared = drift(0.0)
    held, _ = drift(1000.0)
    assert shared > 0
    assert held < 0.25 * free


# -- apply / remove -------------------------------------------------------------------------

def test_apply_remove_bit_identical(fresh_tiny_pipe):
    pipe, method = fresh_tiny_pipe, get_method("cns")
    before = snapshot(pipe)
    a, b = synthetic(pipe, "a", "sks", 1), synthetic(pipe, "b", "pbc", 2)
    handle = method.apply(pipe, [a, b])
    assert method.applied(pipe) == ["a", "b"] and changed(pipe, before)
    assert method.apply(pipe, [a]).names == []            # already live: not applied twice
    method.remove(handle)
    assert changed(pipe, before) == [] and method.applied(pipe) == []


def test_removing_an_older_concept(fresh_tiny_pipe):
    pipe, method = fresh_tiny_pipe, get_method("cns")
    kv = C.kv_weights(pipe.unet)
    before = snapshot(pipe)
    a, b = synthetic(pipe, "a", "sks", 1), synthetic(pipe, "b", "pbc", 2)
    method.apply(pipe, [a])
    method.apply(pipe, [b])
    with_b = snapshot(pipe)
    method.unlearn(pipe, "a")
    for n, da in a.deltas.items():
        live = kv[n].detach().reshape(-1)
        base = before[f"unet.{n}"].reshape(-1)
        shared = np.isin(da.indices, b.deltas[n].indices)
        own = torch.as_tensor(da.indices[~shared])
        assert torch.equal(live[own], base[own])                            # exact
        mine = torch.as_tensor(da.indices[shared])
        assert torch.equal(live[mine], with_b[f"unet.{n}"].reshape(-1)[mine])  # b keeps them
        assert shared.any()
    tid_a = C.token_id(pipe.tokenizer, "sks")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid_a], before[EMB][tid_a])
    method.unlearn(pipe, "b")
    assert changed(pipe, before) == []


def test_half_precision_weights_train_through_fp32_master_copies(tmp_path, monkeypatch):
    """On a bf16 model (as on a GPU with autocast), the trained neurons live as fp32 masters: the
    stored values carry digits bf16 cannot hold, and the live weights are those masters rounded."""
    from cns_daemon.model import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0).to(torch.bfloat16)
    monkeypatch.setattr(cns, "choose_neurons", fixed_selection(0.03, seed=1))
    spec = LearnSpec("rex", "star", steps=3, options={**FAST, "lr": 1e-4, "delta_dtype": "float32",
                                                      "scope": "all"},
                     cache_dir=tmp_path / "cache")
    rec = get_method("cns").learn(pipe, photos(tmp_path / "p"), spec, None, None)
    kv = C.kv_weights(pipe.unet)
    unrepresentable = 0
    for name, delta in rec.deltas.items():
        master = torch.as_tensor(delta.values)
        assert master.dtype == torch.float32 and kv[name].dtype == torch.bfloat16
        unrepresentable += int((master.to(torch.bfloat16).float() != master).sum())
        assert torch.equal(kv[name].detach().reshape(-1)[torch.as_tensor(delta.indices)],
                           master.to(torch.bfloat16))
    assert unrepresentable > 0.5 * C.count({n: d.indices for n, d in rec.deltas.items()})
    assert rec.embeddings[rec.meta.token].dtype == np.float32


def test_captioned_photos_mix_in_their_templates_only_where_it_applies():
    """CNS trains captioned photos under their templates too (`caption_mix`), with the photo
    target only: the base-model teacher's captions follow the photos' own."""
    from types import SimpleNamespace

    from cns_daemon.api.errors import BadInput
    from cns_daemon.methods.data import PhotoSet

    templates = ["a photo of a sks star"]
    own = SimpleNamespace(photos=PhotoSet([], ["a photo of a sks star in the snow"],
                                          torch.zeros(1, 1, 3, 8, 8), templates))
    bare = SimpleNamespace(photos=PhotoSet([], templates, torch.zeros(1, 1, 3, 8, 8), templates))
    assert cns.plain_captions(own, cns.CNSParams()) == templates
    assert cns.plain_captions(bare, cns.CNSParams()) is None
    assert cns.plain_captions(own, cns.CNSParams(background="base")) is None
    assert cns.plain_captions(own, cns.CNSParams(caption_mix=0)) is None
    with pytest.raises(BadInput, match="caption_mix"):
        cns.CNSParams(caption_mix=1.5).validate()
    # given where it changes nothing (background base or scenes: no template captions mixed),
    # it is refused, not trained without a word
    from cns_daemon.methods.common.options import parse_options
    assert parse_options(cns.CNSParams, {"background": "base"}).caption_mix == 0.5
    assert cns.plain_captions(own, parse_options(cns.CNSParams, {"background": "base"})) is None
    with pytest.raises(BadInput, match="caption_mix applies with background `photo` only"):
        parse_options(cns.CNSParams, {"background": "scenes", "caption_mix": 0.3})
