"""Contact sheets: every image of a generation on one PNG a person can judge at a glance.

Tiles are upscaled by a whole factor with nearest-neighbour (the toy world's 32 px images stay
sharp pixels, never blurred) until they are at least MIN_TILE pixels; a caption line on top says
what was asked (prompt, seed, concepts); under each tile, when there is one, a label: in
toy-world runs the attribute probe's reading of that image. No torch here: the engine reads the
probe and hands the text in.
"""
from __future__ import annotations

import textwrap
import unicodedata
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 256
MAX_TILE = 1024
PAD = 4
FONT_SIZE = 13


# Fonts with the world's letters, where the system has one (Pillow finds a bare file name in
# the system's font folders); Pillow's own font draws basic Latin only.
SYSTEM_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")


def _font() -> ImageFont.ImageFont:
    for name in SYSTEM_FONTS:
        try:
            return ImageFont.truetype(name, FONT_SIZE)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError):   # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def printable(text: str, font) -> str:
    """`text` as `font` can draw it: a letter it lacks loses its accent ("café" → "cafe") or
    becomes "?", instead of the empty box the font would draw."""
    def glyph(ch: str):
        mask = font.getmask(ch)
        return mask.size, bytes(mask)

    missing = glyph("\uffff")   # a code point no font maps: the font's "no glyph" box
    drawn = {}

    def can(ch: str) -> bool:
        if ch not in drawn:
            drawn[ch] = ch.isspace() or glyph(ch) != missing
        return drawn[ch]

    out = []
    for ch in text:
        if can(ch):
            out.append(ch)
            continue
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        out.append(base if base and all(map(can, base)) else "?")
    return "".join(out)


def _lines(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` wrapped to `width` pixels."""
    per_char = max(1.0, draw.textlength("x" * 20, font=font) / 20)
    return textwrap.wrap(text, max(8, int(width / per_char))) or [""]


def describe_reading(a: Mapping) -> str:
    """One probe reading (shape, color, pattern, second_color, tilt, background, confidence) in
    words. A pattern read without a second colour (or tilt) says so instead of printing None."""
    if a["pattern"] == "solid":
        pattern = "solid"
    else:
        second = f" in {a['second_color']}" if a.get("second_color") else " (second colour unclear)"
        tilt = f", {a['tilt']}" if a.get("tilt") else ""
        pattern = f"{a['pattern']}{second}{tilt}"
    return f"{a['color']} {a['shape']}, {pattern}, on {a['background']} (confidence {a['confidence']:.2f})"


def _grid(n: int, w: int, h: int, columns: int) -> tuple[int, int, int]:
    """(scale, columns, rows) of a sheet of `n` images of w x h. The scale is a whole factor, so
    nearest-neighbour stays exact; the long side is held to MAX_TILE (a 128x8 image's short side
    brought to 256 made a 16,404 px wide sheet of eight)."""
    cols = min(columns, n)
    return max(1, min(-(-MIN_TILE // min(w, h)), MAX_TILE // max(w, h))), cols, -(-n // cols)


def tile_pixels(n: int, width: int, height: int, columns: int = 4) -> int:
    """The pixels of the tiles of `n` images of that size on a contact sheet (its captions and
    padding aside): what the sheet adds on the disk, about."""
    scale, cols, rows = _grid(n, width, height, columns)
    return cols * width * scale * rows * height * scale


def contact_sheet(images: Sequence[Image.Image], caption: str = "",
                  labels: Sequence[str] | None = None, columns: int = 4) -> Image.Image:
    """Images on a white grid, up to `columns` a row, each at least MIN_TILE pixels, with the
    caption above and each label under its tile."""
    font = _font()
    caption, labels = printable(caption, font), [printable(t, font) for t in labels or []]
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    scale, cols, rows = _grid(len(images), w, h, columns)
    tw, th = w * scale, h * scale
    width = cols * (tw + PAD) + PAD
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = FONT_SIZE + 4
    head = _lines(probe, caption, font, width - 2 * PAD) if caption else []
    tails = [_lines(probe, t, font, tw) for t in (labels or [])]
    tail_h = max((len(t) for t in tails), default=0) * line_h
    top = len(head) * line_h + (PAD if head else 0)
    sheet = Image.new("RGB", (width, top + rows * (th + tail_h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(head):
        draw.text((PAD, PAD + i * line_h), line, fill="black", font=font)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        x, y = PAD + c * (tw + PAD), top + PAD + r * (th + tail_h + PAD)
        tile = img.convert("RGB").resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        sheet.paste(tile, (x, y))
        for i, line in enumerate(tails[k] if k < len(tails) else []):
            draw.text((x, y + th + 2 + i * line_h), line, fill=(60, 60, 60), font=font)
    return sheet
