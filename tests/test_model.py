import pytest
import torch

from cns_daemon.api.errors import ModelLoad
from cns_daemon.model import build_tiny_pipeline, fingerprint, kv_weights, load_pipeline
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


def test_single_file_checkpoint_is_routed_to_from_single_file(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    seen = {}

    def fake(cls, path, **kw):
        seen["path"] = path
        raise RuntimeError("not a real checkpoint")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(fake))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoad, match="Could not load the model"):
        load_pipeline(ckpt, device="cpu")
    assert seen["path"] == str(ckpt)


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


def test_offline_single_file_and_a_mistyped_path_say_what_happened(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def offline(cls, path, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'... check your internet connection")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(offline))
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(offline))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoad, match="configuration from the Hugging Face hub"):
        load_pipeline(ckpt, device="cpu")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoad, match="There is no folder") as info:
        load_pipeline("models/mysd", device="cpu")
    assert str(tmp_path / "models" / "mysd") in info.value.message and "absolute path" in info.value.hint
