"""Contact sheets: tiles upscaled with nearest-neighbour to at least 256 px, a caption line, a
label under each tile (the probe's reading in toy-world runs), and `cones generate` printing the
sheet's path last; the probe's words never say "None"."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cns_daemon.sheet import MIN_TILE, PAD, contact_sheet, describe_reading
from helpers.service import cli_in_process, running_daemon, write_photos


def tiles(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_tiles_are_upscaled_exactly_with_a_caption_and_labels():
    images = tiles(3)
    plain = np.asarray(contact_sheet(images))
    sheet = np.asarray(contact_sheet(images, "a photo of <rex> · seed 7 · concepts <rex>",
                                     ["red star, stripes in yellow, on grass", "blue ring, solid, on sky", "x"]))
    scale = -(-MIN_TILE // 32)
    top = sheet.shape[0] - plain.shape[0]   # caption and labels add height, nothing else changes
    assert top > 0 and sheet.shape[1] == plain.shape[1] == 3 * (32 * scale + PAD) + PAD
    caption_rows = sheet[:top // 2]
    assert (caption_rows < 128).any()         # dark text in the caption strip
    # the first tile: each source pixel became a scale x scale block, bit for bit
    expected = np.asarray(images[0]).repeat(scale, 0).repeat(scale, 1)
    th = expected.shape[0]
    found = [y for y in range(sheet.shape[0] - th + 1)
             if np.array_equal(sheet[y:y + th, PAD:PAD + th], expected)]
    assert len(found) == 1 and th >= MIN_TILE
    y0 = found[0]
    assert y0 > PAD   # below the caption
    under = sheet[y0 + 32 * scale + 1:y0 + 32 * scale + 18, PAD:PAD + 32 * scale]
    assert (under < 200).any()                # the label under the tile


def test_probe_words_never_say_none():
    reading = {"shape": "star", "color": "red", "pattern": "dots", "second_color": None,
               "background": "grass", "confidence": 0.4}
    text = describe_reading(reading)
    assert "None" not in text and "dots (second colour unclear)" in text
    assert describe_reading({**reading, "second_color": "yellow"}).startswith("red star, dots in yellow")
    assert "solid," in describe_reading({**reading, "pattern": "solid"})


def test_toy_world_generations_get_the_probe_reading(tmp_path):
    from cns_daemon.engine import Engine
    from cns_daemon.api.settings import load_settings
    from cns_daemon.toyworld.world import ObjectSpec, render_concept_photos

    obj = ObjectSpec("star", "red", "stripes", "yellow")
    images = [img for img, _ in render_concept_photos(obj, 2, 0)]
    toy = Engine(load_settings(), store=None, archive=None)
    labels = toy._readings(images)
    assert len(labels) == 2 and all(label.startswith("red star, stripes in yellow") for label in labels)
    assert Engine(load_settings(model="tiny"), store=None, archive=None)._readings(images) is None


@pytest.fixture(scope="module")
def daemon():
    with running_daemon() as d:
        yield d


def test_generate_prints_the_sheet_last_and_keeps_the_seed(daemon, tmp_path, monkeypatch):
    cones = cli_in_process(daemon.home, monkeypatch)
    photos = [str(p) for p in write_photos(tmp_path / "rex", 2)]
    assert cones("add", "rex", *photos, "--class", "dog", "--steps", "2")[0] == 0
    code, out, err = cones("generate", "a photo of <rex>", "-n", "2", "--seed", "7")
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert lines[-1].endswith("contact-sheet.png") and len(lines) == 3 and "seeds 7-8, one per image" in err
    sheet = Image.open(lines[-1])
    assert sheet.width >= 2 * MIN_TILE and sheet.height > MIN_TILE
    code, out, err = cones("generate", "a photo of <rex>", "--json")   # no seed given
    job = json.loads(out)
    assert isinstance(job["result"]["seed"], int)
    code, out, err = cones("generate", "a photo of <rex>", "--seed", str(job["result"]["seed"]), "--json")
    again = json.loads(out)["result"]
    first = np.asarray(Image.open(job["result"]["images"][0]))
    assert np.array_equal(first, np.asarray(Image.open(again["images"][0])))   # the seed it printed


def test_caption_line_names_prompt_seed_concepts_and_boxes():
    """What the contact sheet's caption says (the service builds it from the request and the
    images): the size drawn, not "48xnative", and the steps, so the line draws it again."""
    from cns_daemon.outputs import generation_caption
    from cns_daemon.api.protocol import GenerateRequest

    req = GenerateRequest(prompt="a photo of <rex> and <mug> on the beach", seed=7,
                          boxes=[" rex =0,0,5e-1,1", "<mug>=0.5,0,1,1"])   # said as read
    assert generation_caption(req) == ("a photo of <rex> and <mug> on the beach · seed 7 · "
                                       "concepts <rex>, <mug> · boxes rex=0,0,0.5,1; mug=0.5,0,1,1")
    plain = GenerateRequest(prompt="a photo of a dog", seed=0)
    assert generation_caption(plain) == "a photo of a dog · seed 0 · concepts none"
    four = GenerateRequest(prompt="a photo of a dog", seed=7, n=4)   # image k is drawn from seed + k
    assert generation_caption(four) == "a photo of a dog · seeds 7-10 · concepts none"
    tuned = GenerateRequest(prompt="a photo of a dog", seed=0, negative_prompt="blurry",
                            guidance_scale=5, width=48)
    assert generation_caption(tuned, (48, 32), 20) == (
        "a photo of a dog · seed 0 · concepts none · not blurry · CFG 5 · 20 steps · size 48x32")
    # the service passes what it drew with: the model's defaults are said too, not left out
    assert generation_caption(plain, (32, 32), 20, 3.0) == (
        "a photo of a dog · seed 0 · concepts none · CFG 3 · 20 steps · size 32x32")


def test_captions_keep_their_letters_or_fold_to_what_the_font_draws(monkeypatch):
    """A system font with the world's letters draws the caption as written; a letter the font
    lacks (Pillow's own font has basic Latin and a few signs) loses its accent or becomes "?",
    not an empty box."""
    from cns_daemon import sheet

    text = "café Müller · señor 🐶"
    drawn = []
    monkeypatch.setattr(sheet.ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **kw: drawn.append(text))
    tile = [Image.new("RGB", (32, 32), "red")]
    font = sheet._font()
    if getattr(font, "getname", lambda: ("",))()[0].startswith("DejaVu"):   # where the system has it
        sheet.contact_sheet(tile, text, [text])
        assert drawn == ["café Müller · señor ?"] * 2
        drawn.clear()
    monkeypatch.setattr(sheet, "SYSTEM_FONTS", ())
    sheet.contact_sheet(tile, text, [text])
    assert drawn == ["cafe Muller · senor ?"] * 2


def test_each_png_keeps_what_was_asked_whole_and_its_own_seed(tmp_path):
    """The sheet's drawn caption has only the letters its font holds ("在草地上" came out as
    "????"): the PNGs carry the caption as text, and each image its own seed."""
    from PIL import Image

    from cns_daemon.outputs import save_images

    caption = "a photo of <ibx> 🐶 在草地上 · seeds 7-8 · concepts <ibx>"
    tiles = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    result = save_images(tiles, tmp_path / "job", caption, seed=7)
    for i, path in enumerate(result.images):
        with Image.open(path) as img:
            assert img.text["Description"] == caption and img.text["Seed"] == str(7 + i)
    with Image.open(result.contact_sheet) as img:
        assert img.text["Description"] == caption and "Seed" not in img.text


def test_a_thin_image_does_not_make_a_sheet_thousands_of_pixels_wide():
    from PIL import Image

    from cns_daemon.sheet import MAX_TILE

    thin = [Image.new("RGB", (128, 8), "red")] * 8
    sheet = contact_sheet(thin)
    assert sheet.width <= 4 * (MAX_TILE + PAD) + PAD   # four tiles a row, each at most MAX_TILE long
    square = contact_sheet([Image.new("RGB", (32, 32), "red")])
    assert square.width >= MIN_TILE   # small square images still come out at least MIN_TILE
