"""The shipped toy-world fixture model: loads offline, fingerprints stably, is shaped like SD where
the methods care (a wide text encoder, several heads, cross-attention at every resolution, rare
tokens at the scale of words), and draws what it is asked for (read by the probe) far more often
than chance: shape, colour and background from plain prompts, pattern and second colour when
the prompt names them, and a spread of patterns and tilts when it does not."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from cns_daemon.model import TOYWORLD_MODEL, fingerprint, kv_weights, load_pipeline
from cns_daemon.toyworld.fidelity import generate_batch
from cns_daemon.toyworld.probe import Probe
from cns_daemon.toyworld.fidelity import attribute_distribution, look_fidelity, named_look_cases
from cns_daemon.toyworld.vocab import caption_token_ids
from cns_daemon.toyworld.world import COLORS, SHAPES, ObjectSpec, SceneSpec, caption

MAX_BYTES = 40_000_000


@pytest.fixture(scope="module")
def toy_pipe():
    torch.set_num_threads(2)
    return load_pipeline(None, device="cpu")


def test_fixture_files_match_their_checksums():
    sums = (TOYWORLD_MODEL / "SHA256SUMS").read_text().split("\n")
    listed = {}
    for line in filter(None, sums):
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert "unet/diffusion_pytorch_model.safetensors" in listed
    for name, digest in listed.items():
        assert hashlib.sha256((TOYWORLD_MODEL / name).read_bytes()).hexdigest() == digest, name
    total = sum(f.stat().st_size for f in TOYWORLD_MODEL.rglob("*") if f.is_file())
    assert total <= MAX_BYTES
    info = json.loads((TOYWORLD_MODEL / "train_info.json").read_text())
    assert {"seed", "unet_steps"} <= set(info["config"]) and info["git_commit"]


def test_fixture_loads_offline_with_the_sd_architecture(toy_pipe, monkeypatch):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(toy_pipe.unet, UNet2DConditionModel)
    assert isinstance(toy_pipe.vae, AutoencoderKL)
    assert isinstance(toy_pipe.text_encoder, CLIPTextModel)
    assert isinstance(toy_pipe.scheduler, DDIMScheduler)
    assert len(toy_pipe.tokenizer) == 49408
    kv = kv_weights(toy_pipe.unet)
    assert any(".to_k." in k for k in kv) and any(".to_v." in k for k in kv)
    # cross-attention at every resolution, as in SD: every down and up block, and the mid block
    unet = toy_pipe.unet
    for block in (*unet.down_blocks, *unet.up_blocks, unet.mid_block):
        assert getattr(block, "attentions", None), type(block).__name__
    assert len(unet.down_blocks) >= 2
    # a text encoder wide enough for Eq. 3 to see prompt-specific columns, several heads
    assert toy_pipe.text_encoder.config.hidden_size >= 128
    assert unet.config.cross_attention_dim == toy_pipe.text_encoder.config.hidden_size
    heads = [block.attentions[0].transformer_blocks[0].attn2.heads for block in unet.down_blocks]
    assert max(heads) >= 4, heads


def test_rare_tokens_start_where_words_live(toy_pipe):
    """Rows the world's captions never used (every rare concept token) have the scale of the
    trained word rows, not of a fresh initialisation."""
    from cns_daemon.methods.common import rare_tokens, token_id

    weight = toy_pipe.text_encoder.get_input_embeddings().weight.detach()
    used = caption_token_ids(toy_pipe.tokenizer)
    words = weight[used].norm(dim=1).mean()
    rare = torch.stack([weight[token_id(toy_pipe.tokenizer, t)] for t in rare_tokens(toy_pipe.tokenizer)[:20]])
    ratio = float(rare.norm(dim=1).mean() / words)
    assert 0.7 < ratio < 1.4, ratio


def test_fingerprint_is_stable_across_loads(toy_pipe):
    again = load_pipeline(None, device="cpu")
    assert fingerprint(again) == fingerprint(toy_pipe)
    name, weight = next(iter(kv_weights(again.unet).items()))
    with torch.no_grad():
        weight[0, 0] += 1e-3
    assert fingerprint(again) != fingerprint(toy_pipe)


# Three prompts per shape, colours and backgrounds cycling; generated once for the module.
SCENES = [SceneSpec((ObjectSpec(shape, COLORS[(3 * i + j) % len(COLORS)]),),
                    ("white", "grass", "sand", "sky", "snow")[(i + 2 * j) % 5])
          for i, shape in enumerate(SHAPES) for j in range(3)]


@pytest.fixture(scope="module")
def reads(toy_pipe):
    images = generate_batch(toy_pipe, [caption(s) for s in SCENES], list(range(len(SCENES))), steps=12)
    return Probe.load().read(images)


def _accuracy(reads, attr: str) -> float:
    truth = [s.background if attr == "background" else getattr(s.objects[0], attr) for s in SCENES]
    return float(np.mean([getattr(r, attr) == t for r, t in zip(reads, truth)]))


def test_plain_prompts_get_colour_and_background_well_above_chance(reads):
    assert _accuracy(reads, "color") >= 0.6, _accuracy(reads, "color")            # chance 1/8
    assert _accuracy(reads, "background") >= 0.6, _accuracy(reads, "background")  # chance 1/5


def test_plain_prompts_get_the_shape_right_far_above_chance(reads):
    assert _accuracy(reads, "shape") >= 0.6, _accuracy(reads, "shape")            # chance 1/6


@pytest.fixture(scope="module")
def named(toy_pipe):
    cases = named_look_cases(60, seed=5)
    images = generate_batch(toy_pipe, [c.prompt for c in cases], [c.seed for c in cases], steps=20)
    return look_fidelity(Probe.load(), images, [c.scene for c in cases])


def test_named_prompts_draw_pattern_and_second_colour_well_above_chance(named):
    """"a photo of a red star with yellow stripes": the text pathway to the look exists. On
    these 60 prompts the shipped fixture (run 6) draws the whole named look 0.80, pattern 0.83,
    second colour 0.95 (bench.toyworld's 120 prompts: 0.89 / 0.97 / 0.93, docs/tuning.md); the
    floors leave room for seeds, far above chance."""
    assert named.all_match >= 0.65, named                                         # chance ~1/28
    assert named.per_attribute["pattern"] >= 0.7, named.per_attribute            # chance 1/4
    assert named.per_attribute["second_color"] >= 0.7, named.per_attribute       # chance 1/7


def test_plain_prompts_leave_pattern_and_tilt_to_the_noise(toy_pipe):
    """"a photo of a red star" names no look: several patterns and both tilts come out."""
    images = generate_batch(toy_pipe, ["a photo of a red star"] * 24, list(range(24)), steps=12)
    probe = Probe.load()
    patterns = attribute_distribution(probe, images, "pattern")
    assert sum(v >= 0.1 for v in patterns.values()) >= 2, patterns
    assert max(patterns.values()) <= 0.75, patterns
    tilts = attribute_distribution(probe, images, "tilt")
    assert len(tilts) == 2 and min(tilts.values()) >= 0.1, tilts


def test_vae_roundtrip_reads_renders_and_keeps_one_objects_look(toy_pipe):
    """bench.toyworld's composition ceiling: the probe reads the named look of fresh renders (one
    object, and both halves of a two-object photo), and the shipped VAE keeps one object's look
    (200 renders: 1.000 -> 0.945); what it keeps of two half-size looks (0.920 -> 0.610) is what
    the bench reports as an estimate of the ceiling on composition (docs/tuning.md, "The VAE caps
    composition"). A round trip through wrong scaling or channel order would read far under 0.9."""
    from bench.toyworld import vae_roundtrip

    r = vae_roundtrip(toy_pipe, Probe.load(), 60)
    assert r["single"]["render"] >= 0.95 and r["both_halves"]["render"] >= 0.85
    assert r["single"]["vae"] >= 0.9
    assert set(r) == {"single", "half", "both_halves"}
    assert all(set(v) == {"render", "vae"} and 0.0 <= min(v.values()) for v in r.values())
