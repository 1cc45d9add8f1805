"""Cones on the tiny model: A2 agrees with the explicit Algorithm 1, selection by τ or target
sparsity, learning leaves the model untouched, shutting is exact and per request, union, joint
fine-tune stays inside the union; trained values start shut and act only where the concept is
named (scope concept), or are written for the request (scope all)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cns_daemon.api.errors import BadInput
from cns_daemon.methods import LearnSpec, cones, get_method
from cns_daemon.methods import common as C
from cones_store import ConceptStore
from cones_store.records import SparseDelta
from helpers.methods import CONES, FAST, changed, photos, snapshot

SHUT = {**FAST, "sparsity": 2.0, "values": "shut", "scope": "all"}   # the paper's binary form


def synthetic_loss(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 2, 4, 16, 16, generator=g)
    prior = torch.randn(2, 4, 16, 16, generator=g)
    return C.ConceptLoss(pipe, latents, ["a photo of a sks star"] * 2, prior_latents=prior,
                         prior_prompt="a photo of a star", lambda_prior=1.0, prior_batch=1, seed=seed)


def flat(scores):
    return torch.cat([scores[n].reshape(-1) for n in sorted(scores)])


def test_a2_matches_algorithm1(fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    before = snapshot(pipe)
    loss = synthetic_loss(pipe)
    a2 = cones.a2_scores(pipe, loss, 3, rho=2.0)
    assert changed(pipe, before) == []                   # the walk put every weight back
    alg1 = cones.algorithm1_scores(pipe, loss, 3, rho=2.0)
    assert changed(pipe, before) == []
    fa, fb = flat(a2), flat(alg1)
    assert fb.abs().max() > 0
    assert ((fa - fb).norm() / fb.norm()).item() < 0.02
    ma, _ = cones.select_neurons(a2, sparsity=1.3)
    mb, _ = cones.select_neurons(alg1, sparsity=1.3)
    inter = sum(len(np.intersect1d(ma[n], mb.get(n, []))) for n in ma)
    assert inter / (C.count(ma) + C.count(mb) - inter) > 0.9
    # the first step alone is θ ⊙ ∇L(θ) in both (up to float32 rounding of 1 − ρ·s in ξ)
    one = cones.a2_scores(pipe, loss, 1, rho=2.0)
    assert torch.allclose(flat(one), flat(cones.algorithm1_scores(pipe, loss, 1, rho=2.0)),
                          rtol=1e-3, atol=1e-7)


def test_select_by_sparsity_and_tau():
    scores = {"a": torch.tensor([[5.0, -1.0], [0.5, 2.0]]), "b": torch.tensor([3.0, 0.0, -2.0, 1.0])}
    masks, tau = cones.select_neurons(scores, sparsity=25.0)      # 2 of 8
    assert {n: m.tolist() for n, m in masks.items()} == {"a": [0], "b": [0]} and tau == 3.0
    masks, _ = cones.select_neurons(scores, tau=0.75)
    assert {n: m.tolist() for n, m in masks.items()} == {"a": [0, 3], "b": [0, 3]}
    masks, _ = cones.select_neurons(scores, sparsity=100.0)       # never a non-positive score
    assert {n: m.tolist() for n, m in masks.items()} == {"a": [0, 2, 3], "b": [0, 3]}


def test_learn_apply_remove(fresh_tiny_pipe, tmp_path):
    pipe, method = fresh_tiny_pipe, get_method("cones")
    before = snapshot(pipe)
    events = []
    a = method.learn(pipe, photos(tmp_path / "a"), LearnSpec(
        "a", "star", steps=3, options=SHUT, cache_dir=tmp_path), events.append, None)
    assert changed(pipe, before) == []                   # learning leaves the model as it was
    assert a.meta.token and not a.embeddings and not a.deltas
    total = C.kv_total(pipe.unet)
    assert C.count(a.masks) == pytest.approx(0.02 * total, abs=2)
    assert a.meta.hparams["fraction_kv"] == C.count(a.masks) / total
    assert [e.step for e in events if e.phase == "train"] == [0, 1, 2, 3]
    b = method.learn(pipe, photos(tmp_path / "b", (30, 30, 200)), LearnSpec(
        "b", "star", steps=2, seed=1, options=SHUT, cache_dir=tmp_path),
        None, None, previous=[a])
    assert b.meta.token != a.meta.token
    union = C.union_indices([a.masks, b.masks])
    with ConceptStore.open(tmp_path / "store") as store:   # the store owns the overlap count
        store.put(a)
        assert store.put(b).shared_with.get("a", 0) == C.count(a.masks) + C.count(b.masks) - C.count(union)

    kv = C.kv_weights(pipe.unet)
    handle = method.apply(pipe, [a, b])
    for n, p in kv.items():
        flat_now = p.detach().reshape(-1)
        shut = union.get(n, np.empty(0, np.int64))
        assert torch.count_nonzero(flat_now[torch.as_tensor(shut)]) == 0
        others = np.setdiff1d(np.arange(p.numel()), shut)
        assert torch.equal(flat_now[torch.as_tensor(others)],
                           before[f"unet.{n}"].reshape(-1)[torch.as_tensor(others)])
    method.remove(handle)
    assert changed(pipe, before) == []

    refined = cones.joint_finetune(pipe, [(a, photos(tmp_path / "a")), (b, photos(tmp_path / "b"))],
                                   steps=2, cache_dir=tmp_path)
    assert changed(pipe, before) == []
    assert refined and all(np.isin(idx, union[n]).all() for n, idx in refined.items())
    tuned = dataclasses.replace(a, masks={}, deltas={
        n: SparseDelta(i, np.ones(len(i), np.float16), tuple(kv[n].shape)) for n, i in a.masks.items()})
    with pytest.raises(BadInput, match="holds trained values"):   # its answer would drop them
        cones.joint_finetune(pipe, [(tuned, photos(tmp_path / "a"))], steps=1, cache_dir=tmp_path)


def _kv_out(pipe, scope, tname, ids):
    """What one K/V projection gives for a fixed input, inside the scope's prompt for `ids`."""
    module = scope.modules[tname]
    x = torch.randn(1, ids.shape[1], module.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), scope.prompt(ids):
        return module(x), x


def test_tuned_values_start_shut_and_act_only_where_named(fresh_tiny_pipe, tmp_path):
    pipe, method = fresh_tiny_pipe, get_method("cones")
    before = snapshot(pipe)
    events = []
    rec = method.learn(pipe, photos(tmp_path / "a"), LearnSpec(
        "a", "star", steps=2, options={**CONES, "tune_steps": 3, "lr": 1e-2}, cache_dir=tmp_path),
        events.append, None)
    assert changed(pipe, before) == []
    assert not rec.masks and rec.deltas and rec.meta.hparams["scope"] == "concept"
    total = C.kv_total(pipe.unet)
    assert C.count(cones.neurons(rec)) == pytest.approx(0.02 * total, abs=2)
    assert [e.step for e in events if e.phase == "tune"] == [0, 1, 2, 3]
    values = np.concatenate([d.values for d in rec.deltas.values()])
    assert values.dtype == np.float16
    # three Adam steps of lr 1e-2 from 0: each value moved, none by more than about 3e-2
    assert np.count_nonzero(values) > 0.9 * len(values)
    assert np.abs(values.astype(np.float32)).max() <= 3 * 1e-2 * 1.01

    handle = method.apply(pipe, [rec])
    assert changed(pipe, before) == []                  # nothing written: it lives in the scope
    scope = C.token_scope(pipe.unet)
    assert "a" in scope.names()
    tname, delta = next(iter(rec.deltas.items()))
    tok = pipe.tokenizer
    named = C.tokenize(pipe, [f"a photo of {rec.meta.token} star"])
    plain = C.tokenize(pipe, ["a photo of a star"])
    weight = C.kv_weights(pipe.unet)[tname]
    target = weight.detach().clone().view(-1)
    target[torch.as_tensor(delta.indices)] = torch.as_tensor(delta.values.astype(np.float32))
    out, x = _kv_out(pipe, scope, tname, named)
    rows = C.anchor(tok, rec.meta.token, "star").rows(named)[0]
    assert rows.sum() > 2 and not rows.all()
    want_in = torch.nn.functional.linear(x, target.view_as(weight))
    want_out = torch.nn.functional.linear(x, weight.detach())
    assert torch.allclose(out[0, rows], want_in[0, rows], atol=1e-5)
    assert torch.equal(out[0, ~rows], want_out[0, ~rows])
    out, x = _kv_out(pipe, scope, tname, plain)          # a prompt without the token: untouched
    assert torch.equal(out, torch.nn.functional.linear(x, weight.detach()))
    method.remove(handle)
    assert "a" not in scope.names() and changed(pipe, before) == []


def test_written_values_merge_later_wins_and_undo_exactly(fresh_tiny_pipe, tmp_path):
    pipe, method = fresh_tiny_pipe, get_method("cones")
    before = snapshot(pipe)
    tname, weight = next(iter(C.kv_weights(pipe.unet).items()))
    shape = tuple(weight.shape)
    from cones_store.records import ConceptMeta, ConceptRecord, SparseDelta

    def tuned(name, token, idx, value):
        return ConceptRecord(ConceptMeta(name, "cones", "star", token,
                                         hparams={"values": "tuned", "scope": "all"}),
                             deltas={tname: SparseDelta(np.array(idx, np.int64),
                                                        np.full(len(idx), value, np.float16), shape)})
    shut = ConceptRecord(ConceptMeta("s", "cones", "star", "qqq"), masks={tname: np.array([4, 5], np.int64)})
    handle = method.apply(pipe, [tuned("p", "pbc", [1, 2, 4], 0.5), shut, tuned("q", "xqz", [2, 3], -0.25)])
    flat_now = weight.detach().view(-1)
    assert flat_now[:6].tolist()[1:] == [0.5, -0.25, -0.25, 0.0, 0.0]
    assert flat_now[0] == before[f"unet.{tname}"].view(-1)[0]
    assert torch.equal(flat_now[6:], before[f"unet.{tname}"].view(-1)[6:])
    method.remove(handle)
    assert changed(pipe, before) == []


def test_cones_on_top_of_cns_restores_cns_values(fresh_tiny_pipe):
    from helpers.methods import synthetic

    pipe = fresh_tiny_pipe
    cns_rec = synthetic(pipe, "c", "sks", 3)
    get_method("cns").apply(pipe, [cns_rec])
    live = snapshot(pipe)
    name = next(iter(cns_rec.deltas))
    from cones_store.records import ConceptMeta, ConceptRecord
    rec = ConceptRecord(ConceptMeta("k", "cones", "star", "pbc"),
                        masks={name: cns_rec.deltas[name].indices[:50]})
    handle = get_method("cones").apply(pipe, [rec])
    assert changed(pipe, live) == [f"unet.{name}"]
    get_method("cones").remove(handle)
    assert changed(pipe, live) == []
    with pytest.raises(BadInput):
        get_method("cones").apply(pipe, [cns_rec])
    get_method("cns").unlearn(pipe, "c")
