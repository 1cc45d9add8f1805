"""Single-file checkpoints (.safetensors / .ckpt) without the network.

diffusers' `from_single_file` takes the weights from the file but each part's configuration
(layer widths, heads, the scheduler) from the Hugging Face hub, so a checkpoint could not be
loaded offline unless it had been loaded online once. The configurations of the two families
StableDiffusionPipeline draws, SD 1.x and SD 2.x, ship in assets/sd/ (the values of the public
diffusers configurations, checked by parameter count in the tests), and the family is told from
the file's tensor names and shapes the way diffusers tells it. Other families (SDXL, inpainting,
SD 3, ...) are refused by name: this pipeline cannot draw them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from .api.errors import ModelLoad
from .tokenizer import clip_tokenizer

log = logging.getLogger(__name__)
SD_CONFIGS = Path(__file__).parent / "assets" / "sd"
FAMILIES = ("v1", "v2")   # diffusers' names for Stable Diffusion 1.x and 2.x
UNSUPPORTED_HINT = ("cones draws with Stable Diffusion 1.x and 2.x models (a 2.x-base one from its "
                    "diffusers folder); point `model` at one of those.")


def _tensor_shapes(path: Path) -> dict[str, SimpleNamespace]:
    """Each tensor's name and shape, without reading the weights: the safetensors header, or a
    .ckpt mapped onto the meta device."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: SimpleNamespace(shape=tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    state = torch.load(str(path), map_location="meta", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoints nest it
        state = state["state_dict"]
    return {k: SimpleNamespace(shape=tuple(v.shape)) for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def family(path: Path) -> str:
    """"v1" or "v2", as diffusers would classify the file; anything else is refused."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        shapes = _tensor_shapes(path)
    except Exception as exc:  # a cut or foreign file: safetensors and torch raise many kinds
        text = str(exc).strip()
        if "Unsupported global" in text:   # a pickle holding objects besides tensors
            raise ModelLoad(f"{path} holds Python objects besides its weights, and cones does not run "
                            "the code a .ckpt may carry.", "Use the model's .safetensors release, or "
                            "its diffusers folder.") from exc
        reason = (type(exc).__name__ if not text or "Weights only load failed" in text
                  else text.splitlines()[0].rstrip("."))   # torch's advice to unpickle is not ours
        raise ModelLoad(f"{path} cannot be read as a checkpoint: {reason}.",
                        "Check that the file is whole (its size against the download's) and is a "
                        "Stable Diffusion checkpoint.") from exc
    if not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise ModelLoad(f"{path} holds no Stable Diffusion UNet (no model.diffusion_model.* tensors): "
                        "it may be a LoRA, an embedding or a VAE alone.", UNSUPPORTED_HINT)
    kind = infer_diffusers_model_type(shapes)
    if kind not in FAMILIES:
        raise ModelLoad(f"{path} is a {kind!r} checkpoint (as diffusers classifies it).", UNSUPPORTED_HINT)
    return kind


def config_folder(kind: str) -> Path:
    """The diffusers configuration folder of a family (no weights in it)."""
    return SD_CONFIGS / kind


def tokenizer(kind: str):
    """The family's tokenizer: CLIP's vocabulary for both; SD 2.x pads with "!" as OpenCLIP does."""
    tok = clip_tokenizer()
    if kind == "v2":
        tok.pad_token = "!"
    return tok


def load(path: Path, **kwargs):
    """The pipeline of a single-file checkpoint, every configuration read from this package
    (`kwargs` go to diffusers: dtype, parts left out)."""
    from diffusers import StableDiffusionPipeline

    kind = family(path)
    if kind == "v2":   # the file does not say which; diffusers online reads it the same way
        log.warning("%s is read as Stable Diffusion 2.1 (768 px, v-prediction); a 2.x-base model "
                    "(512 px, epsilon) draws noise so: give its diffusers folder instead", path)
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder(kind)), local_files_only=True,
        tokenizer=tokenizer(kind), **kwargs)
