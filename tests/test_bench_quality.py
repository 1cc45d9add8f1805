"""Smoke tests of the quality bench and its baselines on the tiny random model.

The tiny model learns nothing in a few steps, so these check the machinery: every method runs
through the bench, the summary has the documented keys with sane values, and the baselines
touch what they claim (naive: every K/V weight; ti: none) and come off exactly.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import quality
from bench._world import Judge, make_concepts
from bench.baselines import NAIVE, TEXTUAL_INVERSION
from cns_daemon.methods.base import LearnSpec
from cns_daemon.model import kv_weights
from cns_daemon.toyworld.probe import Probe, ProbeNet


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread, and far faster than on two when the machine's
    two cores are shared (OpenMP workers then wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_judge():
    torch.manual_seed(0)
    return Judge(Probe(ProbeNet(width=8)))


FAST = {"steps": 2, "prior_images": 2, "prior_steps": 2, "variants": 1}


@pytest.mark.slow   # 12 s (CI runs -m slow)
def test_quality_bench_smoke(random_judge):
    cfg = quality.QualityConfig(
        methods=("cns", "cones2", "naive", "ti", "nosuch"), concepts=2, photos=2, generations=2,
        gen_steps=2, tiny=True,
        steps={"cones2": 2},
        options={"cns": FAST, "naive": FAST, "ti": FAST, "cones2": {"reg_batch": 2, "variants": 1}})
    result = quality.run(cfg, random_judge, log=lambda *_: None)
    s = quality.summary(result)
    for m in ("cns", "cones2", "naive", "ti"):
        assert s.get(f"{m}_error") is None, s[f"{m}_error"]
        for key in ("fidelity", "fidelity_final", "unnamed", "unnamed_final", "prompt_fidelity",
                    "prompt_look",
                    "composition_guided", "composition_unguided", "placement_guided",
                    "placement_unguided", "kv_share"):
            assert 0.0 <= s[f"{m}_{key}"] <= 1.0, key
        assert -1.0 <= s[f"{m}_forgetting"] <= 1.0
        assert -1.0 <= s[f"{m}_prior_drop"] <= 1.0 and -1.0 <= s[f"{m}_prior_drop_two"] <= 1.0
        assert s[f"{m}_bytes_per_concept"] > 0 and s[f"{m}_learn_s_per_concept"] > 0
        # fractions of 2 generations can only be 0, 0.5 or 1
        assert s[f"{m}_fidelity"] * 4 == round(s[f"{m}_fidelity"] * 4)
    # the look in the scene prompts is read on the same images, one figure per concept
    cns = result["methods"]["cns"]
    assert len(cns["prompt_look"]) == len(cns["prompt_fidelity"]) == 2
    # a broken method is reported, not fatal
    assert "nosuch" in s["nosuch_error"] and s["nosuch_fidelity"] is None
    # CNS never trains a general neuron; naive trains every K/V value, ti none
    assert s["cns_general_share"] == 0.0
    assert s["naive_kv_share"] == 1.0 and s["ti_kv_share"] == 0.0
    # the mixed-method composition ran (cones was not in this run: only cns+cones2)
    assert set(result["mixed"]) == {"cns+cones2"}
    assert 0.0 <= s["cns+cones2_composition_guided"] <= 1.0
    assert 0.0 <= s["cns+cones2_placement_guided"] <= 1.0 and 0.0 <= s["cns+cones2_placement_unguided"] <= 1.0
    # Cones 2 and textual inversion never change the UNet: plain prompts come out identical
    for m in ("cones2", "ti"):
        assert s[f"{m}_prior_drop"] == 0.0 and s[f"{m}_prior_drop_two"] == 0.0
    # naive stores every K/V value, CNS a sparse part of them
    assert s["naive_bytes_per_concept"] > s["cns_bytes_per_concept"] > s["ti_bytes_per_concept"]


def test_background_captions_say_the_scene_and_not_the_look(tmp_path):
    for sub in "abc":
        (tmp_path / sub).mkdir()
    (concept,) = make_concepts(1, 4, seed=3, folder=tmp_path / "a", captions="background")
    for photo, world_caption in zip(concept.photos, concept.captions):
        text = photo.with_suffix(".txt").read_text().strip()
        scene = world_caption.split(f"{concept.obj.pattern} ", 1)[1]   # "... stripes in the snow"
        assert text == f"a photo of a {concept.class_word} {scene}"
        assert concept.obj.color not in text.split() and concept.obj.pattern not in text
    (plain,) = make_concepts(1, 4, seed=3, folder=tmp_path / "b")
    assert not any(p.with_suffix(".txt").exists() for p in plain.photos)
    with pytest.raises(ValueError):
        make_concepts(1, 1, seed=3, folder=tmp_path / "c", captions="look")


def test_parse_sets():
    steps, options = quality.parse_sets(["cns.steps=50", "cns.top_p=2.5", "cones2.lr=1e-4"])
    assert steps == {"cns": 50}
    assert options == {"cns": {"top_p": 2.5}, "cones2": {"lr": 1e-4}}
    with pytest.raises(SystemExit):
        quality.parse_sets(["bogus.steps=3"])


def test_methods_and_options_are_checked_before_anything_runs(capsys, monkeypatch):
    """A mistyped method or option ends the bench at once with its usage error (exit 2), before
    the base model's measurement: it was found after it, one method at a time, and exited 0."""
    monkeypatch.setattr(quality, "run", lambda *a, **k: pytest.fail("the bench ran"))
    for argv, words in ((["--methods", "cnss,cns"], "Unknown method(s) 'cnss'"),
                        (["--methods", "cns", "--set", "cns.bogus=1"], "Unknown option(s) 'bogus'"),
                        (["--methods", "cns", "--set", "cns.lr=-1"], "'lr' must be > 0"),
                        (["--methods", "ti", "--set", "ti.scope=concept"], "ti baseline does not read 'scope'"),
                        (["--methods", "naive", "--set", "naive.top_p=2"], "does not read 'top_p'"),
                        (["--methods", "cns", "--set", "ti.vectors=3"], "--set for ti, not in --methods")):
        with pytest.raises(SystemExit) as exit_:
            quality.main(["--tiny", "--quick", *argv])
        assert exit_.value.code == 2 and words in capsys.readouterr().err, argv
    cfg = quality.QualityConfig.quick(methods=("ti",), options={"ti": {"vectors": 3, "token_init": "class"}})
    quality.check_methods(cfg, {"ti"})   # what a baseline reads passes


@pytest.mark.parametrize("baseline", [NAIVE, TEXTUAL_INVERSION], ids=lambda b: b.name)
def test_baseline_touches_what_it_claims_and_comes_off(fresh_tiny_pipe, tmp_path, baseline):
    pipe = fresh_tiny_pipe
    concept = make_concepts(1, 2, seed=3, folder=tmp_path)[0]
    kv0 = {n: w.detach().clone() for n, w in kv_weights(pipe.unet).items()}
    emb0 = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    spec = LearnSpec("x", concept.class_word, captions=list(concept.captions),
                     options={**FAST, "steps": 3, "lr": 1e-2, "lr_token": 1e-1})
    record = baseline.learn(pipe, list(concept.photos), spec)
    kv = kv_weights(pipe.unet)
    changed = sum(int((kv[n] != kv0[n]).sum()) for n in kv)
    total = sum(w.numel() for w in kv.values())
    row = pipe.tokenizer.convert_tokens_to_ids(record.meta.token + "</w>")
    emb = pipe.text_encoder.get_input_embeddings().weight
    assert not torch.equal(emb[row], emb0[row])           # the token row was learned and is live
    assert torch.equal(emb[row], torch.from_numpy(record.embeddings[record.meta.token]))
    if baseline.kv:
        assert changed > 0.9 * total                       # Adam moves (nearly) every weight
        assert math.isclose(record.meta.hparams["fraction_kv"], 1.0)
        for n, d in record.deltas.items():                 # the live weights are the record's
            assert np.array_equal(kv[n].detach().numpy().reshape(-1), d.values)
    else:
        assert changed == 0 and not record.deltas
    from cns_daemon.methods.cns import METHOD as CNS

    CNS.unlearn(pipe, "x")
    assert all(torch.equal(w, kv0[n]) for n, w in kv_weights(pipe.unet).items())
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, emb0)


def test_textual_inversion_starts_where_its_token_init_says(fresh_tiny_pipe, tmp_path):
    """token_init=class starts every token row from the class word's row, as textual inversion
    starts from a coarse descriptor; the default starts from the rare words' own rows."""
    from cns_daemon.methods import common as C
    from cns_daemon.methods.cns import METHOD as CNS

    pipe = fresh_tiny_pipe
    concept = make_concepts(1, 2, seed=3, folder=tmp_path)[0]
    table = pipe.text_encoder.get_input_embeddings().weight
    class_row = table[C.token_ids(pipe.tokenizer, concept.class_word)].mean(0).detach().numpy()
    for init in ("class", "token"):
        spec = LearnSpec("x", concept.class_word, captions=list(concept.captions),
                         options={**FAST, "steps": 0, "vectors": 2, "token_init": init})
        record = TEXTUAL_INVERSION.learn(pipe, list(concept.photos), spec)
        rows = list(record.embeddings.values())
        assert len(rows) == 2
        starts_at_class = [np.allclose(r, class_row) for r in rows]
        assert starts_at_class == ([True, True] if init == "class" else [False, False]), init
        CNS.unlearn(pipe, "x")


def test_placement_sweep_smoke(random_judge):
    cfg = quality.QualityConfig(generations=2, gen_steps=2, tiny=True)
    pipe = quality.load_model(cfg)
    rates = quality.placement_sweep(pipe, lambda w: quality._generator(pipe, cfg, w), random_judge,
                                    [0.0, 1.0], cfg.generations)
    assert set(rates) == {0.0, 1.0}
    for r in rates.values():
        assert set(r) == {"a_left", "b_left"}
        assert all(v in (0.0, 0.5, 1.0) for v in r.values())   # fractions of 2 images


def test_the_baselines_adam_steps_fp32_masters_of_half_weights():
    """Adam on fp16 weights themselves: eps rounds to 0 and the weights went to -inf in three
    steps (a GPU's naive baseline and the overhead bench's plain fine-tune)."""
    from bench.baselines import MasterAdam

    results = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.nn.Parameter(torch.full((4,), 0.05, dtype=dtype))
        opt = MasterAdam([{"params": [w], "lr": 1.2e-2}])
        for _ in range(3):
            opt.zero_grad()
            (w.float().sum() * 1e-5).backward()
            opt.step()
        assert w.dtype == dtype
        results[dtype] = w.detach().float()
    assert torch.allclose(results[torch.float16], results[torch.float32], atol=1e-4)
    assert torch.allclose(results[torch.bfloat16], results[torch.float32], atol=1e-3)


def test_plain_prompts_are_drawn_through_the_generation_routine_with_every_record(random_judge):
    """The prior drop draws its plain prompts as the service would: each through the bench's
    Generator (the service's routine, not the bare pipeline) with the learned records, from its
    own seed. (A plain prompt names no concept: scoped and per-request concepts leave it as the
    base model draws it by design, so their drop reads 0 on either route.)"""
    from PIL import Image

    from bench._cells import measure_prior
    from cns_daemon.toyworld.fidelity import plain_prompt_cases

    calls = []

    def gen(prompt, records, n, seed, boxes=()):
        calls.append((prompt, records, n, seed))
        return [Image.new("RGB", (32, 32))] * n

    records = {"c1": object()}
    one, two = measure_prior(gen, random_judge, records, 3, 5)
    cases = plain_prompt_cases(3, 5) + plain_prompt_cases(3, 5, two_objects=True)
    assert [(p, n, s) for p, _, n, s in calls] == [(c.prompt, 1, c.seed) for c in cases]
    assert all(r is records for _, r, _, _ in calls)
    assert 0.0 <= one <= 1.0 and 0.0 <= two <= 1.0
