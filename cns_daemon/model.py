"""Loading the base model, building the tiny test model, and fingerprinting either.

The service owns one diffusers StableDiffusionPipeline. It comes from a diffusers folder, a
single-file checkpoint (.safetensors/.ckpt, through diffusers' own `from_single_file`, offline:
see checkpoint.py), or, when
nothing is configured, the toy-world fixture shipped in the package. Tests build a tiny pipeline
of the same architecture from configs with seeded random weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .api.errors import ModelLoad
from .tokenizer import clip_tokenizer

log = logging.getLogger(__name__)

TOYWORLD_MODEL = Path(__file__).parent / "toyworld" / "model"

# Classifier-free guidance scale when the model folder says nothing: the papers' (and SD's) 7.5.
# A diffusers folder may carry `cones.json` with {"guidance_scale": x}: the shipped toy-world
# fixture does, because its CFG sweet spot was measured lower (docs/tuning.md).
DEFAULT_GUIDANCE_SCALE = 7.5
# Denoising steps of a generate that does not say; `cones.json` may name the model's own
# {"steps": n} (the fixture's 20: what its figures in docs/tuning.md are measured at).
DEFAULT_SAMPLE_STEPS = 30
MODEL_NOTES = "cones.json"

# Scene phrases CNS's `background scenes` adds to the photos' captions, so a concept learns to
# leave the rest of the picture to the prompt's words. Generic places for real models; a model
# with a small vocabulary (the toy-world fixture) names its own in cones.json {"scenes": [...]}.
DEFAULT_SCENES: tuple[str, ...] = (
    "on the beach", "in the snow", "on the grass", "in a forest", "in a city street",
    "on a wooden table", "in a kitchen", "at night", "in the rain", "on a white background")


def recommended_guidance(pipe) -> float:
    """The CFG scale generation and class images use unless asked otherwise."""
    return float(getattr(pipe, "cones_guidance_scale", DEFAULT_GUIDANCE_SCALE))


def recommended_steps(pipe) -> int:
    """The denoising steps generation uses unless asked otherwise."""
    return int(getattr(pipe, "cones_steps", DEFAULT_SAMPLE_STEPS))


def scene_phrases(pipe) -> tuple[str, ...]:
    """The scene phrases this model's concepts are trained with (see DEFAULT_SCENES)."""
    return tuple(getattr(pipe, "cones_scenes", DEFAULT_SCENES))


def _model_notes(folder: Path) -> dict:
    f = folder / MODEL_NOTES
    if not f.is_file():
        return {}
    hint = ('It should hold {"guidance_scale": 7.5} and may name {"steps": 30} and '
            '{"scenes": ["on the beach", ...]}.')
    try:
        notes = json.loads(f.read_text())
        scale = float(notes.get("guidance_scale", DEFAULT_GUIDANCE_SCALE))
        steps = notes.get("steps", DEFAULT_SAMPLE_STEPS)
        scenes = notes.get("scenes", list(DEFAULT_SCENES))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelLoad(f"{f} is not valid: {exc}", hint) from exc
    if not 1.0 <= scale <= 30.0:
        raise ModelLoad(f"{f}: guidance_scale {scale} is outside 1..30.")
    if isinstance(steps, float) and steps.is_integer():   # 30.0, as some tools write numbers
        steps = int(steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 999:
        raise ModelLoad(f"{f}: steps {steps!r} is not a whole number from 2 to 999.", hint)
    if not (isinstance(scenes, list) and scenes and all(isinstance(x, str) and x.strip() for x in scenes)):
        raise ModelLoad(f"{f}: scenes must be a non-empty list of phrases.", hint)
    return {"guidance_scale": scale, "steps": steps, "scenes": tuple(scenes)}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def choose_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """CUDA with bf16 (or fp16 where bf16 is unsupported) when present, else CPU fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and Path("/proc/driver/nvidia/version").exists():
            _say_gpu_unused()
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoad(f"device=cuda was asked for but no CUDA GPU is usable ({_cuda_reason()}).",
                        "Set device to `auto` or `cpu`, or check the GPU driver.")
    if dtype == "auto":
        # native bf16 only: before Ampere (T4, V100) it is emulated, far slower than fp16
        dtype = ("bfloat16" if native_bf16() else "float16") if device == "cuda" else "float32"
    # float16 on the CPU is slow but runs: it is how a store made on an fp16 GPU from a float32
    # file is opened there (its fingerprint is the fp16 load's; see `fingerprints`).
    return Placement(torch.device(device), getattr(torch, dtype))


def _cuda_reason() -> str:
    """Why CUDA is not available, in torch's words (is_available only says that it is not)."""
    try:
        torch.cuda.init()
    except Exception as exc:   # RuntimeError, AssertionError ("not compiled with CUDA"), ...
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "no device found"


def _say_gpu_unused() -> None:
    """An NVIDIA driver is loaded but CUDA is not usable here: the likeliest cause under the
    systemd unit is /dev/nvidia-uvm, which the first CUDA program makes through the setuid
    nvidia-modprobe, and the unit's NoNewPrivileges forbids it. Said, not silently slow."""
    uvm = "" if Path("/dev/nvidia-uvm").exists() else (
        " /dev/nvidia-uvm is missing: run `nvidia-modprobe -u -c=0` (or any CUDA program) once "
        "after boot, then restart the service; under systemd it cannot load the module itself.")
    log.warning("An NVIDIA driver is loaded, but CUDA is not usable by this process (is the torch "
                "installed a CUDA build? `python -c 'import torch; print(torch.version.cuda)'`): "
                "running on the CPU.%s Set device = cuda to be told the reason instead.", uvm)


def native_bf16() -> bool:
    """Whether the GPU computes in bf16 itself (Ampere on); torch counts emulation too by default."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _common_kwargs(dtype: torch.dtype) -> dict:
    return dict(dtype=dtype, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def quiet_libraries() -> None:
    """transformers and diffusers said their advice on every start of the service, into its log
    and the journal: install torchvision (which would pull a CUDA torch: pyproject.toml) and
    accelerate, both needless here, and drew progress bars. Errors still show."""
    import diffusers.utils.logging as diffusers_log
    import transformers.utils.logging as transformers_log

    for lib in (transformers_log, diffusers_log):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def load_pipeline(model: str | Path | None = None, device: str = "auto", dtype: str = "auto"):
    """Load the configured base model. `None` means the shipped toy-world fixture."""
    quiet_libraries()   # before diffusers' pipelines import transformers' image processors
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    place = choose_placement(device, dtype)
    source = Path(model).expanduser() if model is not None else TOYWORLD_MODEL
    hub = False
    try:
        if source.is_file() and source.suffix != source.suffix.lower() and source.suffix.lower() in (
                ".safetensors", ".ckpt"):   # diffusers tells the format by the lower-case suffix
            raise ModelLoad(f"{source.absolute()} ends in {source.suffix}: diffusers reads the format from "
                            "a lower-case suffix.", f"Rename it to end in {source.suffix.lower()}.")
        if source.is_file() and source.suffix in (".safetensors", ".ckpt"):
            pipe = checkpoint.load(source, **_common_kwargs(place.dtype))
        elif source.is_dir():
            check_model_folder(source)
            pipe = StableDiffusionPipeline.from_pretrained(str(source), local_files_only=True,
                                                           **_text_encoder(source, place.dtype),
                                                           **_common_kwargs(place.dtype))
        elif model is not None and not source.exists() and "/" in str(model) and not str(model).startswith(("/", ".", "~")):
            # A hub id ("org/name"): allowed for real users, never used by tests.
            hub = True
            pipe = StableDiffusionPipeline.from_pretrained(str(model), **_common_kwargs(place.dtype))
        elif source.is_file():
            raise ModelLoad(f"{source.absolute()} is not a .safetensors or .ckpt checkpoint.", FOLDER_HINT)
        else:
            raise ModelLoad(f"No model at {source.absolute()}.")
    except ModelLoad:
        raise
    except Exception as exc:  # diffusers raises many kinds; the user needs one sentence
        raise _load_error(model, source, exc, hub) from exc
    check_tokenizer(pipe, source)
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if source.is_dir():
        notes = _model_notes(source)
        pipe.cones_guidance_scale = notes.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
        pipe.cones_steps = notes.get("steps", DEFAULT_SAMPLE_STEPS)
        pipe.cones_scenes = notes.get("scenes", DEFAULT_SCENES)
    return pipe.to(place.device)


def _text_encoder(folder: Path, dtype: torch.dtype) -> dict:
    """The folder's CLIP text encoder (as the pipeline's keyword; none for another class, which
    the pipeline loads itself), refused unless every weight it needs was in its file.
    transformers 5.0-5.5 read the shipped model's encoder (saved by a later 5.x, its weight
    names without `text_model.`) as nothing and started it from random values, without a word
    where the service keeps the libraries quiet: prompts were then ignored."""
    from transformers import CLIPTextModel
    from transformers import __version__ as transformers_version

    entry = _json(folder / "model_index.json").get("text_encoder")
    if not (isinstance(entry, list) and entry[1:] == ["CLIPTextModel"]):
        return {}   # (diffusers says what is wrong with an entry it cannot load)
    encoder, info = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True,
                                                  dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelLoad(f"The text encoder of {folder} did not load whole with transformers "
                        f"{transformers_version}: {len(missing)} of its weights were not found in its "
                        f"file (such as {missing[0]}), so it would draw from random values.",
                        "Install a transformers that reads it (cones needs 5.6 or later): "
                        "pip install -U 'transformers>=5.6'.")
    return {"text_encoder": encoder}


MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FOLDER_HINT = ("Point `model` at a diffusers folder (model_index.json with unet/, vae/, text_encoder/, "
               "tokenizer/ and scheduler/ beside it) or at a .safetensors/.ckpt checkpoint.")


def check_model_folder(folder: Path) -> None:
    """A diffusers Stable Diffusion folder, whole: said before diffusers reports the first file
    it misses without naming the part it belongs to."""
    if not (folder / "model_index.json").is_file():
        raise ModelLoad(f"{folder} is not a diffusers model folder (it has no model_index.json).", FOLDER_HINT)
    missing = [p for p in MODEL_PARTS if not (folder / p).is_dir()]
    if missing:
        raise ModelLoad(f"The model folder {folder} has no {', '.join(p + '/' for p in missing)}.", FOLDER_HINT)
    # Another family loads as Stable Diffusion without a word (diffusers reads the parts, not the
    # pipeline's name) and fails in the first job on a tensor shape: an inpainting UNet (9 input
    # channels), SDXL (two text encoders, added embeddings), an image-variation pipeline.
    index = _json(folder / "model_index.json")
    unet = _json(folder / "unet" / "config.json")
    kind = index.get("_class_name", "StableDiffusionPipeline")
    if kind != "StableDiffusionPipeline" or unet.get("in_channels", 4) != 4 or unet.get("addition_embed_type"):
        what = kind if kind != "StableDiffusionPipeline" else (
            f"a UNet with {unet.get('in_channels')} input channels" if unet.get("in_channels", 4) != 4
            else f"a UNet with added {unet.get('addition_embed_type')} embeddings")
        raise ModelLoad(f"The model folder {folder} holds {what}, not a Stable Diffusion 1.x/2.x "
                        "text-to-image model.", "Point `model` at a Stable Diffusion 1.5 or 2.x model.")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}   # diffusers says what is wrong with it when it reads it
    return value if isinstance(value, dict) else {}


def check_tokenizer(pipe, source: Path) -> None:
    """A CLIP tokenizer (tens of thousands of words, 77 positions): diffusers builds a stand-in
    of two words when the folder's is broken, and every prompt then fails deep in a job."""
    tok = pipe.tokenizer
    if len(tok) < 1000 or not 8 <= int(tok.model_max_length) <= 4096:
        raise ModelLoad(f"The model at {source} has no usable CLIP tokenizer ({len(tok)} words, "
                        f"{tok.model_max_length} positions).", FOLDER_HINT)


def _load_error(model, source: Path, exc: Exception, hub: bool) -> ModelLoad:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if hub:
        return ModelLoad(f"There is no folder {source.absolute()}, and {model!r} could not be loaded "
                         f"as a Hugging Face hub id: {text}",
                         "Check the path: a relative one is read from the folder the service starts "
                         "in; give an absolute path.")
    if source.is_file():
        return ModelLoad(f"Could not load the checkpoint {source}: {text}",
                         "cones reads single files of Stable Diffusion 1.x and 2.x as published "
                         "(the configurations ship with it); a model of another shape needs its "
                         "diffusers folder.")
    return ModelLoad(f"Could not load the model from {source}: {text}")


def build_tiny_pipeline(seed: int = 0, sample_size: int = 16, *, width: int = 64,
                        blocks: tuple[int, int] = (32, 64), heads: int | tuple[int, ...] = 8,
                        text_layers: int = 2, text_ffn: int | None = None):
    """A tiny SD-architecture pipeline with seeded random weights (tests, benches).

    Same structure as SD 1.x: UNet2DConditionModel with cross-attention at two resolutions
    (so `attn2.to_k`/`to_v` exist), AutoencoderKL with a 4-channel latent and a 2x downsample,
    CLIPTextModel with the real CLIP tokenizer and its full 49,408-token vocabulary.
    `heads` is the attention head count, one for all blocks or one per block (diffusers names
    it `attention_head_dim`); on a CPU fewer, wider heads train faster at this size. `width` is
    the text encoder's width (= the UNet's cross-attention width), `text_ffn` its MLP width
    (default 2 x width).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=blocks, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
        attention_head_dim=heads if isinstance(heads, int) else tuple(heads), norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=sample_size * 2)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=text_ffn or width * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, projection_dim=width))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, **{
                                       k: v for k, v in _common_kwargs(torch.float32).items()
                                       if k != "dtype"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kv_weights(unet) -> dict[str, torch.nn.Parameter]:
    """The cross-attention key/value projections ("neurons" live here), by parameter name."""
    return {name: p for name, p in unet.named_parameters()
            if ".attn2.to_k." in name or ".attn2.to_v." in name}


# Config keys that record how or where a model was saved/loaded, not what it computes.
_VOLATILE_KEYS = {"name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                  "output_hidden_states", "output_attentions", "return_dict", "use_cache"}


def _architecture(config) -> dict:
    return {k: v for k, v in dict(config).items()
            if not k.startswith("_") and k not in _VOLATILE_KEYS}


# The digest's forms: the current one reads the weights at bf16 precision ("bf16"); stores and
# exports made before carry the fp32 bytes of the weights as loaded ("fp32"), and a bf16 load of
# the model gave the fp32 bytes of its weights rounded to bf16 ("fp32-of-bf16").
DIGEST_FORMS = ("bf16", "fp32", "fp32-of-bf16")


def fingerprints(pipe, forms: tuple[str, ...] = DIGEST_FORMS) -> tuple[str, ...]:
    """A stable digest of what the concept records depend on, in each of `forms`, read in one pass
    over the weights: the model configs, the cross-attention K/V weights and the token
    embeddings. Identical for two loads of the same model; a change to those weights that bf16
    can represent changes it. Excluded: weights concepts never touch.

    The current form reads the weights at bf16 precision, so one model file loaded in fp32 (the
    CPU) and in bf16 (a GPU, `device = "auto"`) gives one digest and one store serves both:
    rounding fp32 to bf16 is what the bf16 load itself does. (An fp32 file loaded in fp16 still
    differs: fp16 rounds first, and its range is smaller.) The two older forms are accepted as
    the same model's (`ConceptStore.bind` aliases)."""
    unknown = set(forms) - set(DIGEST_FORMS)
    if unknown:
        raise ValueError(f"unknown digest forms {sorted(unknown)}")
    hashers = {form: hashlib.sha256() for form in forms}
    head = b"".join(json.dumps(_architecture(part), sort_keys=True, default=str).encode()
                    for part in (pipe.unet.config, pipe.text_encoder.config.to_dict(), pipe.vae.config))
    tensors = dict(sorted(kv_weights(pipe.unet).items()))
    tensors["text.token_embedding"] = pipe.text_encoder.get_input_embeddings().weight
    for h in hashers.values():
        h.update(head)
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        rounded = t.to(torch.bfloat16) if {"bf16", "fp32-of-bf16"} & hashers.keys() else None
        # hashlib reads the array's buffer directly: no copy of (for SD 1.5) ~230 MB in fp32.
        views = {"bf16": lambda: rounded.view(torch.int16),
                 "fp32": lambda: t.to(torch.float32),
                 "fp32-of-bf16": lambda: rounded.to(torch.float32)}
        for form, h in hashers.items():
            h.update(name.encode())
            h.update(views[form]().contiguous().numpy())
    return tuple(hashers[form].hexdigest()[:32] for form in forms)


def fingerprint(pipe) -> str:
    """The current digest of the weights as they are now (`fingerprints`)."""
    return fingerprints(pipe, ("bf16",))[0]


_BASE_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def base_fingerprints(pipe) -> tuple[str, ...]:
    """`fingerprints` of the base weights in every form, taken on the first call for this
    pipeline and kept: that call must come before any concept is written into the weights (the
    engine makes it at start-up, a resident method's bookkeeping when it is created). Stores and
    class-image caches are keyed by the first (current) form."""
    fps = _BASE_FINGERPRINTS.get(pipe.unet)
    if fps is None:
        fps = _BASE_FINGERPRINTS[pipe.unet] = fingerprints(pipe)
    return fps


def base_fingerprint(pipe) -> str:
    """The current form of `base_fingerprints`."""
    return base_fingerprints(pipe)[0]
