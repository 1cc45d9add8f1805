import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from cns_daemon.memory import MemoryOptions, prepare_generation, training
from cns_daemon.model import Placement
from cns_daemon.api.settings import load_settings

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
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    prepare_generation(pipe, MemoryOptions(sdpa=True, vae_tiling=False))
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing


def test_engine_applies_configured_memory_options(tmp_path, fresh_tiny_pipe):
    """The service resolves the options from settings at start-up; the generation-side ones are
    on the live pipeline from then on."""
    from cns_daemon.archive import Archive
    from cns_daemon.engine import Engine
    from cones_store.store import ConceptStore

    settings = load_settings(model="tiny", vae_tiling=True, sdpa=False, gradient_checkpointing=True,
                             autocast=True, offload=True)
    store = ConceptStore.open(tmp_path / "store")
    engine = Engine(settings, store, Archive(tmp_path / "archive"))
    engine.attach(fresh_tiny_pipe)
    assert engine.memory == MemoryOptions(gradient_checkpointing=True, sdpa=False, vae_tiling=True,
                                          offload=True)   # autocast: fp32 weights have no half
    # what `cones status` says acts: autocast and offloading do nothing on the CPU
    assert engine.memory_in_effect == ["gradient_checkpointing", "vae_tiling"]
    assert fresh_tiny_pipe.vae.use_tiling
    assert all(isinstance(p, AttnProcessor) for p in fresh_tiny_pipe.unet.attn_processors.values())
    store.close()


def _parking_spy(monkeypatch):
    """Make `training` offload on the CPU too, with 'parked' modules that fail loudly if they
    run: a method whose loop still used the VAE (or a text encoder it said it does not need)
    would raise. Returns the names of the modules parked."""
    import cns_daemon.memory as memory

    parked: list[str] = []

    def park(module, device):
        def refuse(*_):
            raise AssertionError(f"{type(module).__name__} ran while offloaded")
        handles = [m.register_forward_pre_hook(refuse) for m in module.modules()]
        parked.append(type(module).__name__)
        return lambda: [h.remove() for h in handles]

    monkeypatch.setattr(memory, "_can_offload", lambda device: True)
    monkeypatch.setattr(memory, "_park", park)
    return parked


@pytest.mark.parametrize("method, expected", [("cns", ["AutoencoderKL"]),
                                              # Cones: A2's walk, then training the values
                                              ("cones", ["AutoencoderKL", "CLIPTextModel"] * 2),
                                              ("cones2", ["AutoencoderKL"])])
def test_methods_loops_run_with_vae_and_unneeded_encoder_offloaded(method, expected, fresh_tiny_pipe,
                                                                   tmp_path, monkeypatch):
    from cns_daemon.methods import LearnSpec, cns, get_method
    from helpers.methods import CONES, FAST, fixed_selection, photos

    monkeypatch.setattr(cns, "choose_neurons", fixed_selection(0.02, 0))
    parked = _parking_spy(monkeypatch)
    options = {"cns": FAST, "cones": CONES, "cones2": {"reg_batch": 4}}[method]
    spec = LearnSpec("x", "star", steps=2, options=options, cache_dir=tmp_path,
                     memory=MemoryOptions(offload=True))
    record = get_method(method).learn(fresh_tiny_pipe, photos(tmp_path / "p"), spec, None, None)
    assert record.meta.method == method
    assert parked == expected
    # and everything is back in service afterwards: the parked modules run again
    fresh_tiny_pipe.vae.decode(torch.zeros(1, 4, 16, 16))
    fresh_tiny_pipe.text_encoder(torch.zeros(1, 5, dtype=torch.long))


def test_no_memory_options_leave_the_loop_alone(fresh_tiny_pipe, tmp_path, monkeypatch):
    from cns_daemon.methods import LearnSpec, get_method
    from helpers.methods import CONES, photos

    parked = _parking_spy(monkeypatch)
    get_method("cones").learn(fresh_tiny_pipe, photos(tmp_path / "p"),
                              LearnSpec("x", "star", steps=1, options=CONES,
                                        cache_dir=tmp_path), None, None)
    assert parked == []


@pytest.mark.parametrize("scope", ["concept", "all"])
def test_cns_learns_the_same_with_gradient_checkpointing(fresh_tiny_pipe, tmp_path, monkeypatch, scope):
    """Checkpointing recomputes the UNet's blocks in backward, after the step's forward has
    left its prompt scope: the scope's hooks must see the same rows then (CUDA's default)."""
    from cns_daemon.methods import LearnSpec, cns, get_method
    from helpers.methods import FAST, fixed_selection, photos

    monkeypatch.setattr(cns, "choose_neurons", fixed_selection(0.02, 0))
    pics = photos(tmp_path / "p")
    values = []
    for ckpt in (False, True):
        spec = LearnSpec(f"x{int(ckpt)}", "star", steps=3, options={**FAST, "scope": scope},
                         cache_dir=tmp_path, memory=MemoryOptions(gradient_checkpointing=ckpt))
        record = get_method("cns").learn(fresh_tiny_pipe, pics, spec, None, None)
        values.append({n: np.asarray(d.values, np.float32) for n, d in record.deltas.items()})
        get_method("cns").unlearn(fresh_tiny_pipe, record.name)
    assert values[0].keys() == values[1].keys()
    for name in values[0]:
        assert np.allclose(values[0][name], values[1][name], atol=1e-3), name
