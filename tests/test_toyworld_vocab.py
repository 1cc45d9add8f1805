"""The fixture's training vocabulary: the compact table and one-token looks (vocab.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cns_daemon.model import build_tiny_pipeline
from cns_daemon.toyworld.train import TrainConfig, caption_ids, sample_caption
from cns_daemon.toyworld.vocab import CompactEmbedding, LookMerger, caption_token_ids
from cns_daemon.toyworld.world import ObjectSpec, SceneSpec, caption, random_scene


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_pipeline(seed=0).tokenizer


def test_a_merged_look_is_one_position_holding_its_words(tokenizer):
    full = nn.Embedding(len(tokenizer), 8)
    used = caption_token_ids(tokenizer)
    merger = LookMerger(tokenizer, full.num_embeddings)
    table = CompactEmbedding(full, used, merger.merged_words())
    star = ObjectSpec("star", "red", "stripes", "yellow")
    text = caption(SceneSpec((star,), "grass"), look="full")
    plain = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    ids = merger.apply(plain, star)
    # "a photo of a red star with yellow stripes on the grass" -> "a photo of a <m> star on the grass":
    # three positions fewer, the rest shifted left and padded, the same length.
    assert len(ids) == len(plain)
    assert int((ids >= full.num_embeddings).sum()) == 1
    words = tokenizer(text.replace("red star with yellow stripes", "star"), padding="max_length",
                      max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
    pos = int((ids >= full.num_embeddings).nonzero()[0, 0])
    assert torch.equal(torch.cat([ids[:pos], ids[pos + 1:]]), words[:-1])
    w = merger.word
    want = (full.weight[w["red"]] + full.weight[w["yellow"]] + full.weight[w["stripes"]]) / math.sqrt(3)
    got = table(ids[None])[0]
    assert torch.allclose(got[pos], want, atol=1e-6)
    assert torch.allclose(got[:pos], full.weight[ids[:pos]], atol=1e-6)
    # The summed words' rows get the gradient.
    got[pos].sum().backward()
    for word in ("red", "yellow", "stripes"):
        assert table.rows.grad[used.index(w[word])].abs().sum() > 0
    with pytest.raises(ValueError, match="in full"):
        merger.apply(plain, ObjectSpec("star", "red", "dots", "yellow"))
    with pytest.raises(ValueError, match="outside"):
        table(torch.tensor([[full.num_embeddings + len(merger.combos)]]))


def test_merging_is_drawn_only_for_single_objects_named_in_full(tokenizer):
    merger = LookMerger(tokenizer, len(tokenizer))
    rng = np.random.default_rng(0)
    drawn = [sample_caption(random_scene(rng, two_prob=0.3), rng, TrainConfig(merge_look=0.5))
             for _ in range(300)]
    merged = [(text, obj) for text, obj in drawn if obj is not None]
    assert 10 < len(merged) < 100
    for text, obj in merged:
        assert f"{obj.color} {obj.shape} with {obj.second_color} {obj.pattern}" in text
        assert " and " not in text
    ids = caption_ids(tokenizer, drawn, merger)
    assert int((ids >= len(tokenizer)).sum()) == len(merged)
    # Off (the default), no caption is merged and the random sequence is the old one.
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    scenes = [random_scene(np.random.default_rng(2)) for _ in range(50)]
    off = [sample_caption(s, rng_a, TrainConfig()) for s in scenes]
    assert all(obj is None for _, obj in off)
    assert [t for t, _ in off] == [t for t, _ in (sample_caption(s, rng_b, TrainConfig()) for s in scenes)]


def test_looks_said_before_the_noun_are_drawn_only_when_asked(tokenizer):
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, two_prob=0.3) for _ in range(400)]
    on = [sample_caption(s, np.random.default_rng(i), TrainConfig(look_before=0.5))[0]
          for i, s in enumerate(scenes)]
    adjectives = [t for t in on if any(w in t.split() for w in ("striped", "dotted", "checked"))]
    after = [t for t in on if " with " in t]
    assert len(adjectives) > 40 and len(after) > 40   # both forms, about half each
    off = [sample_caption(s, np.random.default_rng(i), TrainConfig())[0] for i, s in enumerate(scenes)]
    assert not any(w in t.split() for t in off for w in ("striped", "dotted", "checked"))
    # every word of either form is in the trained vocabulary
    used = set(caption_token_ids(tokenizer))
    assert all(set(tokenizer(t).input_ids) <= used for t in on)
