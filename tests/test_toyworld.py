"""The toy world's renderer, captions and `cones toyworld render` (no torch needed)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cns_daemon.toyworld.world import (BACKGROUNDS, COLORS, PATTERNS, SHAPES, SIZE, ObjectSpec,
                                       SceneSpec, caption, random_scene, render, render_array,
                                       render_concept_photos, shape_mask)

STAR = ObjectSpec("star", "red", "stripes", "yellow")


def test_world_is_big_enough():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and len(BACKGROUNDS) >= 5
    assert set(PATTERNS) == {"solid", "stripes", "dots", "checks"}


def test_render_is_deterministic_per_seed():
    scene = SceneSpec((STAR,), "grass")
    a, b = render(scene, 7), render(scene, 7)
    assert a.size == (SIZE, SIZE) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    # Another seed is another photo of the same object: different pixels, same object.
    c = np.asarray(render(scene, 8), dtype=np.int16)
    assert np.abs(c - np.asarray(a, dtype=np.int16)).mean() > 2.0


def test_photos_show_their_attributes():
    """The object's colours are where the placement says, the background elsewhere."""
    scene = SceneSpec((ObjectSpec("square", "blue", "checks", "yellow"),), "white")
    img, (place,) = render_array(scene, 1)
    img = img.astype(int)
    centre = img[int(place.cy) - 3:int(place.cy) + 3, int(place.cx) - 3:int(place.cx) + 3].reshape(-1, 3)
    blue, yellow = np.array([25, 60, 225]), np.array([250, 220, 20])
    near = lambda px, rgb: np.abs(px - rgb).sum(-1) < 90  # noqa: E731
    # checks: both colours inside the object, in roughly equal amounts
    assert near(centre, blue).mean() > 0.2 and near(centre, yellow).mean() > 0.2
    corner = img[:3, :3].reshape(-1, 3)
    assert (corner > 200).all()  # white background, no object in the corner


def test_patterns_differ_for_the_same_seed():
    imgs = [np.asarray(render(SceneSpec((ObjectSpec("circle", "red", p, None if p == "solid" else "blue"),),
                                        "white"), 3), dtype=np.int16) for p in PATTERNS]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).mean() > 3.0, (PATTERNS[i], PATTERNS[j])


def test_shapes_have_distinct_masks():
    y, x = np.mgrid[-1.2:1.2:97j, -1.2:1.2:97j]
    masks = {s: shape_mask(s, x, y) for s in SHAPES}
    for s in SHAPES:
        assert 0.15 < masks[s].mean() < 0.7, s
        for t in SHAPES:
            if s < t:
                assert (masks[s] != masks[t]).mean() > 0.05, (s, t)


def test_two_object_scenes_put_one_object_per_half():
    scene = SceneSpec((ObjectSpec("circle", "red"), ObjectSpec("cross", "blue")), "sand")
    _, places = render_array(scene, 0)
    assert [p.half for p in places] == ["left", "right"]
    assert places[0].cx + places[0].radius <= SIZE / 2 + 0.5
    assert places[1].cx - places[1].radius >= SIZE / 2 - 0.5


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError):
        ObjectSpec("hexagon", "red")
    with pytest.raises(ValueError):
        ObjectSpec("star", "red", "stripes")          # no second colour
    with pytest.raises(ValueError):
        ObjectSpec("star", "red", "stripes", "red")   # second == main
    with pytest.raises(ValueError):
        ObjectSpec("star", "red", "solid", "blue")    # solid has none
    with pytest.raises(ValueError):
        SceneSpec((), "grass")
    with pytest.raises(ValueError):
        SceneSpec((STAR,), "moon")


PATTERN_WORDS = re.compile(r"\b(stripe[sd]?|striped|dots?|dotted|checks?|checked|checkered|solid|pattern)\b")


def test_captions_name_shape_colour_background_never_pattern():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene(rng, two_prob=0.3)
        for template in range(3):
            text = caption(scene, template=template)
            assert not PATTERN_WORDS.search(text), text
            words = set(text.split())
            for obj in scene.objects:
                assert obj.shape in words and obj.color in words
            # the only colour words are the main colours: never a second colour
            assert words & set(COLORS) == {o.color for o in scene.objects}, text
            assert scene.background in text
            if len(scene.objects) == 2:
                assert text.index(" on the left") < text.index(" on the right")


def test_caption_examples():
    assert caption(SceneSpec((STAR,), "grass")) == "a photo of a red star on the grass"
    two = SceneSpec((STAR, ObjectSpec("ring", "blue", "dots", "pink")), "sand")
    assert caption(two) == "a photo of a red star on the left and a blue ring on the right on the sand"
    assert caption(SceneSpec((STAR,), "snow"), with_color=False, with_background=False) == "a photo of a star"


def test_concept_photos_keep_identity_and_vary():
    photos = render_concept_photos(STAR, 5, seed=3)
    assert len(photos) == 5
    assert all(text.startswith("a photo of a red star ") for _, text in photos)
    arrays = [np.asarray(im, dtype=np.int16) for im, _ in photos]
    assert all(np.abs(arrays[0] - a).mean() > 2.0 for a in arrays[1:])
    again = render_concept_photos(STAR, 5, seed=3)
    assert [im.tobytes() for im, _ in photos] == [im.tobytes() for im, _ in again]
    fixed = render_concept_photos(STAR, 3, seed=3, background="sky")
    assert all(text == "a photo of a red star in the sky" for _, text in fixed)


def test_cli_render_writes_photos_and_captions(tmp_path):
    from cli.main import app

    out = tmp_path / "photos"
    result = CliRunner().invoke(app, ["toyworld", "render", "--shape", "star", "--color", "red",
                                      "--pattern", "stripes", "--second-color", "yellow",
                                      "--background", "grass", "-n", "4", "--seed", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    expected = render_concept_photos(STAR, 4, seed=0, background="grass")
    for png, (img, text) in zip(pngs, expected):
        assert Image.open(png).convert("RGB").tobytes() == img.tobytes()
        assert png.with_suffix(".txt").read_text().strip() == text == "a photo of a red star on the grass"


def test_cli_render_rejects_bad_attributes(tmp_path):
    from cli.main import app

    result = CliRunner().invoke(app, ["toyworld", "render", "--shape", "star", "--color", "red",
                                      "--pattern", "stripes", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2  # BadInput
    assert not (tmp_path / "x").exists()
