"""The toy world: attribute vocabularies, scene specs, the renderer and the captions.

Photos are 32x32 RGB (the fixture model's VAE maps them to 16x16x4 latents). Everything is drawn
4x supersampled and box-filtered down, so edges are anti-aliased and patterns survive as soft
texture rather than aliasing noise. The world is kept deliberately easy to learn at that size:
saturated, well-separated colours; big objects (single objects span 19-24 px); coarse patterns
(3-in-6 px stripes, 4 px checks, dots of radius 1.7 px on a 6 px grid, inside a 1.5 px rim of
the main colour), each drawn straight (axis-aligned) or diagonal (turned 45 degrees);
backgrounds with distinct base tones and simple texture.

What words say and what they do not (DESIGN.md §5): captions may name shape, main colour,
pattern, second colour and background ("a red star with yellow stripes on the grass"); they
never name the pattern's tilt. The tilt is the look no word can say, as a real dog's exact
markings are: a model draws it from the noise, and a personal concept has to carry it.

Photos of one object differ the way real photos do: position and size jitter, a lighting gain and
tint, a soft lighting gradient, and pixel noise; the object's identity (shape, colours, pattern)
never changes. Rendering is a pure function of (scene, seed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

SIZE = 32          # output resolution (pixels, square)
_SS = 4            # supersampling factor
_HI = SIZE * _SS   # drawing resolution
_RIM = 1.5         # width (output px) of the main-colour outline around a pattern

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black")
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checks")
# The unnamed attribute: how a pattern lies. Straight stripes run horizontally, straight checks
# and dots sit on an axis-aligned grid; diagonal ones are the same turned 45 degrees. A solid
# object has none (like its second colour).
TILTS: tuple[str, ...] = ("straight", "diagonal")
_TILT_ANGLE = {"straight": 0.0, "diagonal": np.pi / 4}
# What words can say of an object (its named look) and what they cannot.
NAMED_LOOK: tuple[str, ...] = ("shape", "color", "pattern", "second_color")
UNNAMED: tuple[str, ...] = ("tilt",)
BACKGROUNDS: tuple[str, ...] = ("white", "grass", "sand", "sky", "snow")

RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30), "orange": (250, 135, 0), "yellow": (250, 220, 20),
    "green": (20, 185, 60), "blue": (25, 60, 225), "purple": (135, 35, 185),
    "pink": (250, 120, 200), "black": (25, 25, 25),
}

# How each background is named in a caption ("a red star on the grass").
BACKGROUND_PHRASE: dict[str, str] = {
    "white": "on a white background", "grass": "on the grass", "sand": "on the sand",
    "sky": "in the sky", "snow": "in the snow",
}

# How a look is named: "with yellow stripes" (the full look), "with stripes" (the pattern only);
# a solid object is "plain" either way.
LOOK_NAMING: tuple[str, ...] = ("none", "pattern", "full")

# The same look said before the noun, as English adjectives are ("a yellow striped red star",
# "a striped red star"). A causal encoder (CLIP's) then shows the noun's position the whole look,
# so the UNet can read it there: where Cones 2 puts a concept's residual and where layout
# guidance steers. Each adjective is one token of CLIP's vocabulary ("checkered" is two).
ADJECTIVE: dict[str, str] = {"stripes": "striped", "dots": "dotted", "checks": "checked"}

# Plain-language templates; {obj} is "a red star" (or the two-object phrase), {bg} the phrase above.
TEMPLATES: tuple[str, ...] = ("a photo of {obj} {bg}", "{obj} {bg}", "a picture of {obj} {bg}")
TEMPLATES_NO_BG: tuple[str, ...] = ("a photo of {obj}", "{obj}", "a picture of {obj}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object's identity. `second_color` is the pattern colour and `tilt` how the pattern
    lies (both None for solid; a patterned object given no tilt is "straight")."""
    shape: str
    color: str
    pattern: str = "solid"
    second_color: str | None = None
    tilt: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; one of {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; one of {', '.join(COLORS)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; one of {', '.join(PATTERNS)}")
        if self.pattern == "solid":
            if self.second_color is not None:
                raise ValueError("a solid object has no second colour")
            if self.tilt is not None:
                raise ValueError("a solid object has no pattern tilt")
        else:
            if self.tilt is None:
                object.__setattr__(self, "tilt", TILTS[0])
            elif self.tilt not in TILTS:
                raise ValueError(f"unknown tilt {self.tilt!r}; one of {', '.join(TILTS)}")
            if self.second_color not in COLORS:
                raise ValueError(f"a {self.pattern} object needs a second colour from {', '.join(COLORS)}")
            if self.second_color == self.color:
                raise ValueError("the second colour must differ from the main colour")


@dataclass(frozen=True)
class SceneSpec:
    """One object (centred), or two (left half, right half), on a background."""
    objects: tuple[ObjectSpec, ...]
    background: str = "white"

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise ValueError("a scene holds one or two objects")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; one of {', '.join(BACKGROUNDS)}")


@dataclass(frozen=True)
class Placement:
    """Where an object was drawn (in output pixels); returned for tests and layout benches."""
    cx: float
    cy: float
    radius: float
    half: str = field(default="full")  # "full", "left" or "right"


# --- shapes: boolean masks on centred coordinates in units of the object radius ----------------

def _polygon(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the pixel grid."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xin = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < xin)
    return inside


def _star_vertices(points: int = 5, inner: float = 0.48) -> np.ndarray:
    ang = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


_TRIANGLE = np.array([[0.0, -1.0], [0.95, 0.75], [-0.95, 0.75]])
_STAR = _star_vertices()


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of `shape` at unit radius; x right, y down."""
    r2 = x * x + y * y
    if shape == "circle":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.82
    if shape == "triangle":
        return _polygon(x, y, _TRIANGLE)
    if shape == "star":
        return _polygon(x, y, _STAR * 1.08)
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.52 ** 2)
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 0.34) & (ay <= 0.95)) | ((ay <= 0.34) & (ax <= 0.95))
    raise ValueError(shape)


def pattern_mask(pattern: str, px: np.ndarray, py: np.ndarray, phase: tuple[float, float],
                 angle: float = 0.0) -> np.ndarray:
    """Where the second colour goes; px/py are output-pixel coordinates (scale fixed in pixels
    so the pattern survives the 2x VAE downsample whatever the object size), `angle` turns the
    pattern's grid (radians)."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * px + s * py + phase[0], -s * px + c * py + phase[1]
    if pattern == "solid":
        return np.zeros(px.shape, dtype=bool)
    if pattern == "stripes":  # bands: 3 px second colour in every 6 px
        return (v % 6.0) < 3.0
    if pattern == "checks":   # 4 px squares
        return (np.floor(u / 4.0) + np.floor(v / 4.0)) % 2 == 1
    if pattern == "dots":     # dots of radius 1.7 px on a 6 px grid
        du = (u % 6.0) - 3.0
        dv = (v % 6.0) - 3.0
        return du * du + dv * dv <= 1.7 ** 2
    raise ValueError(pattern)


# --- backgrounds ------------------------------------------------------------------------------

def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 float image (0..255) at the drawing resolution."""
    yy, xx = np.mgrid[0:_HI, 0:_HI] / _HI
    img = np.empty((_HI, _HI, 3), dtype=np.float64)
    if name == "white":
        img[:] = (248, 248, 246)
    elif name == "grass":  # dark green with vertical blade streaks
        img[:] = (55, 115, 40)
        blades = rng.normal(0, 1, size=(1, _HI // 3 + 1)).repeat(3, axis=1)[:, :_HI]
        img += blades[..., None] * np.array([8, 18, 6]) + (yy[..., None] * np.array([10, 20, 5]))
    elif name == "sand":   # warm beige with speckles
        img[:] = (215, 185, 130)
        speck = rng.normal(0, 1, size=(_HI // 4, _HI // 4)).repeat(4, 0).repeat(4, 1)
        img += speck[..., None] * np.array([10, 9, 7])
    elif name == "sky":    # blue gradient, lighter towards the horizon
        top, bottom = np.array([95, 160, 235]), np.array([175, 215, 250])
        img[:] = top + (bottom - top) * yy[..., None]
    elif name == "snow":   # cool grey-blue with white flakes
        img[:] = (185, 195, 215)
        flakes = rng.random((_HI // 4, _HI // 4)) < 0.12
        img[flakes.repeat(4, 0).repeat(4, 1)] = (252, 252, 255)
    else:
        raise ValueError(name)
    return img


# --- rendering --------------------------------------------------------------------------------

def _draw_object(img: np.ndarray, obj: ObjectSpec, cx: float, cy: float, radius: float,
                 rng: np.random.Generator) -> None:
    """Paint `obj` into the supersampled image in place; cx, cy, radius in output pixels."""
    py, px = (np.mgrid[0:_HI, 0:_HI] + 0.5) / _SS  # output-pixel coordinates of each sub-pixel
    angle = rng.uniform(-0.15, 0.15)  # a slight tilt, as in a hand-held photo
    dx, dy = (px - cx) / radius, (py - cy) / radius
    c, s = np.cos(angle), np.sin(angle)
    x, y = c * dx + s * dy, -s * dx + c * dy
    body = shape_mask(obj.shape, x, y)
    # The pattern stays inside a rim of the main colour, so "main colour" is well defined even
    # for checks (half the interior each way): it is the colour of the object's outline.
    shrink = radius / (radius - _RIM)
    inner = shape_mask(obj.shape, x * shrink, y * shrink)
    phase = (rng.uniform(0, 8), rng.uniform(0, 8))
    turn = _TILT_ANGLE[obj.tilt] + rng.uniform(-0.1, 0.1) if obj.tilt else 0.0
    second = body & inner & pattern_mask(obj.pattern, px, py, phase, turn)
    img[body] = RGB[obj.color]
    if obj.pattern != "solid":
        img[second] = RGB[obj.second_color]


def _box_down(img: np.ndarray) -> np.ndarray:
    return img.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))


def render_array(scene: SceneSpec, seed: int) -> tuple[np.ndarray, list[Placement]]:
    """Render to a 32x32x3 uint8 array; also return where each object went."""
    rng = np.random.default_rng(seed)
    img = _background(scene.background, rng)
    placements: list[Placement] = []
    if len(scene.objects) == 1:
        radius = rng.uniform(9.5, 12.0)
        cx, cy = SIZE / 2 + rng.uniform(-2.5, 2.5), SIZE / 2 + rng.uniform(-2.5, 2.5)
        _draw_object(img, scene.objects[0], cx, cy, radius, rng)
        placements.append(Placement(cx, cy, radius))
    else:
        for obj, half, x0 in zip(scene.objects, ("left", "right"), (0.0, SIZE / 2)):
            radius = rng.uniform(6.3, 7.3)
            cx = x0 + SIZE / 4 + rng.uniform(-0.8, 0.8)
            cy = SIZE / 2 + rng.uniform(-3.0, 3.0)
            _draw_object(img, obj, cx, cy, radius, rng)
            placements.append(Placement(cx, cy, radius, half))
    out = _box_down(img)
    # Lighting: global gain, a colour tint, a soft directional gradient, then sensor noise.
    gain = rng.uniform(0.9, 1.08)
    tint = rng.uniform(0.96, 1.04, size=3)
    gdir = rng.normal(size=2)
    gdir /= np.linalg.norm(gdir) + 1e-9
    yy, xx = (np.mgrid[0:SIZE, 0:SIZE] / SIZE) - 0.5
    shade = 1.0 + 0.08 * (gdir[0] * xx + gdir[1] * yy)
    out = out * gain * tint * shade[..., None] + rng.normal(0, 3.0, size=out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), placements


def render(scene: SceneSpec, seed: int) -> Image.Image:
    """The photo of `scene` for `seed` (32x32 RGB). Same inputs, same pixels."""
    return Image.fromarray(render_array(scene, seed)[0], "RGB")


# --- captions ---------------------------------------------------------------------------------

def object_phrase(obj: ObjectSpec, *, with_color: bool = True, look: str = "none",
                  before: bool = False) -> str:
    """'a red star'; with look "full" 'a red star with yellow stripes', "pattern" 'a red star
    with stripes' (a solid one: 'a plain red star'); `before` says the pattern as an adjective
    ('a yellow striped red star', 'a striped red star'). Never the tilt: no word says it."""
    if look not in LOOK_NAMING:
        raise ValueError(f"unknown look naming {look!r}; one of {', '.join(LOOK_NAMING)}")
    words = f"{obj.color} {obj.shape}" if with_color else obj.shape
    if look == "none":
        return f"a {words}"
    if obj.pattern == "solid":
        return f"a plain {words}"
    if before:
        second = f"{obj.second_color} " if look == "full" else ""
        return f"a {second}{ADJECTIVE[obj.pattern]} {words}"
    if look == "full":
        return f"a {words} with {obj.second_color} {obj.pattern}"
    return f"a {words} with {obj.pattern}"


# How a two-object caption says where things are: "on the left and ... on the right" (the left
# object first), or only "... and ..." in either order (where they are is then left to the noise,
# or to layout boxes: what layout guidance is for).
PLACING: tuple[str, ...] = ("sides", "and", "and-reversed")


def caption(scene: SceneSpec, *, template: int = 0, with_color: bool = True,
            with_background: bool = True, look: str | Sequence[str] = "none",
            placing: str = "sides", before: bool | Sequence[bool] = False) -> str:
    """Plain caption: 'a photo of a red star on the grass'; for two objects
    'a photo of a red star on the left and a blue ring on the right on the sand' (`placing`
    "and": 'a photo of a red star and a blue ring on the sand', "and-reversed": the right one
    first). `look` names each object's look (one value for every object, or one per object):
    with "full" 'a photo of a red star with yellow stripes on the grass'; `before` (one value
    or one per object) says it before the noun instead (`object_phrase`)."""
    looks = (look,) * len(scene.objects) if isinstance(look, str) else tuple(look)
    befores = (before,) * len(scene.objects) if isinstance(before, bool) else tuple(before)
    if len(looks) != len(scene.objects) or len(befores) != len(scene.objects):
        raise ValueError("give one look naming per object")
    if placing not in PLACING:
        raise ValueError(f"unknown placing {placing!r}; one of {', '.join(PLACING)}")
    phrases = [object_phrase(o, with_color=with_color, look=k, before=b)
               for o, k, b in zip(scene.objects, looks, befores)]
    if len(scene.objects) == 1:
        obj = phrases[0]
    elif placing == "sides":
        obj = f"{phrases[0]} on the left and {phrases[1]} on the right"
    else:
        first, second = phrases if placing == "and" else phrases[::-1]
        obj = f"{first} and {second}"
    if with_background:
        return TEMPLATES[template].format(obj=obj, bg=BACKGROUND_PHRASE[scene.background])
    return TEMPLATES_NO_BG[template].format(obj=obj)


def render_concept_photos(obj: ObjectSpec, n: int, seed: int, background: str | None = None,
                          look: str = "full", with_color: bool = True) -> list[tuple[Image.Image, str]]:
    """`n` photos of one object (a personal concept) with their captions. With `background`
    None the backgrounds vary across photos, as a person's photos of their mug would. The
    captions describe what is seen, as a captioning model would ("a photo of a red star with
    yellow stripes on the grass"; `look` and `with_color` as in `caption`: with "none" and False
    only where it was taken, "a photo of a star on the grass", as a person would write it): the
    tilt stays unsaid. The images do not depend on the caption's arguments."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        bg = background or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        scene = SceneSpec((obj,), bg)
        out.append((render(scene, seed * 1000 + i), caption(scene, look=look, with_color=with_color)))
    return out


def random_object(rng: np.random.Generator, *, pattern: str | None = None) -> ObjectSpec:
    """A uniformly random object (pattern and tilt uniform unless given; second colour != main)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = COLORS[int(rng.integers(len(COLORS)))]
    pat = pattern or PATTERNS[int(rng.integers(len(PATTERNS)))]
    others = [c for c in COLORS if c != color]
    second = others[int(rng.integers(len(others)))] if pat != "solid" else None
    tilt = TILTS[int(rng.integers(len(TILTS)))] if pat != "solid" else None
    return ObjectSpec(shape, color, pat, second, tilt)


def random_scene(rng: np.random.Generator, *, two_prob: float = 0.0) -> SceneSpec:
    """A random scene: one object, or (with probability `two_prob`) two."""
    n = 2 if rng.random() < two_prob else 1
    objects = tuple(random_object(rng) for _ in range(n))
    return SceneSpec(objects, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
