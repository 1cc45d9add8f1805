import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from cns_daemon.memory import MemoryOptions, prepare_generation, training
from cns_daemon.model import Placement
from cns_daemon.settings import load_settings

CPU = Placement(torch.device("cpu"), torch.float32)
CUDA = Placement(torch.device("cuda"), torch.float16)


def test_defaults_per_device_and_overrides():
    assert MemoryOptions.resolve(CPU) == MemoryOptions(sdpa=True)
    cuda = MemoryOptions.resolve(CUDA)
    assert cuda.gradient_checkpointing and cuda.autocast and cuda.offload and cuda.vae_tiling
    assert not MemoryOptions.resolve(CUDA, offload=False, vae_tiling=None).offload
    # autocast is a CUDA feature: asking for it on CPU leaves it off
    assert not MemoryOptions.resolve(CPU, autocast=True).autocast
    assert MemoryOptions.resolve(CPU, gradient_checkpointing=True).gradient_checkpointing


def test_settings_feed_memory_overrides(monkeypatch):
    monkeypatch.setenv("CONES_VAE_TILING", "true")
    s = load_settings(gradient_checkpointing=True)
    opts = MemoryOptions.resolve(CPU, **s.memory_overrides())
    assert opts.vae_tiling and opts.gradient_checkpointing and opts.sdpa


def test_training_context_enables_and_restores(fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    assert not pipe.unet.is_gradient_checkpointing
    with training(pipe, MemoryOptions(gradient_checkpointing=True)):
        assert pipe.unet.is_gradient_checkpointing
        # a checkpointed forward/backward still gives gradients to the K/V weights
        w = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
        pipe.unet.train()
        out = pipe.unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 5, 64)).sample
        out.mean().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
        w.grad = None
    assert not pipe.unet.is_gradient_checkpointing


def test_generation_options_switch_processors_and_tiling(fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    prepare_generation(pipe, MemoryOptions(sdpa=False, vae_tiling=True))
    assert all(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())
    assert pipe.vae.use_tiling
    prepare_generation(pipe, MemoryOptions(sdpa=True, vae_tiling=False))
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert not pipe.vae.use_tiling


def test_engine_applies_configured_memory_options(tmp_path, fresh_tiny_pipe):
    """The service resolves the options from settings at start-up; the generation-side ones are
    on the live pipeline from then on."""
    from cns_daemon.archive import Archive
    from cns_daemon.engine import Engine
    from store.store import ConceptStore

    settings = load_settings(model="tiny", vae_tiling=True, sdpa=False, gradient_checkpointing=True)
    store = ConceptStore.open(tmp_path / "store")
    engine = Engine(settings, store, Archive(tmp_path / "archive"))
    engine.attach(fresh_tiny_pipe)
    assert engine.memory == MemoryOptions(gradient_checkpointing=True, sdpa=False, vae_tiling=True)
    assert fresh_tiny_pipe.vae.use_tiling
    assert all(isinstance(p, AttnProcessor) for p in fresh_tiny_pipe.unet.attn_processors.values())
    store.close()
