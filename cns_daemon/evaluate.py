"""CLIP-I / CLIP-T, the papers' metrics for real models (Cones §4.1, CNS §5.1).

- CLIP-I (image alignment): cosine similarity between the CLIP image embedding of a generated
  image and that of each of the concept's own photos, averaged over all pairs. For a prompt with
  several concepts, computed per concept and then averaged over the concepts.
- CLIP-T (text alignment): cosine similarity between the generated image's embedding and the
  text embedding of the prompt with each concept's token removed (`<rex>` → its class word, so
  "a photo of <rex> on the beach" is scored against "a photo of dog on the beach").

Two CLIP back-ends behind one small interface:
- open_clip (the `eval` extra): what users with real models run. Weights come from a local file
  (`--clip-weights PATH`) or open_clip's own cache; the hub is switched off while loading, so a
  missing file is an immediate, clear error, never a hang.
- transformers' CLIPModel from a local folder: the same metric without torchvision (open_clip
  imports torchvision, which has no CPU build matching the project's torch), and what the tests
  use with a tiny randomly initialised model built from a config.

Images are preprocessed here (resize shorter side, center crop, CLIP mean/std), identically for
both back-ends, so no torchvision transform is needed.
"""
from __future__ import annotations

import importlib.util
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from .api.errors import BadInput, ModelLoad, Unavailable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS_FILE = Path(__file__).parent / "eval_prompts.txt"
CONCEPT_REF = re.compile(r"<([^<>\s]*)>")


class ClipScorer(Protocol):
    """Unit-norm embeddings for images and texts (one row each)."""

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def preprocess(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """CLIP's preprocessing: bicubic resize of the shorter side, center crop, normalise."""
    out = []
    for im in images:
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append((arr - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


def _unit(x) -> torch.Tensor:
    x = getattr(x, "pooler_output", x)  # transformers 5 wraps projected features
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


class HFClipScorer:
    """transformers' CLIPModel + CLIPTokenizer (a local folder, or a model object in tests)."""

    def __init__(self, model, tokenizer, image_size: int | None = None, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)   # the generating model's device: a GPU host scored on the CPU
        self.tokenizer = tokenizer
        self.image_size = image_size or model.config.vision_config.image_size

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu") -> "HFClipScorer":
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder).expanduser()
        hint = ("Give a folder saved with transformers' CLIPModel.save_pretrained, or a "
                ".pt/.bin/.safetensors file of open_clip weights with --clip.")
        if not (folder / "config.json").exists():
            raise ModelLoad(f"No CLIP model at {folder}.", hint)
        try:
            model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True,
                                                    output_loading_info=True)
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:   # no weights file, a config of another model, ...
            raise ModelLoad(f"{folder} is not a CLIP model folder: {str(exc).splitlines()[0]}", hint) from None
        # Scores from weights made up on loading would be stored as if they meant something.
        if info.get("missing_keys") or len(tokenizer) < 1000:
            raise ModelLoad(f"{folder} is not a whole CLIP model ({len(info.get('missing_keys', []))} "
                            f"weights missing, a tokenizer of {len(tokenizer)} words).", hint)
        return cls(model, tokenizer, device=device)

    @torch.no_grad()
    def embed_images(self, images):
        pixels = preprocess(images, self.image_size).to(_device_of(self.model))
        return _unit(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def embed_texts(self, texts):
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        device = _device_of(self.model)
        return _unit(self.model.get_text_features(input_ids=tok.input_ids.to(device),
                                                  attention_mask=tok.attention_mask.to(device)))


@contextmanager
def _hub_offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class OpenClipScorer:
    """open_clip model; `weights` is a local file or an open_clip pretrained tag in its cache."""

    def __init__(self, model_name: str = "ViT-L-14", weights: str | None = None,
                 device: str | torch.device = "cpu"):
        try:
            import open_clip
        except Exception as exc:  # ImportError, or torchvision failing to load its ops
            raise Unavailable(f"open_clip could not be imported ({exc}).", OPEN_CLIP_HINT) from exc
        if weights and _looks_like_path(weights):
            if not Path(weights).expanduser().is_file():   # a file named that is not there: input
                raise BadInput(f"No CLIP weights file at {weights}.",
                                f"Put the {model_name} weights file there, or pass its path "
                                "with --clip-weights.")
        try:
            with _hub_offline():
                model, _, _ = open_clip.create_model_and_transforms(
                    model_name, pretrained=weights or "openai")
        except Exception as exc:
            raise ModelLoad(f"Could not load open_clip {model_name} ({exc}).",
                            "Download its weights once into open_clip's cache, or pass a local "
                            "file with --clip-weights PATH.") from exc
        self.model = model.eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size

    @torch.no_grad()
    def embed_images(self, images):
        return _unit(self.model.encode_image(preprocess(images, self.image_size).to(_device_of(self.model))))

    @torch.no_grad()
    def embed_texts(self, texts):
        return _unit(self.model.encode_text(self.tokenizer(list(texts)).to(_device_of(self.model))))


def load_scorer(clip: str = "ViT-L-14", weights: str | None = None,
                device: str | torch.device = "cpu") -> ClipScorer:
    """A transformers folder (has config.json) → HFClipScorer; anything else → open_clip. On
    `device` (the generating model's), scores on the CPU."""
    if check_scorer(clip, weights) == "transformers":
        return HFClipScorer.from_folder(weights, device)
    return OpenClipScorer(clip, weights, device)


def check_scorer(clip: str, weights: str | None) -> str:
    """Which scorer `load_scorer` makes ("transformers" or "open_clip"), or the error it would
    meet before loading anything: called when an eval is asked for too, so a missing open_clip
    or weights file is said then, not after the learns queued before it."""
    if weights and (Path(weights).expanduser() / "config.json").exists():
        return "transformers"
    if weights and _looks_like_path(weights) and not Path(weights).expanduser().exists():
        # said before importing open_clip: a wrong path is the user's first problem to fix
        raise BadInput(f"No CLIP weights at {weights}.",
                       f"Check the --clip-weights path, or put the {clip} weights file (or a "
                       "transformers CLIP folder) there.")
    if weights and Path(weights).expanduser().is_dir():   # open_clip wants a file: "not importable" misled
        raise BadInput(f"{weights} is a folder without a config.json: not a transformers CLIP folder.",
                       "Give a transformers CLIP folder (saved with save_pretrained) or an open_clip "
                       "weights file.")
    if importlib.util.find_spec("open_clip") is None:
        raise Unavailable("open_clip is not installed.", OPEN_CLIP_HINT)
    return "open_clip"


OPEN_CLIP_HINT = ("Install the eval extra: pip install 'cones[eval]' (needs a torchvision matching "
                  "your torch), or pass a transformers CLIP folder with --clip-weights.")


def _looks_like_path(weights: str) -> bool:
    """A path rather than an open_clip pretrained tag such as 'openai' or 'laion2b_s32b_b82k'."""
    return "/" in weights or os.sep in weights or weights.endswith((".pt", ".bin", ".safetensors"))


# ---- the metrics -------------------------------------------------------------------------

def clip_i(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity over all (generated, reference) pairs; inputs are unit rows."""
    return float((generated @ references.T).mean())


def clip_t(generated: torch.Tensor, text: torch.Tensor) -> float:
    """Mean cosine similarity of each generated image with the prompt's text embedding."""
    return float((generated @ text.reshape(-1, 1)).mean())


def strip_concepts(prompt: str, class_words: dict[str, str]) -> str:
    """The prompt with each `<name>` replaced by that concept's class word."""
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in class_words:
            raise BadInput(f"Prompt names <{name}>, which is not being evaluated.",
                           "Evaluate every concept the prompt names.")
        return class_words[name]
    return " ".join(CONCEPT_REF.sub(sub, prompt).split())


def default_prompts() -> list[str]:
    """Shipped prompt templates; `{}` marks where the concept reference goes."""
    lines = PROMPTS_FILE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def load_prompts(path: str | Path | None) -> list[str]:
    if path is None:
        return default_prompts()
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInput(f"No prompt file at {p}.", "Give a text file with one prompt per line; "
                       "`{}` marks where the concept goes.")
    prompts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not prompts:
        raise BadInput(f"The prompt file {p} has no prompts.", "Write one prompt per line.")
    return prompts


@dataclass
class PromptScore:
    prompt: str
    clip_i: float
    clip_t: float
    per_concept_clip_i: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    clip_i: float
    clip_t: float
    n_images: int
    prompts: list[PromptScore]

    def summary(self) -> dict:
        return {"clip_i": round(self.clip_i, 4), "clip_t": round(self.clip_t, 4),
                "n_images": self.n_images, "n_prompts": len(self.prompts)}


def fill(template: str, names: Sequence[str]) -> str:
    """Put the concept references into a template: `{}` takes all of them joined by "and"."""
    refs = " and ".join(f"<{n}>" for n in names)
    return template.replace("{}", refs) if "{}" in template else f"{template} {refs}"


def evaluate(generate: Callable[[str, int], list[Image.Image]], photos: dict[str, list[Image.Image]],
             class_words: dict[str, str], prompts: Sequence[str], n: int,
             scorer: ClipScorer, progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Generate `n` images per prompt with every concept in `photos`, and score them.

    `generate(prompt, n)` is the service's generation routine (it expands `<name>`).
    """
    if not photos:
        raise BadInput("Nothing to evaluate.", "Name at least one concept.")
    refs = {name: scorer.embed_images(ims) for name, ims in photos.items()}
    scores: list[PromptScore] = []
    total = len(prompts)
    for i, template in enumerate(prompts):
        prompt = fill(template, list(photos))
        gen = scorer.embed_images(generate(prompt, n))
        per = {name: clip_i(gen, ref) for name, ref in refs.items()}
        text = scorer.embed_texts([strip_concepts(prompt, class_words)])
        scores.append(PromptScore(prompt, float(np.mean(list(per.values()))), clip_t(gen, text), per))
        if progress:
            progress(i + 1, total)
    return EvalResult(float(np.mean([s.clip_i for s in scores])),
                      float(np.mean([s.clip_t for s in scores])), n * len(scores), scores)
