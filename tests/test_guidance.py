"""Layout guidance: the processor's bias equals Eq. 7 computed by hand; unguided calls are stock."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from cns_daemon.guidance import (GuidanceConfig, GuidanceState, LayoutAttnProcessor, LayoutBias,
                                 cross_attention_modules, layer_grid, layout_guidance, logit_std)
from cns_daemon.prompts import Box, ExpandedPrompt, ConceptSpan, Layout

N_TOKENS = 7


def _prompt() -> ExpandedPrompt:
    # BOS a(1) b(2) ... : concept "a" at tokens 1-2, concept "b" at token 4, "c" (no box) at 5.
    spans = (ConceptSpan("a", "cns", (1, 2), 2), ConceptSpan("b", "cones2", (4,), 4),
             ConceptSpan("c", "cones", (5,), 5))
    return ExpandedPrompt("x", tuple(range(N_TOKENS)), spans)


def _attn(seed=0) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()


def _hand_m(neg: float, pos: float) -> torch.Tensor:
    """M on a 4x6 grid, written out cell by cell: box a = left half (cols 0-2, all rows),
    box b = bottom-right quarter (rows 2-3, cols 3-5); each concept's tokens are suppressed
    everywhere outside its box (the default, suppress="outside")."""
    m = torch.zeros(4, 6, N_TOKENS)
    for r in range(4):
        for c in range(6):
            in_a, in_b = c < 3, r >= 2 and c >= 3
            for tok in (1, 2):
                m[r, c, tok] = pos if in_a else neg
            m[r, c, 4] = pos if in_b else neg
    return m.reshape(24, N_TOKENS)


def _reference(attn, hidden, text, sigma2, weight, neg, pos, cfg=True):
    """Eq. 7 by hand: softmax(QKᵀ/√d + η·M)·V on the conditional samples, plain elsewhere."""
    q, k, v = attn.to_q(hidden), attn.to_k(text), attn.to_v(text)
    b, n, _ = q.shape
    split = lambda x: x.view(b, x.shape[1], 2, 8).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8)
    m = _hand_m(neg, pos)
    first_cond = b // 2 if cfg else 0
    for i in range(first_cond, b):
        for h in range(2):
            eta = weight * math.log(1 + sigma2) * logits[i, h].std(correction=0)
            logits[i, h] = logits[i, h] + eta * m
    out = logits.softmax(-1) @ v
    out = out.permute(0, 2, 1, 3).reshape(b, n, 16)
    return attn.to_out[0](out)


def _setup(cfg=True, steps=None, weight=0.08):
    layout = Layout((Box("a", 0, 0, 0.5, 1), Box("b", 0.5, 0.5, 1, 1)))
    config = GuidanceConfig(weight=weight, steps=steps)
    state = GuidanceState(sigma2=[30.0, 2.0, 0.1], latent_hw=(4, 6), cfg=cfg)
    proc = LayoutAttnProcessor(LayoutBias(layout, _prompt(), N_TOKENS, config), state, config,
                               AttnProcessor2_0())
    return proc, state, config


@pytest.mark.parametrize("cfg", [True, False])
def test_bias_matches_eq7_by_hand(cfg):
    attn = _attn()
    torch.manual_seed(1)
    hidden, text = torch.randn(4, 24, 16), torch.randn(4, N_TOKENS, 12)
    proc, state, config = _setup(cfg=cfg)
    with torch.no_grad():
        for step, s2 in enumerate(state.sigma2):
            state.step = step
            got = proc(attn, hidden, text)
            want = _reference(attn, hidden, text, s2, config.weight, config.gamma_neg,
                              config.gamma_pos, cfg)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            # The guidance really acts (conditional half) and leaves the rest alone.
            plain = AttnProcessor2_0()(attn, hidden, text)
            assert not torch.allclose(got[-1], plain[-1], atol=1e-3)
            if cfg:
                torch.testing.assert_close(got[:2], plain[:2], rtol=1e-5, atol=1e-6)


def test_unguided_steps_and_self_attention_are_stock():
    attn = _attn()
    torch.manual_seed(2)
    hidden, text = torch.randn(2, 24, 16), torch.randn(2, N_TOKENS, 12)
    proc, state, _ = _setup(steps=1)
    stock = AttnProcessor2_0()
    with torch.no_grad():
        state.step = 1  # past the guided steps
        assert torch.equal(proc(attn, hidden, text), stock(attn, hidden, text))
        state.step = 0
        self_attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
        assert torch.equal(proc(self_attn, hidden), stock(self_attn, hidden))


def test_own_box_wins_where_boxes_overlap():
    layout = Layout((Box("a", 0, 0, 0.75, 1), Box("b", 0.5, 0, 1, 1)))
    config = GuidanceConfig()
    m = LayoutBias(layout, _prompt(), N_TOKENS, config).matrix(1, 4)
    assert m[:, 1].tolist() == [2.5, 2.5, 2.5, -1e4]     # a: cols 0-2 own, col 3 only b's
    assert m[:, 4].tolist() == [-1e4, -1e4, 2.5, 2.5]    # b: cols 2-3 own
    assert m[:, [0, 3, 5, 6]].abs().sum() == 0            # BOS, plain words, unboxed "c"


def test_a_concepts_share_of_the_end_goes_to_its_box():
    """`tails` (two scoped CNS concepts in one prompt) add each concept's end-of-sequence share
    to its column; positions past the text length are ignored."""
    layout = Layout((Box("a", 0, 0, 0.5, 1), Box("b", 0.5, 0, 1, 1)))
    m = LayoutBias(layout, _prompt(), N_TOKENS, GuidanceConfig(),
                   tails={"a": [3, 6], "b": [5, 9]}).matrix(1, 2)
    for col in (1, 2, 3, 6):
        assert m[:, col].tolist() == [2.5, -1e4], col    # a's words and its share
    for col in (4, 5):
        assert m[:, col].tolist() == [-1e4, 2.5], col
    assert m[:, 0].abs().sum() == 0


def test_outside_suppression_blocks_a_concept_everywhere_but_its_box():
    """suppress="outside" (the public Cones 2 code's form): a concept's tokens get γ⁻ at every
    position outside its own box, not only in the other concepts' boxes."""
    layout = Layout((Box("a", 0, 0, 0.5, 1), Box("b", 0.75, 0, 1, 1)))
    config = GuidanceConfig(suppress="outside")
    m = LayoutBias(layout, _prompt(), N_TOKENS, config).matrix(1, 4)
    assert m[:, 1].tolist() == [2.5, 2.5, -1e4, -1e4]    # col 2 is nobody's box: suppressed too
    assert m[:, 4].tolist() == [-1e4, -1e4, -1e4, 2.5]
    others = LayoutBias(layout, _prompt(), N_TOKENS, GuidanceConfig(suppress="others")).matrix(1, 4)
    assert others[:, 1].tolist() == [2.5, 2.5, 0.0, -1e4]
    with pytest.raises(Exception, match="suppress"):
        GuidanceConfig(suppress="everywhere")


def test_a_box_alone_steers_its_concept_and_its_end_of_sequence():
    """One boxed concept (the default suppression): its words and its end of the sequence are
    drawn to its box and kept out of the rest. With "others" nothing would be kept out: that
    moved nothing on the toy world (docs/tuning.md, "One box")."""
    layout = Layout((Box("a", 0, 0, 0.5, 1),))
    m = LayoutBias(layout, _prompt(), N_TOKENS, GuidanceConfig(), tails={"a": [6]}).matrix(1, 2)
    for col in (1, 2, 6):
        assert m[:, col].tolist() == [2.5, -1e4], col
    assert m[:, [0, 3, 4, 5]].abs().sum() == 0
    others = LayoutBias(layout, _prompt(), N_TOKENS, GuidanceConfig(suppress="others")).matrix(1, 2)
    assert others[:, 1].tolist() == [2.5, 0.0]


def test_tiny_box_keeps_a_cell_and_grids_follow_the_aspect():
    layout = Layout((Box("a", 0.9, 0.9, 0.95, 0.95),))
    m = LayoutBias(layout, _prompt(), N_TOKENS, GuidanceConfig()).matrix(2, 2)
    assert m[:, 1].tolist() == [-1e4, -1e4, -1e4, 2.5]
    assert layer_grid(12 * 20, (12, 20)) == (12, 20)
    assert layer_grid(6 * 10, (12, 20)) == (6, 10)
    assert layer_grid(3 * 5, (12, 20)) == (3, 5)
    assert layer_grid(2 * 3, (12, 20)) == (2, 3)   # ceil(3/2)=2, ceil(5/2)=3


def test_subsampled_std_estimates_the_full_std():
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 4096, 40), torch.randn(2, 4, 77, 40)
    full = (q @ k.transpose(-1, -2) / math.sqrt(40)).std(dim=(-2, -1), correction=0, keepdim=True)
    est = logit_std(q, k, 1 / math.sqrt(40), rows=256)
    torch.testing.assert_close(est, full, rtol=0.06, atol=0)
    torch.testing.assert_close(logit_std(q, k, 1 / math.sqrt(40), rows=4096), full)


def test_context_manager_restores_the_same_processors(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    modules = cross_attention_modules(unet)
    assert modules and all(n.endswith("attn2") for n in modules)
    proc, state, config = _setup()
    with pytest.raises(RuntimeError):
        with layout_guidance(unet, proc.bias, state, config):
            inside = unet.attn_processors
            assert all(isinstance(p, LayoutAttnProcessor) for n, p in inside.items() if ".attn2." in n)
            assert all(p is before[n] for n, p in inside.items() if ".attn1." in n)
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_toyworld_guidance_puts_each_concept_in_its_box():
    """On the toy-world model, "a photo of <a> and <b>" (a star, b ring) with a box per concept
    puts both shapes in their halves far more often with layout guidance than without, whether
    the boxes follow the word order or go against it (bench.quality's placement sweep; measured
    at w = 0.075 over 16 images: 0.75 / 0.62 guided vs 0.00 / 0.19 unguided)."""
    from bench import quality
    from bench._world import Judge

    cfg = quality.QualityConfig(generations=16, gen_steps=10)
    pipe = quality.load_model(cfg)
    rates = quality.placement_sweep(pipe, lambda w: quality._generator(pipe, cfg, w), Judge(),
                                    [0.0, GuidanceConfig().weight], cfg.generations)
    unguided, guided = rates[0.0], rates[GuidanceConfig().weight]
    for order in ("a_left", "b_left"):
        assert guided[order] >= unguided[order] + 0.25, (order, rates)
