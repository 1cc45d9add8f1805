import pytest
import torch

from cns_daemon.api.errors import ModelLoad
from cns_daemon.model import build_tiny_pipeline, fingerprint, fingerprints, kv_weights, load_pipeline
from cns_daemon.tokenizer import clip_tokenizer


def test_tokenizer_is_real_clip_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # Ids of the real CLIP BPE vocabulary (bos, "a", "photo", "of", "a", "red", "star", eos).
    assert tok("a photo of a red star").input_ids == [49406, 320, 1125, 539, 320, 736, 1565, 49407]


def test_tiny_pipeline_has_sd_structure_and_generates(tiny_pipe):
    kv = kv_weights(tiny_pipe.unet)
    assert len(kv) == 14 and all(".attn2.to_" in n for n in kv)
    # 7 transformer blocks (2 down, 1 mid, 4 up) x K,V; cross-attention at two resolutions
    assert any(n.startswith("down_blocks.0") for n in kv) and any(n.startswith("down_blocks.1") for n in kv)
    out = tiny_pipe("a photo of a red star", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3)


def test_tiny_pipeline_is_deterministic_and_fingerprint_stable(tiny_pipe):
    assert fingerprint(build_tiny_pipeline(seed=0)) == fingerprint(tiny_pipe)
    assert fingerprint(build_tiny_pipeline(seed=1)) != fingerprint(tiny_pipe)


def test_fingerprint_survives_save_and_load_and_sees_weight_changes(tmp_path, fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    pipe.save_pretrained(tmp_path / "m")
    loaded = load_pipeline(tmp_path / "m", device="cpu")
    assert fingerprint(loaded) == fingerprint(pipe)
    assert fingerprint(load_pipeline(tmp_path / "m", device="cpu")) == fingerprint(loaded)
    name, w = next(iter(kv_weights(loaded.unet).items()))
    with torch.no_grad():
        w.view(-1)[0] += 1e-3
    assert fingerprint(loaded) != fingerprint(pipe)
    with torch.no_grad():
        w.view(-1)[0] -= 1e-3
        loaded.text_encoder.get_input_embeddings().weight[5, 0] += 1e-3
    assert fingerprint(loaded) != fingerprint(pipe)


def test_fingerprint_is_one_for_a_model_loaded_in_fp32_or_bf16(fresh_tiny_pipe, tiny_pipe):
    """One model file on the CPU (fp32) and on a GPU (bf16): one store serves both. The fp32
    digest (what stores made before carry) tells them apart."""
    bf16 = fresh_tiny_pipe
    bf16.unet.to(torch.bfloat16)
    bf16.text_encoder.to(torch.bfloat16)
    assert fingerprint(bf16) == fingerprint(tiny_pipe)
    current, fp32, fp32_of_bf16 = fingerprints(tiny_pipe)
    assert current == fingerprint(tiny_pipe)
    assert fingerprints(bf16, ("fp32",))[0] != fp32
    # what an earlier cones stamped on a bf16 load, computed from the fp32 load (an alias)
    assert fingerprints(bf16, ("fp32",))[0] == fp32_of_bf16
    # each form read alone is the one read beside the others
    assert fingerprints(tiny_pipe, ("fp32-of-bf16", "fp32")) == (fp32_of_bf16, fp32)
    with torch.no_grad():   # a change bf16 can see is still seen
        next(iter(kv_weights(bf16.unet).values())).view(-1)[0] += 0.05
    assert fingerprint(bf16) != fingerprint(tiny_pipe)
    with pytest.raises(ValueError, match="unknown digest forms"):
        fingerprints(tiny_pipe, ("fp16",))


def _tiny_sd_configs(tmp_path, pipe):
    """A configuration root holding the tiny pipeline's configs as family "v1" (no weights)."""
    import shutil

    folder = tmp_path / "configs" / "v1"
    pipe.save_pretrained(folder)
    for f in folder.rglob("*.safetensors"):
        f.unlink()
    shutil.rmtree(folder / "tokenizer")
    return tmp_path / "configs"


def test_single_file_checkpoints_load_offline_through_a_local_config_folder(tmp_path, monkeypatch, tiny_pipe):
    """A checkpoint in the original layout (.safetensors, and a Lightning .ckpt) loads with the
    configuration folder the package names for its family (here the tiny pipeline's, standing in
    for assets/sd: an SD-sized file is gigabytes), never asking the hub, to the same weights."""
    from diffusers.loaders import single_file
    from safetensors.torch import save_file

    from cns_daemon import checkpoint
    from helpers.ldm import ldm_state_dict

    def no_hub(*a, **kw):
        raise AssertionError("the hub was asked for a configuration")

    monkeypatch.setattr(single_file, "_download_diffusers_model_config_from_hub", no_hub)
    monkeypatch.setattr(checkpoint, "SD_CONFIGS", _tiny_sd_configs(tmp_path, tiny_pipe))
    state = ldm_state_dict(tiny_pipe)
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "model.ckpt")
    for name in ("model.safetensors", "model.ckpt"):
        assert checkpoint.family(tmp_path / name) == "v1"
        loaded = load_pipeline(tmp_path / name, device="cpu")
        assert fingerprint(loaded) == fingerprint(tiny_pipe)
        for part in ("unet", "vae", "text_encoder"):
            want, got = getattr(tiny_pipe, part).state_dict(), getattr(loaded, part).state_dict()
            assert all(torch.equal(want[k], got[k]) for k in want), part
        assert type(loaded.scheduler).__name__ == "DDIMScheduler" and len(loaded.tokenizer) == 49408


def test_shipped_sd_configs_have_the_published_sizes():
    """SD 1.5 and 2.1 as published: parameter counts of UNet, VAE and text encoder (built on the
    meta device: no memory), and the settings a count cannot see."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cns_daemon.checkpoint import config_folder, tokenizer

    sizes = {"v1": (859_520_964, 83_653_863, 123_060_480), "v2": (865_910_724, 83_653_863, 340_387_840)}
    for kind, want in sizes.items():
        folder = config_folder(kind)
        with torch.device("meta"):
            parts = (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                     AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                     CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")))
        assert tuple(sum(p.numel() for p in m.parameters()) for m in parts) == want, kind
        unet, text = parts[0].config, parts[2].config
        assert unet.use_linear_projection == (kind == "v2") and text.hidden_act == (
            "gelu" if kind == "v2" else "quick_gelu")
        assert unet.upcast_attention == (kind == "v2") and unet.sample_size == (96 if kind == "v2" else 64)
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler").config
        assert scheduler.prediction_type == ("v_prediction" if kind == "v2" else "epsilon")
        assert (scheduler.beta_start, scheduler.beta_end, scheduler.beta_schedule) == (0.00085, 0.012, "scaled_linear")
        assert StableDiffusionPipeline.load_config(folder)["_class_name"] == "StableDiffusionPipeline"
    assert tokenizer("v2")("a dog", padding="max_length").input_ids[-1] == 0     # "!" pads SD 2.x
    assert tokenizer("v1")("a dog", padding="max_length").input_ids[-1] == 49407


def test_checkpoints_of_other_families_or_none_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from cns_daemon.checkpoint import family

    unet = "model.diffusion_model."
    cases = {
        "v2": {unet + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024)},
        "inpainting": {unet + "input_blocks.0.0.weight": (8, 9, 3, 3)},
        "xl_base": {unet + "x": (1,), "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (4,)},
        "lora": {"lora_unet_down_blocks_0.lora_down.weight": (4, 4)},
    }
    for name, shapes in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
        if name == "v2":
            assert family(path) == "v2"
            continue
        with pytest.raises(ModelLoad, match="no Stable Diffusion UNet" if name == "lora" else f"'{name}'") as info:
            family(path)
        assert "1.x and 2.x" in info.value.hint
    import argparse   # Lightning left objects beside the weights in early .ckpt files

    torch.save({"state_dict": {"x": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1e-4)},
               tmp_path / "old.ckpt")
    with pytest.raises(ModelLoad, match="Python objects besides its weights") as info:
        family(tmp_path / "old.ckpt")
    assert ".safetensors" in info.value.hint
    (tmp_path / "noise.ckpt").write_bytes(bytes(range(256)) * 64)   # not a pickle at all
    with pytest.raises(ModelLoad, match="cannot be read as a checkpoint") as info:
        family(tmp_path / "noise.ckpt")
    assert "whole" in info.value.hint and "Python objects" not in info.value.message
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoad, match="is not a .safetensors or .ckpt checkpoint"):
        load_pipeline(tmp_path / "notes.txt", device="cpu")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoad, match="cannot be read as a checkpoint"):
        load_pipeline(cut, device="cpu")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoad, match="No model at"):
        load_pipeline(tmp_path / "nope", device="cpu")


def test_a_model_folder_missing_a_part_or_its_tokenizer_is_named(tmp_path, tiny_pipe):
    import shutil

    folder = tmp_path / "sd"
    tiny_pipe.save_pretrained(folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelLoad, match="has no unet/"):
        load_pipeline(folder, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoad, match="no model_index.json"):
        load_pipeline(tmp_path / "empty", device="cpu")
    whole = tmp_path / "sd2"
    tiny_pipe.save_pretrained(whole)
    for f in (whole / "tokenizer").iterdir():   # a tokenizer folder with nothing usable in it
        f.unlink()
    with pytest.raises(ModelLoad, match="tokenizer"):
        load_pipeline(whole, device="cpu")


def test_a_mistyped_path_says_what_happened(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def offline(cls, path, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'... check your internet connection")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(offline))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoad, match="There is no folder") as info:
        load_pipeline("models/mysd", device="cpu")
    assert str(tmp_path / "models" / "mysd") in info.value.message and "absolute path" in info.value.hint


def test_a_model_folder_of_another_family_is_refused_by_name(tmp_path):
    """diffusers loads an inpainting folder as Stable Diffusion without a word; the first job
    then failed on a tensor shape."""
    import json

    from cns_daemon.api.errors import ModelLoad
    from cns_daemon.model import check_model_folder

    def folder(name, index, unet):
        root = tmp_path / name
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            (root / part).mkdir(parents=True)
        (root / "model_index.json").write_text(json.dumps(index))
        (root / "unet" / "config.json").write_text(json.dumps(unet))
        return root

    sd = {"_class_name": "StableDiffusionPipeline"}
    check_model_folder(folder("sd", sd, {"in_channels": 4}))
    for name, index, unet, needle in (
            ("inpaint", {"_class_name": "StableDiffusionInpaintPipeline"}, {"in_channels": 9},
             "StableDiffusionInpaintPipeline"),
            ("nine", sd, {"in_channels": 9}, "a UNet with 9 input channels"),
            ("xl", sd, {"in_channels": 4, "addition_embed_type": "text_time"}, "added text_time embeddings")):
        with pytest.raises(ModelLoad, match=needle):
            check_model_folder(folder(name, index, unet))


def test_auto_dtype_takes_bf16_only_where_the_gpu_has_it(monkeypatch):
    """torch counts emulated bf16 as supported by default: a T4 or V100 got slow bf16, not fp16."""
    from cns_daemon.model import choose_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert choose_placement("auto", "auto").dtype == want


def test_float32_models_autocast_to_bf16_only_where_the_gpu_has_it(monkeypatch):
    """dtype = float32 on a T4 trained under emulated bf16 (far slower than fp32); and float16 runs
    on the CPU (slow), so a store made on an fp16 GPU from a float32 file opens there too."""
    from cns_daemon.memory import autocast_dtype
    from cns_daemon.model import choose_placement

    assert autocast_dtype(torch.float32, native_bf16=True) == torch.bfloat16
    assert autocast_dtype(torch.float32, native_bf16=False) is None
    for half in (torch.float16, torch.bfloat16):
        assert autocast_dtype(half, native_bf16=False) == half
    assert choose_placement("cpu", "float16").dtype == torch.float16


def test_a_gpu_that_cuda_cannot_use_is_said(monkeypatch, caplog):
    """device = auto fell back to the CPU without a word where an NVIDIA driver is loaded but
    CUDA is not usable (under the systemd unit, a missing /dev/nvidia-uvm); device = cuda said
    "no CUDA GPU is visible" without torch's reason."""
    import logging

    from cns_daemon import model as model_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoad, match=r"no CUDA GPU is usable \(.+\)"):
        model_module.choose_placement("cuda", "auto")
    real_exists = model_module.Path.exists
    for driver, told in ((False, False), (True, True)):
        monkeypatch.setattr(model_module.Path, "exists", lambda self, driver=driver: (
            driver if str(self).startswith(("/proc/driver/nvidia", "/dev/nvidia")) and str(self) != "/dev/nvidia-uvm"
            else False if str(self) == "/dev/nvidia-uvm" else real_exists(self)))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cns_daemon.model"):
            assert model_module.choose_placement("auto", "auto").device.type == "cpu"
        assert ("CUDA is not usable" in caplog.text) == told
        assert ("nvidia-modprobe -u -c=0" in caplog.text) == told


@pytest.mark.slow   # 7 s in a subprocess (CI runs -m slow)
def test_loading_a_model_says_nothing_of_the_libraries_advice():
    """Every start of the service printed transformers' "install torchvision" (which would pull a
    CUDA torch), diffusers' "install accelerate" and progress bars, into its log and the journal."""
    import subprocess
    import sys
    from pathlib import Path

    script = "from cns_daemon.model import load_pipeline; load_pipeline(None, 'cpu', 'float32')"
    out = subprocess.run([sys.executable, "-c", script], cwd=str(Path(__file__).parents[1]),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for said in ("torchvision", "accelerate", "Loading"):
        assert said not in out.stderr + out.stdout, out.stderr


def test_the_tokenizer_is_read_only_from_a_folder_of_this_users(tmp_path, monkeypatch):
    """A review's find: the tokenizer's files were read from /tmp/cones-clip-tokenizer-DIGEST
    whoever had made it, so another local user could plant a vocabulary of theirs there first."""
    import os
    import tempfile

    from cns_daemon import tokenizer

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    tokenizer.tokenizer_folder.cache_clear()
    try:
        mine = tokenizer.tokenizer_folder()
        assert mine.parent == tmp_path and str(os.getuid()) in mine.name
        assert (mine / "vocab.json").is_file() and (mine.stat().st_mode & 0o777) == 0o700
        tokenizer.tokenizer_folder.cache_clear()
        assert tokenizer.tokenizer_folder() == mine   # written once, read back after
        # planted: a folder others may write to (as one of another user's would be to us)
        (mine / "vocab.json").write_text("{}")
        mine.chmod(0o777)
        tokenizer.tokenizer_folder.cache_clear()
        other = tokenizer.tokenizer_folder()
        assert other != mine and (other / "vocab.json").read_text() != "{}"
        assert (other.stat().st_mode & 0o777) == 0o700
        # planted by another user: private, but not ours (seen as a user whose uid is not the
        # folder owner's: the name carries the uid, so the folder is made at that user's name)
        uid = os.getuid() + 1
        theirs = tmp_path / mine.name.replace(f"-{os.getuid()}-", f"-{uid}-")
        mine.chmod(0o700)
        mine.rename(theirs)
        monkeypatch.setattr(tokenizer.os, "getuid", lambda: uid)
        tokenizer.tokenizer_folder.cache_clear()
        assert tokenizer.tokenizer_folder() != theirs
    finally:
        tokenizer.tokenizer_folder.cache_clear()


def test_a_text_encoder_whose_weights_do_not_load_is_refused(tmp_path, tiny_pipe):
    """transformers 5.0-5.5 read the shipped encoder's weights as nothing and drew from random
    values without a word (the service keeps the libraries quiet): prompts were ignored. A
    weights file the encoder class cannot find its weights in is refused by name."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sd"
    tiny_pipe.save_pretrained(folder)
    assert fingerprint(load_pipeline(folder, device="cpu")) == fingerprint(tiny_pipe)   # whole: loads
    weights = next((folder / "text_encoder").glob("*.safetensors"))
    save_file({f"renamed.{k}": v.contiguous() for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ModelLoad, match="text encoder of .* did not load whole with transformers") as info:
        load_pipeline(folder, device="cpu")
    assert "transformers>=5.6" in info.value.hint
