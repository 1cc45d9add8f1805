"""`cones eval` end to end on the real engine (tiny SD pipeline) with a tiny random CLIP saved as
a transformers folder: scores come back, are stored with the concept and shown by `cones show`."""
from __future__ import annotations

import json

import pytest

from cns_daemon.api.errors import EXIT_CODES, ErrorCode
from helpers.clip import tiny_clip_model
from helpers.service import cli_in_process, running_daemon, write_photos


@pytest.fixture(scope="module")
def daemon():
    with running_daemon(fake=False, args=("--model", "tiny"), timeout=180) as d:
        yield d


@pytest.fixture
def cones(daemon, monkeypatch):
    return cli_in_process(daemon.home, monkeypatch)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from cns_daemon.tokenizer import clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tiny_clip_model().save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def learn_rex(cones, tmp_path) -> None:
    """The module's concept 'rex' (Cones 2, 2 steps), learned by the first test that needs it:
    any one of them runs alone too."""
    if cones("show", "rex")[0] != 0:
        photos = write_photos(tmp_path / "rex", 3)
        code, out, err = cones("add", "rex", *map(str, photos), "--class", "dog", "--method", "cones2",
                               "--steps", "2")
        assert code == 0, out + err


def learn_pot(cones, tmp_path) -> None:
    """The module's second concept 'pot' (Cones 2, 2 steps), as `learn_rex`."""
    if cones("show", "pot")[0] != 0:
        photos = write_photos(tmp_path / "pot", 2)
        code, out, err = cones("add", "pot", *map(str, photos), "--class", "pot", "--method", "cones2",
                               "--steps", "2")
        assert code == 0, out + err


def test_eval_scores_are_reported_and_stored(cones, clip_folder, tmp_path):
    learn_rex(cones, tmp_path)
    # Cones 2 records its training seed as the other methods do (`show`'s "learned with")
    assert json.loads(cones("show", "rex", "--json")[1])["learned_with"] == {"steps": 2, "seed": 0}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na photo of {}\n{} on the beach\n")
    code, out, err = cones("eval", "rex", "-n", "2", "--steps", "2", "--prompts", str(prompts),
                           "--clip-weights", str(clip_folder), "--json")
    assert code == 0, out + err
    doc = json.loads(out)
    assert -1 <= doc["clip_i"] <= 1 and -1 <= doc["clip_t"] <= 1
    assert doc["n_images"] == 2 * 2 and doc["n_prompts"] == 2
    code, out, err = cones("show", "rex", "--json")
    metrics = json.loads(out)["metrics"]
    assert metrics["eval_clip_i"] == pytest.approx(doc["clip_i"], abs=1e-4)
    assert metrics["eval_clip_t"] == pytest.approx(doc["clip_t"], abs=1e-4)
    assert metrics["eval_n_images"] == 4 and metrics["eval_clip"] == str(clip_folder)
    code, out, err = cones("show", "rex")
    assert code == 0 and "eval_clip_i" in out
    # scored beside another concept: said, and a later solo eval says it no longer
    learn_pot(cones, tmp_path)
    assert cones("eval", "rex", "pot", "-n", "1", "--steps", "2", "--prompts", str(prompts),
                 "--clip-weights", str(clip_folder))[0] == 0
    assert json.loads(cones("show", "rex", "--json")[1])["metrics"]["eval_with"] == "<pot>"
    assert json.loads(cones("show", "pot", "--json")[1])["metrics"]["eval_with"] == "<rex>"
    code, out, err = cones("eval", "rex", "-n", "1", "--steps", "2", "--prompts", str(prompts),
                           "--clip-weights", str(clip_folder))
    assert code == 0 and "CLIP-I" in out, out + err
    assert "eval_with" not in json.loads(cones("show", "rex", "--json")[1])["metrics"]


def test_eval_errors_are_typed(cones, tmp_path):
    learn_rex(cones, tmp_path)
    missing = tmp_path / "no-such" / "clip.safetensors"
    jobs = len(json.loads(cones("jobs", "--json", "--limit", "1000")[1]))
    code, out, err = cones("eval", "rex", "-n", "1", "--clip-weights", str(missing))
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT], out + err   # a file named that is not there
    assert str(missing) in err   # whole: error lines are not wrapped
    # said when asked, not once the job's turn came (after every learn queued before it)
    assert len(json.loads(cones("jobs", "--json", "--limit", "1000")[1])) == jobs
    code, out, err = cones("eval", "rex", "--clip-weights", " ")   # was the working folder
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "--clip-weights is blank" in err, out + err
    code, out, err = cones("eval", "ghost", "--clip-weights", str(missing))
    assert code == EXIT_CODES[ErrorCode.NOT_FOUND], out + err
    code, out, err = cones("eval", "rex", "--prompts", str(tmp_path / "none.txt"))
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "none.txt" in err
    wordy = tmp_path / "wordy.txt"   # refused when sent, before CLIP loads or any image is made
    wordy.write_text("a photo of {} " + "on a very long sunny beach " * 16 + "\n")
    code, out, err = cones("eval", "rex", "--prompts", str(wordy), "--clip-weights", str(missing))
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "tokens long" in err, out + err
    braces = tmp_path / "braces.txt"   # every {} becomes every name: past the 1,000 characters a
    braces.write_text("{} " * 300 + "\n")   # prompt may have, said, not an internal error
    code, out, err = cones("eval", "rex", "--prompts", str(braces), "--clip-weights", str(missing))
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "at most 1000" in " ".join(err.split()), out + err
    code, out, err = cones("eval", "rex", "--steps", "1", "--clip-weights", str(missing))   # noise
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "denoises nothing" in " ".join(err.split()), out + err


def test_a_concept_whose_photos_are_elsewhere_says_so(cones, tmp_path):
    """An imported concept's photos stay in the store it was learned in: `cones show` says how
    many this store holds, and `cones eval` refuses it by name before CLIP is loaded."""
    import dataclasses

    from cns_daemon.transfer import decode, encode

    learn_rex(cones, tmp_path)
    exported = tmp_path / "rex.safetensors"
    assert cones("export", "rex", "-o", str(exported))[0] == 0
    record = decode(exported.read_bytes())
    elsewhere = tmp_path / "far.safetensors"
    elsewhere.write_bytes(encode(dataclasses.replace(record, meta=dataclasses.replace(
        record.meta, name="far", photo_digests=["ab" * 32, "cd" * 32, record.meta.photo_digests[0]]))))
    code, out, err = cones("import", str(elsewhere))
    assert code == 0, out + err
    doc = json.loads(cones("show", "far", "--json")[1])
    assert (doc["photos"], doc["photos_archived"]) == (3, 1)
    assert json.loads(cones("show", "rex", "--json")[1])["photos_archived"] == 3
    assert "3 (1 in this store's photo archive)" in cones("show", "far")[1]
    none_here = tmp_path / "none.safetensors"
    none_here.write_bytes(encode(dataclasses.replace(record, meta=dataclasses.replace(
        record.meta, name="none", photo_digests=["ef" * 32]))))
    assert cones("import", str(none_here))[0] == 0
    assert "1 (none in this store's photo archive)" in cones("show", "none")[1]
    code, out, err = cones("eval", "none", "--clip-weights", str(tmp_path / "no-clip"))
    assert code == EXIT_CODES[ErrorCode.NOT_FOUND], out + err
    assert "no photos in this store's archive" in " ".join(err.split())


def test_a_prompt_naming_a_concept_not_evaluated_is_refused_when_sent(cones, tmp_path):
    """It was refused mid-run as an unknown concept, though the concept is stored."""
    learn_rex(cones, tmp_path)
    learn_pot(cones, tmp_path)
    prompts = tmp_path / "both.txt"
    prompts.write_text("a photo of {} and <rex>\n")
    code, out, err = cones("eval", "pot", "--prompts", str(prompts), "--clip-weights", str(tmp_path / "none"))
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT], out + err
    assert "names <rex>, which is not being evaluated" in " ".join(err.split()), err
