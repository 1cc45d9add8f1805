"""The shipped toy-world fixture model: loads offline, fingerprints stably, and draws what it is
asked for (read by the probe) far more often than chance."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from cns_daemon.model import TOYWORLD_MODEL, fingerprint, kv_weights, load_pipeline
from cns_daemon.toyworld.fidelity import generate_batch
from cns_daemon.toyworld.probe import Probe
from cns_daemon.toyworld.world import COLORS, SHAPES, ObjectSpec, SceneSpec, caption

MAX_BYTES = 25_000_000


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
    # cross-attention at two resolutions (down, mid, up), keys and values
    assert any(".to_k." in k for k in kv) and any(".to_v." in k for k in kv)
    assert {k.split(".")[0] for k in kv} >= {"down_blocks", "up_blocks"}


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
