"""Memory options for full-size models, applied by configuration.

Learning a concept on SD 1.5 at 512 px needs the whole UNet's activations for backward even
though only K/V elements train; these options trade a little speed for a lot of memory:

- gradient checkpointing (UNet) during learning: activations recomputed in backward;
- attention through PyTorch SDPA (flash / memory-efficient kernels where available);
- fp16/bf16 autocast on CUDA, with the trained values kept as fp32 master copies by the
  methods (they optimise fp32 tensors and write them into the half-precision weights);
- the VAE (and, when the method does not train through it, the text encoder) moved to the CPU
  while the UNet trains: they are only needed before the loop (photos and captions are
  encoded once);
- VAE tiling for generation (decoding large images in tiles).

`None` in Settings means "the default for this device": all on for CUDA, only SDPA on CPU
(there checkpointing costs time and saves little, and nothing can be offloaded further).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from .model import Placement, native_bf16


@dataclass(frozen=True)
class MemoryOptions:
    gradient_checkpointing: bool = False
    sdpa: bool = True
    autocast: bool = False
    offload: bool = False
    vae_tiling: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str) -> "MemoryOptions":
        if torch.device(device).type == "cuda":
            return cls(gradient_checkpointing=True, sdpa=True, autocast=True, offload=True,
                       vae_tiling=True)
        return cls()

    @classmethod
    def resolve(cls, placement: Placement, **overrides: bool | None) -> "MemoryOptions":
        """Device defaults, with every non-None override (from Settings) applied."""
        base = cls.for_device(placement.device)
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown memory options: {sorted(unknown)}")
        values = {f: getattr(base, f) for f in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["autocast"] and placement.device.type != "cuda":
            values["autocast"] = False  # CPU autocast to bf16 is slower and less exact here
        return cls(**values)


def set_attention(unet, sdpa: bool) -> None:
    """PyTorch SDPA processors (fused kernels) or the classic explicit-softmax ones."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def in_effect(opts: MemoryOptions, device) -> list[str]:
    """The options that act on this device (autocast is CUDA's; offloading needs somewhere to
    offload to), for `cones status`: set but idle ones are not claimed."""
    device = torch.device(device)
    idle = {"autocast": device.type != "cuda", "offload": not _can_offload(device)}
    return [f.name for f in fields(opts) if getattr(opts, f.name) and not idle.get(f.name)]


def _can_offload(device: torch.device) -> bool:
    """Offloading moves modules to the CPU; a model already there has nowhere further to go."""
    return device.type != "cpu"


def _park(module: torch.nn.Module, device: torch.device):
    """Move `module` off the accelerator; returns what puts it back."""
    module.to("cpu")
    return lambda: module.to(device)


@contextlib.contextmanager
def training(pipe, opts: MemoryOptions, *, text_encoder_needed: bool = True):
    """Wrap a method's optimisation loop (not its preparation: class images, photo latents and
    frozen caption encodings are made before it): checkpointing, offload and autocast as
    configured; everything is put back on exit (the pipeline serves generations right after).
    The VAE is always offloaded when offload is on (the loop works on cached latents); the text
    encoder only when the method says its loop does not run it."""
    unet = pipe.unet
    device = unet.device
    restores: list = []
    was_ckpt = bool(getattr(unet, "is_gradient_checkpointing", False))
    try:
        if opts.gradient_checkpointing and not was_ckpt:
            unet.enable_gradient_checkpointing(_checkpointed(unet))
        if opts.offload and _can_offload(device):
            for module in (pipe.vae, None if text_encoder_needed else pipe.text_encoder):
                if module is not None:
                    restores.append(_park(module, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dtype = autocast_dtype(unet.dtype, native_bf16()) if opts.autocast and device.type == "cuda" else None
        if dtype is not None:
            with torch.autocast("cuda", dtype=dtype):
                yield
        else:
            yield
    finally:
        if opts.gradient_checkpointing and not was_ckpt:
            unet.disable_gradient_checkpointing()
        for restore in restores:
            restore()


def _checkpointed(unet):
    """diffusers' checkpointing function, with the recomputation run in the context the forward
    had: scoped CNS values are added by hooks that read per-batch state (common/scope.py), which
    has moved on by the time backward recomputes the block."""
    from torch.utils.checkpoint import checkpoint

    from cns_daemon.methods.common.scope import recompute_context

    def run(module, *args):
        again = recompute_context(unet)
        return checkpoint(module.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), again()))

    return run


def loop_context(pipe, opts: "MemoryOptions | None", *, text_encoder_needed: bool = True):
    """`training(...)` for a method's loop, or nothing when no options were given (direct
    library use and tests leave the pipeline exactly as it is)."""
    if opts is None:
        return contextlib.nullcontext()
    return training(pipe, opts, text_encoder_needed=text_encoder_needed)


def prepare_generation(pipe, opts: MemoryOptions) -> None:
    """Generation-side options; applied once when the service loads its model."""
    set_attention(pipe.unet, opts.sdpa)
    # Tiles for images over the VAE's native size, and a batch decoded one image at a time:
    # 16 images of 512 px decoded together need several GB more than one does.
    if opts.vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_tiling()
        pipe.vae.disable_slicing()


def autocast_dtype(model_dtype: torch.dtype, native_bf16: bool) -> torch.dtype | None:
    """What a training loop autocasts to on a GPU: a half model's own precision; for a float32
    model, bf16 where the GPU has it natively, else none. (torch emulates bf16 before Ampere, T4
    and V100: far slower than fp32. A float16 model's loops scale their loss, `LossScale`; fp16
    autocast of a float32 model would take it too, but was never measured on such a GPU.)"""
    if model_dtype in (torch.float16, torch.bfloat16):
        return model_dtype
    return torch.bfloat16 if native_bf16 else None
