"""The toy world's renderer, captions and `cones toyworld render` (no torch needed)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cns_daemon.toyworld.world import (BACKGROUNDS, COLORS, PATTERNS, SHAPES, SIZE, TILTS, ObjectSpec,
                                       SceneSpec, caption, random_object, random_scene, render,
                                       render_array, render_concept_photos, shape_mask)

STAR = ObjectSpec("star", "red", "stripes", "yellow")


def test_world_is_big_enough():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and len(BACKGROUNDS) >= 5
    assert set(PATTERNS) == {"solid", "stripes", "dots", "checks"}
    assert 2 <= len(TILTS) <= 4


def test_tilt_defaults_and_belongs_to_patterns_only():
    assert STAR.tilt == "straight"
    assert ObjectSpec("star", "red").tilt is None
    assert ObjectSpec("star", "red", "dots", "blue", "diagonal").tilt == "diagonal"
    with pytest.raises(ValueError):
        ObjectSpec("star", "red", "solid", None, "diagonal")
    with pytest.raises(ValueError):
        ObjectSpec("star", "red", "dots", "blue", "sideways")
    rng = np.random.default_rng(0)
    objs = [random_object(rng) for _ in range(400)]
    tilts = [o.tilt for o in objs if o.pattern != "solid"]
    assert {o.tilt for o in objs if o.pattern == "solid"} == {None}
    # the base model must see every tilt about equally often, never named
    assert all(abs(tilts.count(t) / len(tilts) - 1 / len(TILTS)) < 0.08 for t in TILTS)


def _turn(img: np.ndarray) -> float:
    """Mean orientation cue of the second colour's mask: the share of its horizontal
    neighbour pairs that agree minus that of diagonal pairs (horizontal stripes: > 0)."""
    mask = (np.abs(img.astype(int) - np.array([250, 220, 20])).sum(-1) < 120)
    horiz = (mask[:, 1:] == mask[:, :-1]).mean()
    diag = (mask[1:, 1:] == mask[:-1, :-1]).mean()
    return float(horiz - diag)


def test_tilt_turns_the_pattern_and_nothing_else():
    """Same seed, same object, other tilt: the stripes turn (a visible change), the object's
    place and colours stay."""
    scene = lambda tilt: SceneSpec((ObjectSpec("square", "blue", "stripes", "yellow", tilt),), "white")  # noqa: E731
    (a, pa), (b, pb) = render_array(scene("straight"), 4), render_array(scene("diagonal"), 4)
    assert pa == pb
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 3.0
    assert _turn(a) > _turn(b) + 0.05
    for img in (a, b):  # both colours present in similar amounts
        yellow = (np.abs(img.astype(int) - np.array([250, 220, 20])).sum(-1) < 120).mean()
        assert 0.08 < yellow < 0.3


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


PATTERN_WORDS = re.compile(r"\b(stripe[sd]?|striped|dots?|dotted|checks?|checked|checkered|solid|plain|pattern)\b")
# Whatever a caption says, it never says how the pattern lies.
TILT_WORDS = re.compile(r"\b(straight|diagonal\w*|tilt\w*|horizontal\w*|vertical\w*|slant\w*|"
                        r"turned|rotated|angle\w*|diamond\w*|degrees?)\b")


def test_plain_captions_name_shape_colour_background_never_the_look():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene(rng, two_prob=0.3)
        for template in range(3):
            text = caption(scene, template=template)
            assert not PATTERN_WORDS.search(text) and not TILT_WORDS.search(text), text
            words = set(text.split())
            for obj in scene.objects:
                assert obj.shape in words and obj.color in words
            # the only colour words are the main colours: never a second colour
            assert words & set(COLORS) == {o.color for o in scene.objects}, text
            assert scene.background in text
            if len(scene.objects) == 2:
                assert text.index(" on the left") < text.index(" on the right")


def test_named_captions_say_pattern_and_second_colour_never_the_tilt():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = random_scene(rng, two_prob=0.3)
        for look in ("full", "pattern"):
            text = caption(scene, template=int(rng.integers(3)), look=look)
            assert not TILT_WORDS.search(text), text
            for obj in scene.objects:
                if obj.pattern == "solid":
                    assert f"plain {obj.color} {obj.shape}" in text, text
                elif look == "full":
                    assert f"{obj.color} {obj.shape} with {obj.second_color} {obj.pattern}" in text, text
                else:
                    assert f"{obj.color} {obj.shape} with {obj.pattern}" in text, text
    with pytest.raises(ValueError):
        caption(SceneSpec((STAR,), "grass"), look="everything")
    with pytest.raises(ValueError):
        caption(SceneSpec((STAR,), "grass"), look=("full", "none"))


def test_caption_examples():
    assert caption(SceneSpec((STAR,), "grass")) == "a photo of a red star on the grass"
    assert caption(SceneSpec((STAR,), "grass"), look="full") == "a photo of a red star with yellow stripes on the grass"
    two = SceneSpec((STAR, ObjectSpec("ring", "blue", "dots", "pink", "diagonal")), "sand")
    assert caption(two) == "a photo of a red star on the left and a blue ring on the right on the sand"
    assert caption(two, look=("none", "full")) == ("a photo of a red star on the left and a blue ring "
                                                   "with pink dots on the right on the sand")
    assert caption(SceneSpec((ObjectSpec("cross", "black"),), "sky"), look="full") == \
        "a photo of a plain black cross in the sky"
    assert caption(SceneSpec((STAR,), "snow"), with_color=False, with_background=False) == "a photo of a star"
    assert caption(SceneSpec((STAR,), "snow"), look="pattern", with_background=False) == \
        "a photo of a red star with stripes"
    # two objects without sides, in either order: where they go is not said
    assert caption(two, placing="and") == "a photo of a red star and a blue ring on the sand"
    assert caption(two, placing="and-reversed", template=1) == "a blue ring and a red star on the sand"
    with pytest.raises(ValueError):
        caption(two, placing="above")
    # the look said before the noun, as an adjective; a solid object stays "plain"
    assert caption(SceneSpec((STAR,), "grass"), look="full", before=True) == \
        "a photo of a yellow striped red star on the grass"
    assert caption(SceneSpec((STAR,), "grass"), look="pattern", before=True, with_background=False) == \
        "a photo of a striped red star"
    assert caption(two, look="full", before=(False, True), placing="and") == \
        "a photo of a red star with yellow stripes and a pink dotted blue ring on the sand"
    assert caption(SceneSpec((ObjectSpec("cross", "black"),), "sky"), look="full", before=True) == \
        "a photo of a plain black cross in the sky"
    with pytest.raises(ValueError):
        caption(two, before=(True,))


def test_concept_photos_keep_identity_and_vary():
    photos = render_concept_photos(STAR, 5, seed=3)
    assert len(photos) == 5
    # captions describe what is seen, as a captioning model would: never the tilt
    assert all(text.startswith("a photo of a red star with yellow stripes ") for _, text in photos)
    assert not any(TILT_WORDS.search(text) for _, text in photos)
    arrays = [np.asarray(im, dtype=np.int16) for im, _ in photos]
    assert all(np.abs(arrays[0] - a).mean() > 2.0 for a in arrays[1:])
    again = render_concept_photos(STAR, 5, seed=3)
    assert [im.tobytes() for im, _ in photos] == [im.tobytes() for im, _ in again]
    fixed = render_concept_photos(STAR, 3, seed=3, background="sky", look="none")
    assert all(text == "a photo of a red star in the sky" for _, text in fixed)
    # where each was taken and nothing of the look, as a person captions; the same pictures
    wheres = render_concept_photos(STAR, 5, seed=3, look="none", with_color=False)
    assert [im.tobytes() for im, _ in wheres] == [im.tobytes() for im, _ in photos]
    assert [w for _, w in wheres] == [t.replace("red star with yellow stripes", "star") for _, t in photos]


def test_a_full_disk_leaves_nothing_of_a_render_or_of_a_folder_check(tmp_path, monkeypatch):
    """`toyworld render` on a full disk left 000.png and an empty 000.txt and said "A file
    operation failed" without a path; `-o`'s write check left its empty probe file."""
    import errno

    import cones_cli.views
    from cones_cli.main import app

    real, calls = cones_cli.views.atomic_write, []

    def fills_up(path, data, mode=0o600):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, mode)

    monkeypatch.setattr(cones_cli.views, "atomic_write", fills_up)
    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["toyworld", "render", "--shape", "star", "--color", "red",
                                      "-n", "3", "-o", str(out)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 12 and f"Cannot write {out / '001.png'}: No space left" in said, said
    assert not out.exists()   # nothing of it: no photo, no caption, no folder made for them

    def probe_fails(self, data):
        self.touch()   # created, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", probe_fails)
    deep = tmp_path / "new" / "p"   # every folder made for it goes, not only the last
    result = CliRunner().invoke(app, ["toyworld", "render", "--shape", "star", "--color", "red",
                                      "-n", "1", "-o", str(deep)])
    assert result.exit_code == 12 and not (tmp_path / "new").exists(), result.output
    kept = tmp_path / "kept"
    kept.mkdir()
    result = CliRunner().invoke(app, ["toyworld", "render", "--shape", "star", "--color", "red",
                                      "-n", "1", "-o", str(kept)])
    assert result.exit_code == 12 and kept.is_dir() and not list(kept.iterdir()), result.output


def test_cli_render_writes_photos_and_captions(tmp_path):
    from cones_cli.main import app

    out = tmp_path / "photos"
    result = CliRunner().invoke(app, ["toyworld", "render", "--shape", "star", "--color", "red",
                                      "--pattern", "stripes", "--second-color", "yellow", "--tilt", "diagonal",
                                      "--background", "grass", "-n", "4", "--seed", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    diagonal = ObjectSpec("star", "red", "stripes", "yellow", "diagonal")
    expected = render_concept_photos(diagonal, 4, seed=0, background="grass")
    straight = render_concept_photos(STAR, 4, seed=0, background="grass")
    for png, (img, text), (other, _) in zip(pngs, expected, straight):
        assert Image.open(png).convert("RGB").tobytes() == img.tobytes() != other.tobytes()
        assert png.with_suffix(".txt").read_text().strip() == text == \
            "a photo of a red star with yellow stripes on the grass"
    # a folder that holds photos is not mixed into without --force; a file is no folder
    more = ["toyworld", "render", "--shape", "square", "--color", "pink", "-n", "2", "-o", str(out)]
    result = CliRunner().invoke(app, more)
    assert result.exit_code == 2 and "already holds photos" in " ".join(result.stderr.split()), result.output
    assert Image.open(pngs[0]).convert("RGB").tobytes() == expected[0][0].tobytes()   # untouched
    assert CliRunner().invoke(app, [*more, "--force"]).exit_code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png"]   # one set, not two
    result = CliRunner().invoke(app, [*more[:-1], str(pngs[0])])
    assert result.exit_code == 2 and "is a file" in " ".join(result.stderr.split()), result.output


def test_cli_render_rejects_bad_attributes(tmp_path):
    from cones_cli.main import app

    for bad in (["--pattern", "stripes"],                                  # no second colour
                ["--pattern", "stripes", "--second-color", "blue", "--tilt", "up"],
                ["--tilt", "diagonal"],                                   # solid has no tilt
                ["--background", " "],                                    # blank is not "varies"
                ["--seed", "-1"],
                ["-n", "1001"]):                 # photo 1000 of seed 0 would be photo 0 of seed 1
        result = CliRunner().invoke(app, ["toyworld", "render", "--shape", "star", "--color", "red",
                                          *bad, "-o", str(tmp_path / "x")])
        assert result.exit_code == 2, (bad, result.output)  # BadInput
        assert not (tmp_path / "x").exists()
