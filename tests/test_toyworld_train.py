"""The fixture's training script end to end at a toy size: a warm-started run on the CPU writes a
folder that loads, whose checksums hold and whose train_info records the run and the one it
continued; the learning rate anneals by the steps or by the wall-time budget, whichever ends first."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from cns_daemon.model import TOYWORLD_MODEL, load_pipeline
from cns_daemon.toyworld.train import TrainConfig, lr_at, run


def test_a_short_warm_started_run_writes_a_loadable_recorded_fixture(tmp_path):
    threads = torch.get_num_threads()
    cfg = TrainConfig(seed=11, n_images=64, vae_steps=0, unet_steps=6, unet_batch=4, warmup=2,
                      checkpoint_every=3, init=str(TOYWORLD_MODEL), device="cpu", max_minutes=5.0)
    try:
        info = run(cfg, tmp_path / "fx")
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "fx"
    assert info["unet_steps_done"] == 6
    saved = json.loads((out / "train_info.json").read_text())
    assert saved["config"]["device"] == "cpu" and saved["config"]["seed"] == 11
    shipped = json.loads((TOYWORLD_MODEL / "train_info.json").read_text())
    assert saved["warm_start"] == shipped          # the run it continued, as that run recorded itself
    for line in filter(None, (out / "SHA256SUMS").read_text().split("\n")):
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    pipe = load_pipeline(out, device="cpu", dtype="float32")
    base = load_pipeline(None, device="cpu", dtype="float32")
    # six steps moved the UNet
    moved = [n for n, p in pipe.unet.named_parameters()
             if not torch.allclose(p, dict(base.unet.named_parameters())[n], atol=1e-3)]
    assert moved


def test_the_learning_rate_anneals_by_steps_or_by_the_wall_time_budget():
    cfg = TrainConfig(unet_steps=1000, warmup=100, unet_lr=1e-3)
    assert lr_at(0, cfg) < lr_at(99, cfg) <= 1e-3
    assert abs(lr_at(100, cfg) - 1e-3) < 1e-9
    assert abs(lr_at(999, cfg) - 0.05e-3) < 2e-6
    # half the steps but the whole budget spent: already at the floor
    assert abs(lr_at(500, cfg, time_frac=1.0) - 0.05e-3) < 1e-9


def test_the_training_command_names_its_folder_and_replaces_none_unasked(tmp_path, capsys):
    """Run bare, it once overwrote the shipped fixture; now --out is required and a folder that
    exists is refused at once, before any training, unless --force."""
    from cns_daemon.toyworld.train import main

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "m"), "--unet-steps", "1"])
    assert exit_.value.code == 2 and "--force" in capsys.readouterr().err


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path):
    """From its step-2 checkpoint, a resumed run draws the same captions and noise, on the same
    schedule, as the run that went on (captions were drawn afresh, and the wall-time budget
    started again)."""
    import shutil

    threads = torch.get_num_threads()
    cfg = TrainConfig(seed=12, n_images=16, vae_steps=0, unet_steps=4, unet_batch=2, warmup=1,
                      checkpoint_every=2, init=str(TOYWORLD_MODEL), device="cpu", max_minutes=5.0)
    try:
        run(cfg, tmp_path / "whole")
        # what a run cut off after step 2 leaves: its work folder with the step-2 checkpoint
        shutil.copytree(tmp_path / "whole.work", tmp_path / "cut.work")
        ckpt = torch.load(tmp_path / "cut.work" / "denoiser.pt", weights_only=False)
        assert ckpt["step"] == 2 and ckpt["elapsed"] > 0 and "rng" in ckpt
        info = run(cfg, tmp_path / "cut", resume=True)
    finally:
        torch.set_num_threads(threads)
    assert info["resumed"] and info["unet_steps_done"] == 4
    whole = load_pipeline(tmp_path / "whole", device="cpu", dtype="float32").unet.state_dict()
    cut = load_pipeline(tmp_path / "cut", device="cpu", dtype="float32").unet.state_dict()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
