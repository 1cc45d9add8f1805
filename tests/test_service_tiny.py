"""End to end on the real engine: `cones serve --model tiny` (the seeded tiny SD pipeline), real
methods and generation, driven through the CLI and the inbox; export / import of a concept."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from typer.testing import CliRunner

from cones_cli.client import Client
from cones_cli.main import app
from cns_daemon.api.errors import EXIT_CODES, ErrorCode
from cns_daemon.transfer import decode, encode
from helpers.service import (cli_in_process, running_daemon, short_home, start_daemon,
                                  wait_until, write_photos)

runner = CliRunner()


@pytest.fixture(scope="module")
def daemon():
    with running_daemon(fake=False, args=("--model", "tiny"), timeout=180) as d:
        yield d


@pytest.fixture
def cones(daemon, monkeypatch):
    """Run the CLI in-process against the module's daemon; returns (exit code, stdout + stderr)."""
    return cli_in_process(daemon.home, monkeypatch, merged=True)


def test_cli_and_inbox_then_generate_with_boxes(cones, daemon, tmp_path):
    photos = write_photos(tmp_path / "rex", 3)
    code, out = cones("add", "rex", *map(str, photos), "--class", "dog", "--method", "cones2",
                      "--steps", "2")
    assert code == 0 and "Learned <rex> (cones2, dog): a residual embedding," in out, out   # not "0 neurons"
    folder = daemon.home / "inbox" / "mug"
    write_photos(folder, 3, seed=50)
    (folder / "concept.toml").write_text('class = "mug"\nmethod = "cones2"\nsteps = 2\n')
    with Client(daemon.socket) as c:
        wait_until(lambda: "mug" in {x.name for x in c.concepts()}, timeout=120, what="inbox learn")
        assert c.status().model == "tiny"
    wait_until(lambda: not folder.exists(), what="inbox folder removed")

    code, out = cones("list", "--json")
    listed = {c["name"]: c for c in json.loads(out)}
    assert {"rex", "mug"} <= set(listed) and listed["mug"]["method"] == "cones2"
    out_dir = tmp_path / "images"
    code, out = cones("generate", "a photo of <rex> and <mug>", "-n", "2", "--steps", "3", "--seed", "3",
                      "--box", "rex=0,0,0.5,1", "--box", "mug=0.5,0,1,1", "-o", str(out_dir), "--json")
    assert code == 0, out
    result = json.loads(out)["result"]
    from PIL import Image

    images = [Image.open(p) for p in result["images"]]
    assert len(images) == 2 and images[0].size == (32, 32)
    assert images[1].text["Seed"] == "4"
    # the defaults it drew with are said too (the tiny model has no cones.json: CFG 7.5)
    assert images[1].text["Description"].endswith(" · CFG 7.5 · 3 steps · size 32x32"), images[1].text
    assert Image.open(result["contact_sheet"]).width > 2 * 32
    # a second run into the same folder keeps the first run's images and sheet beside its own
    first = {p: open(p, "rb").read() for p in [*result["images"], result["contact_sheet"]]}
    code, out = cones("generate", "a photo of <rex>", "--steps", "2", "--seed", "4", "-o", str(out_dir), "--json")
    assert code == 0, out
    second = json.loads(out)["result"]
    assert all(open(p, "rb").read() == data for p, data in first.items())
    assert len(list(out_dir.iterdir())) == 3 + 2 and not set(second["images"]) & set(first)
    code, out = cones("generate", "a photo of <rex>", "--box", "mug=0,0,1,1")
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "not in the prompt" in out


def test_export_rm_import_and_model_mismatch(cones, daemon, tmp_path):
    photos = write_photos(tmp_path / "star", 3, seed=80)
    code, out = cones("add", "star", *map(str, photos), "--class", "star", "--method", "cns", "--steps", "2",
                      "--option", "prior_images=0", "--seed", "3", "--json")
    assert code == 0, out
    result = json.loads(out)["result"]   # what the human line says, in the document too
    assert result["concept"] == "star" and result["seed"] == 3
    assert result["metrics"]["neurons"] > 0 and result["metrics"]["size_bytes"] > 0
    # (no class images are drawn for scoped values: the option is said to change nothing)
    assert "options that changed nothing: prior_images (scope `concept`" in result["metrics"]["note"]
    code, before = cones("show", "star", "--json")
    assert json.loads(before)["learned_with"] == {"steps": 2, "seed": 3, "prior_images": 0}
    assert json.loads(before)["neurons"] == result["metrics"]["neurons"]
    code, shown = cones("show", "star")
    assert "steps 2, seed 3, prior_images 0" in shown, shown
    exported = tmp_path / "star.safetensors"
    code, out = cones("export", "star", "-o", str(exported))
    assert code == 0 and exported.stat().st_size > 0, out
    assert exported.stat().st_mode & 0o777 == 0o600   # as private as the data folder
    # an existing file is not overwritten without --force; a path ending in / is a folder
    code, out = cones("export", "star", "-o", str(exported))
    assert code == EXIT_CODES[ErrorCode.CONFLICT] and "--force" in out, out
    assert cones("export", "star", "-o", str(exported), "--force")[0] == 0
    code, out = cones("export", "nosuch", "-o", str(tmp_path / "none") + "/")
    assert code == EXIT_CODES[ErrorCode.NOT_FOUND] and not (tmp_path / "none").exists(), out
    code, out = cones("export", "star", "-o", str(tmp_path / "new") + "/")
    assert code == 0 and decode((tmp_path / "new" / "star.safetensors").read_bytes()).meta.name == "star", out
    code, out = cones("import", str(exported))
    assert code == EXIT_CODES[ErrorCode.CONFLICT] and "cones rm star" in out, out   # the name is taken
    assert "--name NEW" in out
    # ... or it is kept under another name, beside the first
    code, out = cones("import", str(exported), "--name", "star-copy")
    assert code == 0 and "Imported <star-copy>" in out, out
    copy = json.loads(cones("show", "star-copy", "--json")[1])
    assert (copy["method"], copy["class_word"]) == ("cns", "star")
    assert "import <star-copy>" in [j["summary"] for j in json.loads(cones("jobs", "--json")[1])]
    assert cones("generate", "a photo of <star-copy>", "--steps", "2")[0] == 0
    assert cones("import", str(exported), "--name", "star copy")[0] == EXIT_CODES[ErrorCode.BAD_INPUT]
    assert cones("import", str(exported), "--name", "star-copy")[0] == EXIT_CODES[ErrorCode.CONFLICT]
    assert cones("rm", "star-copy")[0] == 0
    assert cones("rm", "star")[0] == 0
    assert cones("show", "star")[0] == EXIT_CODES[ErrorCode.NOT_FOUND]
    code, out = cones("import", str(exported))
    assert code == 0, out
    assert "import <star>" in [j["summary"] for j in json.loads(cones("jobs", "--json")[1])]
    code, after = cones("show", "star", "--json")
    a, b = json.loads(after), json.loads(before)
    assert {k: a[k] for k in ("method", "class_word", "token", "photos", "fingerprint", "learned_with")} == \
           {k: b[k] for k in ("method", "class_word", "token", "photos", "fingerprint", "learned_with")}
    # the same concept claimed for another base model is refused
    record = decode(exported.read_bytes())
    other = dataclasses.replace(record, meta=dataclasses.replace(record.meta, name="alien", fingerprint="0" * 32))
    alien = tmp_path / "alien.safetensors"
    alien.write_bytes(encode(other))
    code, out = cones("import", str(alien))
    assert code == EXIT_CODES[ErrorCode.MODEL_MISMATCH], out
    # exported by an earlier cones, whose digest read the weights' fp32 bytes: this model's
    from cns_daemon.model import build_tiny_pipeline, fingerprints
    older = tmp_path / "older.safetensors"
    older.write_bytes(encode(dataclasses.replace(record, meta=dataclasses.replace(
        record.meta, name="older", fingerprint=fingerprints(build_tiny_pipeline(seed=0), ("fp32",))[0]))))
    code, out = cones("import", str(older))
    assert code == 0, out
    assert json.loads(cones("show", "older", "--json")[1])["fingerprint"] == b["fingerprint"]
    # another name, the same token (every store picks rare words in the same order, so two
    # stores' first concepts share one): imported on a free word, drawing the same pictures
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(encode(dataclasses.replace(record, meta=dataclasses.replace(record.meta, name="twin"))))
    code, out = cones("import", str(twin))
    assert code == 0 and f"its token {record.meta.token!r} is used by <star> here" in out, out
    code, shown = cones("show", "twin", "--json")
    assert json.loads(shown)["token"] not in ("", record.meta.token)
    assert _pixels(cones, tmp_path, "a photo of <twin>") == _pixels(cones, tmp_path, "a photo of <star>")
    # a file whose method says other than its parts (edited): it would draw something else
    relabelled = tmp_path / "relabelled.safetensors"
    relabelled.write_bytes(encode(dataclasses.replace(record, meta=dataclasses.replace(
        record.meta, name="relabelled", method="cones"))))
    code, out = cones("import", str(relabelled))
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "not what a cones concept" in " ".join(out.split()), out
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a concept file at all")
    code, out = cones("import", str(junk))   # a bad file is the person's input, not store damage
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "not a cones concept file" in out, out


def _pixels(cones, tmp_path, prompt: str) -> bytes:
    from PIL import Image

    code, out = cones("generate", prompt, "--steps", "3", "--seed", "11", "-o", str(tmp_path / "px"), "--json")
    assert code == 0, out
    return Image.open(json.loads(out)["result"]["images"][0]).tobytes()


def test_a_cones_concept_imported_where_its_word_is_taken_draws_the_same(cones, daemon, tmp_path):
    photos = write_photos(tmp_path / "ring", 3, seed=81)
    code, out = cones("add", "cring", *map(str, photos), "--class", "ring", "--method", "cones",
                      "--steps", "2", "--option", "prior_images=0", "--option", "tune_steps=2")
    assert code == 0, out
    before = _pixels(cones, tmp_path, "a photo of <cring>")
    exported = tmp_path / "cring.safetensors"
    assert cones("export", "cring", "-o", str(exported))[0] == 0
    assert cones("rm", "cring")[0] == 0
    # a CNS concept takes the freed word and writes its own trained row there
    code, out = cones("add", "taker", *map(str, photos), "--class", "ring", "--steps", "2",
                      "--option", "prior_images=0")
    assert code == 0, out
    assert json.loads(cones("show", "taker", "--json")[1])["token"] == decode(exported.read_bytes()).meta.token
    code, out = cones("import", str(exported))
    assert code == 0 and "was given" in out, out
    assert _pixels(cones, tmp_path, "a photo of <cring>") == before


def test_cns_concept_survives_restart_and_removal_restores_base(tmp_path, monkeypatch):
    """Learn a CNS concept, restart the service: the rebuilt weights give the same images; remove
    it and one whose values act everywhere (scope all): plain prompts give exactly the images of
    the untouched base model again."""
    import numpy as np
    from PIL import Image

    home = short_home()
    monkeypatch.setenv("CONES_HOME", str(home))

    def pixels(*args: str) -> list[np.ndarray]:
        result = runner.invoke(app, ["generate", *args, "-n", "2", "--steps", "3", "--seed", "5", "--json"])
        assert result.exit_code == 0, result.stdout + result.stderr
        return [np.asarray(Image.open(p)) for p in json.loads(result.stdout)["result"]["images"]]

    d = start_daemon(home, fake=False, args=("--model", "tiny"), timeout=180)
    try:
        plain_before = pixels("a photo of a dog")
        photos = write_photos(tmp_path / "rex", 3)
        result = runner.invoke(app, ["add", "rex", *map(str, photos), "--class", "dog", "--steps", "3",
                                     "--option", "prior_images=0"])
        assert result.exit_code == 0, result.stdout + result.stderr
        # one learned with its values written into the weights (as stores of earlier versions):
        # it acts on plain prompts too, so its removal shows on them
        photos = write_photos(tmp_path / "pan", 3, seed=40)
        result = runner.invoke(app, ["add", "pan", *map(str, photos), "--class", "pan", "--steps", "3",
                                     "--option", "prior_images=0", "--option", "scope=all"])
        assert result.exit_code == 0, result.stdout + result.stderr
        assert not any(np.array_equal(a, b) for a, b in zip(plain_before, pixels("a photo of a dog")))
        with_rex = pixels("a photo of <rex>")
        d.kill(15)
        d = start_daemon(home, fake=False, args=("--model", "tiny"), timeout=180)
        with Client(d.socket) as c:
            info = c.concept("rex")
            assert info.method == "cns" and info.neurons > 0
        again = pixels("a photo of <rex>")
        assert all(np.array_equal(a, b) for a, b in zip(with_rex, again))   # rebuilt exactly
        assert runner.invoke(app, ["rm", "rex"]).exit_code == 0
        assert runner.invoke(app, ["rm", "pan"]).exit_code == 0
        plain_after = pixels("a photo of a dog")
        assert all(np.array_equal(a, b) for a, b in zip(plain_before, plain_after))   # base restored
    finally:
        d.kill(15)
        shutil.rmtree(home, ignore_errors=True)


def test_generate_takes_negative_prompt_guidance_and_size(cones, daemon, tmp_path):
    """--negative, --guidance-scale and --width/--height reach the images (a different negative
    prompt or scale draws different pixels at the same seed); bad values are refused before a
    job is queued, with exit code 2."""
    import numpy as np
    from PIL import Image

    photos = [str(p) for p in write_photos(tmp_path / "neg", 2)]
    assert cones("add", "neg", *photos, "--class", "dog", "--method", "cones2", "--steps", "2")[0] == 0

    def images(*extra, seed="3"):
        code, out = cones("generate", "a photo of <neg>", "--seed", seed, "--steps", "2",
                          "--json", *extra)
        assert code == 0, out
        return [np.asarray(Image.open(p)) for p in json.loads(out)["result"]["images"]]

    def first_image(*extra, seed="3"):
        return images(*extra, seed=seed)[0]

    plain = first_image()
    # the seed is honoured, and image i of a batch is what its own seed (printed, seed + i) draws,
    # up to the rounding of batched kernels (1e-6 in float: a grey level where it tips a pixel)
    def same_but_rounding(a, b):
        return np.abs(a.astype(int) - b.astype(int)).max() <= 1

    assert not same_but_rounding(plain, first_image(seed="4"))
    batch = images("-n", "2")
    assert same_but_rounding(batch[0], plain) and same_but_rounding(batch[1], first_image(seed="4"))
    assert not np.array_equal(plain, first_image("--negative", "a blurry photo"))
    assert not np.array_equal(plain, first_image("--cfg", "9"))
    assert np.array_equal(plain, first_image())
    assert first_image("--width", "48", "--box", "neg=0,0,0.5,1").shape == (32, 48, 3)
    code, out = cones("generate", "a photo of <neg>", "--steps", "2", "--height", "48", "--json")
    described = Image.open(json.loads(out)["result"]["images"][0]).text["Description"]
    assert described.endswith(" · 2 steps · size 32x48"), described   # the size drawn

    with Client(daemon.socket) as c:
        before = len(c.jobs(limit=1000))
    for args, said in ((("--negative", "no <neg>"), "negative prompt"),
                       (("--width", "34"), "multiple of 8"),
                       (("--width", "136"), "over 128 px a side"),   # 4 times the tiny model's 32
                       (("--steps", "1000"), "between 2 and 999"),
                       (("--guidance-scale", "0.5"), "--guidance-scale: must be at least 1"),
                       (("--height", "5000"), "height")):
        code, out = cones("generate", "a photo of <neg>", *args)
        assert code == 2 and said in out, (args, out)
    with Client(daemon.socket) as c:
        assert len(c.jobs(limit=1000)) == before   # nothing was queued
