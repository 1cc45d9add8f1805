"""The CLI stays light: importing it, running --help and every verb that talks to the service (or
only to files) never imports torch. The exceptions are the verbs that run a model in the CLI's
own process, and the README says so: `cones serve`, `cones demo` (its probe verdicts) and
`cones toyworld probe`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.service import REPO, daemon_env, running_daemon, write_photos

HEAVY = ("torch", "diffusers", "transformers")

# Run in a fresh interpreter against a running (fake) service: each verb through the real CLI,
# then which heavy packages got imported.
SCRIPT = """
import json, sys
from typer.testing import CliRunner
import cones_cli.main
photos, out = sys.argv[1], sys.argv[2]
verbs = [
    ["--help"], ["version"], ["status"], ["list"], ["jobs"], ["show", "nobody"],
    ["add", "light", *photos.split(","), "--class", "dog", "--steps", "2"],
    ["show", "light", "--json"], ["list", "--json"],
    ["generate", "a photo of <light>", "--steps", "2", "--seed", "3", "-o", out + "/gen"],
    ["export", "light", "-o", out + "/light.safetensors"],
    ["rm", "light"], ["import", out + "/light.safetensors"],
    ["cancel", "0123456789ab"], ["jobs", "--json"], ["store", "check"],
    ["toyworld", "render", "--shape", "star", "--color", "red", "--pattern", "stripes",
     "--second-color", "yellow", "-n", "1", "-o", out + "/render"],
    ["service", "install", "--unit-dir", out + "/units", "--no-start"],
]
codes = {}
for verb in verbs:
    r = CliRunner().invoke(cones_cli.main.app, verb)
    codes[" ".join(verb[:2])] = r.exit_code
heavy = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in %r})
print(json.dumps({"codes": codes, "heavy": heavy}))
""" % (HEAVY,)


def test_cli_verbs_never_import_torch(tmp_path):
    photos = write_photos(tmp_path / "p", 2)
    with running_daemon() as d:
        env = daemon_env(d.home)
        out = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(map(str, photos)), str(tmp_path)],
                             cwd=str(REPO), env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    codes = result["codes"]
    # the verbs did their work (a failing verb could skip the code that imports torch)
    ok = [v for v in codes if v not in ("show nobody", "cancel 0123456789ab", "store check")]
    assert all(codes[v] == 0 for v in ok), codes
    assert codes["show nobody"] != 0 and codes["cancel 0123456789ab"] != 0, codes
    assert result["heavy"] == [], result


def test_option_values_are_read_as_their_type_and_nan_is_refused():
    from cones_cli.main import _option
    from cns_daemon.api.errors import BadInput

    assert _option("top_p=5") == ("top_p", 5) and _option(" lr = 1e-3") == ("lr", 1e-3)
    assert _option("scope=all") == ("scope", "all") and _option("x=True") == ("x", True)
    for raw in ("nan", "inf", "-Infinity"):
        with pytest.raises(BadInput, match="finite number"):
            _option(f"lr={raw}")
    assert _option("top_p=1_0") == ("top_p", "1_0")   # Python's 10; the service names its type
    from cones_cli.main import _options

    assert _options(["top_p=5", "lr=1e-3"]) == {"top_p": 5, "lr": 1e-3}
    with pytest.raises(BadInput, match="'top_p' is given twice"):   # the last one won, unsaid
        _options(["top_p=5", "top_p=7"])


def test_a_command_line_that_does_not_parse_gives_json_with_json(tmp_path):
    """The `cones` entry point: typer's usage box either way, and with --json the error document
    on stdout as every other failure gives it; exit 2."""
    env = {**os.environ, "CONES_HOME": str(tmp_path)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "cones_cli.main", *args], cwd=str(REPO),  # noqa: E731
                                       env=env, capture_output=True, text=True, timeout=60)
    out = run("generate", "a photo", "-n", "abc", "--json")
    assert out.returncode == 2 and "Invalid value for '-n'" in out.stderr, out.stderr
    body = json.loads(out.stdout)["error"]
    assert body["code"] == "bad_input" and "'-n'" in body["message"] and "--help" in body["hint"]
    out = run("list", "--bogus")
    assert out.returncode == 2 and out.stdout == "" and "No such option: --bogus" in out.stderr
    assert run("--help").returncode == 0
    from importlib.metadata import version

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == version("cones")


def test_an_empty_prompt_is_told_as_a_blank_one_is(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cones_cli.main
    from cns_daemon.api.errors import EXIT_CODES, ErrorCode

    monkeypatch.setenv("CONES_HOME", str(tmp_path))   # no service: refused before it is asked
    for prompt in ("", "   "):
        r = CliRunner().invoke(cones_cli.main.app, ["generate", prompt])
        assert r.exit_code == EXIT_CODES[ErrorCode.BAD_INPUT] and "The prompt is empty" in r.output, r.output
        r = CliRunner().invoke(cones_cli.main.app, ["generate", "a dog", "--negative", prompt])   # and --negative
        assert r.exit_code == EXIT_CODES[ErrorCode.BAD_INPUT] and "negative prompt is blank" in r.output, r.output


def test_files_the_cli_cannot_read_are_typed_errors_not_tracebacks(tmp_path, monkeypatch):
    """A prompt list in another encoding and a caption the person may not read went out as
    tracebacks (exit 1; with --json no error document)."""
    import json

    from typer.testing import CliRunner

    import cones_cli.main
    from cns_daemon.api.errors import EXIT_CODES, ErrorCode

    monkeypatch.setenv("CONES_HOME", str(tmp_path))   # no service: refused before it is asked
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a photo of {} \xff\xfe\xfd on the beach\n")
    r = CliRunner().invoke(cones_cli.main.app, ["eval", "rex", "--prompts", str(prompts), "--json"])
    assert r.exit_code == EXIT_CODES[ErrorCode.BAD_INPUT], r.output
    assert "is not UTF-8 text" in json.loads(r.stdout)["error"]["message"]
    # UTF-16 without its byte-order mark reads as UTF-8 with a NUL between every letter: it was
    # learned from as the caption "a\0 \0p\0h\0o\0t\0o..."
    prompts.write_bytes("a photo of {} on the beach\n".encode("utf-16-le"))
    r = CliRunner().invoke(cones_cli.main.app, ["eval", "rex", "--prompts", str(prompts), "--json"])
    assert r.exit_code == EXIT_CODES[ErrorCode.BAD_INPUT], r.output
    assert "is not UTF-8 text" in json.loads(r.stdout)["error"]["message"]
    prompts.write_bytes("a photo of {} on the beach\n".encode("utf-16"))   # with its mark: read
    from cns_daemon.archive import read_text

    assert read_text(prompts, "x") == "a photo of {} on the beach"
    photo, other = write_photos(tmp_path / "p", 2)
    caption = photo.with_suffix(".txt")
    caption.write_text("a dog")
    real = type(caption).read_bytes

    def unreadable(self):
        if self.name == caption.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(type(caption), "read_bytes", unreadable)
    r = CliRunner().invoke(cones_cli.main.app, ["add", "rex", str(photo), str(other), "--class", "dog", "--json"])
    assert r.exit_code == EXIT_CODES[ErrorCode.BAD_INPUT], r.output
    assert "cannot be read: Permission denied" in json.loads(r.stdout)["error"]["message"]


def test_a_photo_whose_name_is_not_utf8_is_sent_under_a_name_that_can_be_shown(tmp_path, monkeypatch):
    """The whole request was refused ("filename: Input should be a valid string") without
    naming the file."""
    import os

    import cones_cli.main
    from cns_daemon.api.protocol import AddRequest

    a, b = write_photos(tmp_path / "p", 2)
    odd = os.path.join(os.fsencode(tmp_path / "p"), b"\xffdog.png")
    os.rename(a, odd)
    sent = {}

    class Capture:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add(self, req: AddRequest):
            sent["names"] = [p.filename for p in req.photos]
            raise KeyboardInterrupt   # enough: the request was built

    monkeypatch.setenv("CONES_HOME", str(tmp_path))
    monkeypatch.setattr(cones_cli.main, "client", lambda: Capture())
    from typer.testing import CliRunner

    CliRunner().invoke(cones_cli.main.app, ["add", "rex", os.fsdecode(odd), str(b), "--class", "dog"])
    assert sent["names"] == ["\ufffddog.png", b.name]


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`cones jobs --json | head -3`: 'error: Broken pipe. Check the path ...' and exit 1."""
    import subprocess
    import sys

    script = ("import cones_cli.views as v, typer\n"
              "@v.handled\n"
              "def talk(as_json=False):\n"
              "    raise BrokenPipeError(32, 'Broken pipe')\n"
              "try:\n    talk()\nexcept typer.Exit as e:\n    raise SystemExit(e.exit_code)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=str(REPO), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 141 and out.stderr == "", out.stderr


def test_a_table_printed_to_a_reader_that_went_away_ends_141_too(tmp_path):
    """`cones jobs | head -1`: rich ended the print with exit 1 (its own broken-pipe handling),
    where `--json` ended 141."""
    import subprocess
    import sys

    script = ("import cones_cli.views as v, typer, time\n"
              "time.sleep(0.5)\n"   # the reader is gone by then
              "@v.handled\n"
              "def talk(as_json=False):\n"
              "    for i in range(2000):\n"
              "        v.console.print(f'row {i} ' + 'x' * 60)\n"
              "try:\n    talk()\nexcept typer.Exit as e:\n    raise SystemExit(e.exit_code)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_images_are_copied_into_o_only_under_a_job_id_that_is_one(tmp_path):
    """From a security review: the copies in -o were named after the job id as the service
    answered it; an id "../../x" put a file of the answer's choosing outside -o."""
    from cones_cli.generation import _copy_out
    from cns_daemon.api.errors import ProtocolMismatch
    from cns_daemon.api.protocol import JobInfo, JobResult

    image = tmp_path / "made.png"
    image.write_bytes(b"png")
    out = tmp_path / "out" / "sub"
    out.mkdir(parents=True)

    def job(job_id):
        return JobInfo(id=job_id, kind="generate", state="done", summary="", created=0.0,
                       result=JobResult(images=[str(image)]))

    with pytest.raises(ProtocolMismatch, match="job id that is none"):
        _copy_out(job("../../evil"), out, made=[])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["made.png", "out", "sub"]
    copied = _copy_out(job("0123456789ab"), out, made=[])
    assert copied.result.images == [str(out / "0123456789ab-made.png")]


def test_generate_o_takes_back_what_it_made_when_nothing_comes(tmp_path):
    """A review's find: a source the CLI could not read left the images copied before it (a
    FileNotFoundError passed the all-or-none clean-up), and a refused generate into -o
    deep/a/b left deep/a behind."""
    from cones_cli.generation import _copy_out
    from cones_cli.views import output_folder, remove_made
    from cns_daemon.api.errors import NotFound
    from cns_daemon.api.protocol import JobInfo, JobResult

    image = tmp_path / "made.png"
    image.write_bytes(b"png")
    out = tmp_path / "deep" / "a" / "b"
    made = output_folder(out, "images")
    assert made == [out, out.parent, out.parent.parent]
    job = JobInfo(id="0123456789ab", kind="generate", state="done", summary="", created=0.0,
                  result=JobResult(images=[str(image), str(tmp_path / "gone.png")]))
    with pytest.raises(NotFound, match="gone.png"):
        _copy_out(job, out, made)
    assert not (tmp_path / "deep").exists()
    made = output_folder(out, "images")
    remove_made(made)   # what a refused generate does
    assert not (tmp_path / "deep").exists()


def test_import_refuses_a_file_of_another_kind_before_reading_or_sending_it(tmp_path, monkeypatch):
    """A review's find: `cones import model.safetensors` (a checkpoint or LoRA given by mistake)
    read the whole file into the CLI's memory and sent it, to be told to raise the service's
    request limit. Its header says what it is: refused before anything is sent."""
    import numpy as np
    from safetensors.numpy import save
    from typer.testing import CliRunner

    import cones_cli.main

    monkeypatch.setenv("CONES_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cones_cli.main, "client", lambda: (_ for _ in ()).throw(AssertionError("sent")))
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(AssertionError("read")))
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(save({"w": np.zeros(3, np.float32)}, metadata={"ss_network_module": "lora"}))
    later = tmp_path / "later.safetensors"
    later.write_bytes(save({"w": np.zeros(3, np.float32)}, metadata={"format": "cones-concept/9"}))
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:   # a header length no concept file has
        f.write((1 << 40).to_bytes(8, "little"))
    for file, said in ((lora, "not a cones concept file (a safetensors file without cones's format"),
                       (later, "written by a newer version of cones (format cones-concept/9"),
                       (huge, "not a cones concept file (its header says it is 1,099,511,627,776 bytes")):
        r = CliRunner().invoke(cones_cli.main.app, ["import", str(file)])
        assert r.exit_code == 2 and said in " ".join(r.output.split()), r.output


def test_rm_of_a_damaged_concept_learns_it_again_with_what_its_list_row_says():
    """A review's find: `cones rm` of a damaged concept printed `--class CLASS` and no method,
    steps or seed (`cones show` refuses a damaged concept), where its `cones list` row still
    said them."""
    from cones_cli.main import _concept_or_none
    from cns_daemon.api.errors import Corrupt, Unavailable
    from cns_daemon.api.protocol import ConceptInfo

    row = ConceptInfo(name="star", method="cns", class_word="star", token="sks", created=0.0, photos=4,
                      size_bytes=1, neurons=1, state="damaged", learned_with={"steps": 5, "seed": 0})

    class Damaged:
        def concept(self, name):
            raise Corrupt("Concept 'star' is damaged.")

        def concepts(self):
            return [row]

    assert _concept_or_none(Damaged(), "star") == row

    class Gone(Damaged):
        def concepts(self):
            raise Unavailable("The cones service is not running.")

    assert _concept_or_none(Gone(), "star") is None


@pytest.mark.parametrize("damaged", [False, True])
def test_rm_prints_the_line_that_learns_the_concept_again_as_it_was(tmp_path, monkeypatch, damaged):
    """The relearn line carries the class, method, steps, seed and options the concept was
    learned with, from `cones show` or, for a damaged concept, from its `cones list` row."""
    from contextlib import contextmanager

    from typer.testing import CliRunner

    import cones_cli.main
    from cns_daemon.api.errors import Corrupt
    from cns_daemon.api.protocol import ConceptInfo, JobInfo, JobResult

    learned = ConceptInfo(name="star", method="cns", class_word="star", token="sks", created=0.0,
                          photos=1, size_bytes=1, neurons=1, state="damaged" if damaged else "ok",
                          learned_with={"steps": 5, "seed": 7, "lr": 0.01})
    kept = tmp_path / "archive" / "ab.png"

    class Fake:
        def concept(self, name):
            if damaged:
                raise Corrupt("Concept 'star' is damaged.")
            return learned

        def concepts(self):
            return [learned]

        def remove(self, name, photos):
            return JobInfo(id="c" * 12, kind="remove", state="done", summary="rm", created=0.0,
                           result=JobResult(concept=name, photos=[str(kept)]))

    @contextmanager
    def client():
        yield Fake()

    monkeypatch.setattr(cones_cli.main, "client", client)
    monkeypatch.setattr(cones_cli.main, "wait_for", lambda c, job, quiet: job)
    r = CliRunner().invoke(cones_cli.main.app, ["rm", "star"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert f"cones add star {kept} --class star --method cns --steps 5 --seed 7 --option lr=0.01" in said


def test_store_check_json_keeps_the_error_document_for_errors_that_are_not_damage(tmp_path, monkeypatch):
    """A review's find: the report's "error" was a string where every other --json error is
    {"code", "message", "hint"}, and any store that could not be opened (none there, no
    permission) was reported damaged, exit 7."""
    from typer.testing import CliRunner

    import cones_cli.main
    from cones_cli.config import settings

    monkeypatch.setenv("CONES_HOME", str(tmp_path / "home"))
    store = settings().paths.store
    store.mkdir(parents=True)   # a folder, no store in it
    r = CliRunner().invoke(cones_cli.main.app, ["store", "check", "--json"])
    assert r.exit_code == 3 and json.loads(r.stdout)["error"]["code"] == "not_found", r.output
    (store / "data.mdb").write_bytes(b"\0" * 8192)   # damaged past opening
    r = CliRunner().invoke(cones_cli.main.app, ["store", "check", "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 7 and doc["ok"] is False and doc["open_error"] and "error" not in doc, r.output


@pytest.mark.parametrize("kind,said", [("remove", "is not stopped midway"), ("learn", "it stops at its next step")])
def test_cancel_of_a_running_job_says_what_it_does(monkeypatch, kind, said):
    """A review's find: a running removal or import (which no cancel stops: a moment's store
    write) was told "it stops at its next step", and ended done."""
    from contextlib import contextmanager

    from typer.testing import CliRunner

    import cones_cli.main
    from cns_daemon.api.protocol import JobInfo

    job = JobInfo(id="d" * 12, kind=kind, state="running", summary=f"{kind} <rex>", created=0.0)

    class Fake:
        def job(self, job_id):
            return job

        def cancel(self, job_id):
            return job

    @contextmanager
    def client():
        yield Fake()

    monkeypatch.setattr(cones_cli.main, "client", client)
    r = CliRunner().invoke(cones_cli.main.app, ["cancel", "d" * 12])
    assert r.exit_code == 0 and said in " ".join(r.output.split()), r.output


def test_jobs_says_what_to_do_about_the_newest_failed_job(monkeypatch):
    """A review's find: a failed job's hint (read the log, submit it again) was in `--json` only;
    the table has room for what went wrong."""
    from contextlib import contextmanager

    from typer.testing import CliRunner

    import cones_cli.main
    from cns_daemon.api.protocol import ErrorBody, JobInfo, JobList

    def failed(i, hint):
        return JobInfo(id=str(i) * 12, kind="learn", state="failed", summary="learn <rex>", created=0.0,
                       error=ErrorBody(code="internal", message="It stopped twice.", hint=hint))

    jobs = [JobInfo(id="a" * 12, kind="generate", state="done", summary="generate 1x 'a'", created=0.0),
            failed(1, "Look at the service log, then submit it again."), failed(2, "An older hint.")]

    class Fake:
        def job_list(self, limit):
            return JobList(jobs=jobs)

    @contextmanager
    def client():
        yield Fake()

    monkeypatch.setattr(cones_cli.main, "client", client)
    r = CliRunner().invoke(cones_cli.main.app, ["jobs"])
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and f"job {'1' * 12} failed: Look at the service log, then submit it again." in out
    assert "An older hint" not in out


def test_damaged_job_records_are_said_by_jobs_and_status(monkeypatch):
    """A review's find: a queued learn whose record was damaged never ran and was in no
    listing (only `cones store check` named its id)."""
    from contextlib import contextmanager

    from typer.testing import CliRunner

    import cones_cli.main
    from cns_daemon.api.protocol import JobList, QueueInfo, StatusInfo

    class Fake:
        def job_list(self, limit):
            return JobList(jobs=[], damaged=["d50107539eee"])

        def status(self):
            return StatusInfo(protocol="8", version="0", pid=1, uptime_s=1.0, socket="/s", data="/d",
                              inbox="/i", inbox_watched=True, model="m", device="cpu", dtype="float32",
                              fingerprint="f", concepts=0, queue=QueueInfo(queued=0, damaged=["d50107539eee"]))

    @contextmanager
    def client():
        yield Fake()

    monkeypatch.setattr(cones_cli.main, "client", client)
    for args in (["jobs"], ["jobs", "--json"]):
        r = CliRunner().invoke(cones_cli.main.app, args)
        out = " ".join(r.output.split())
        assert r.exit_code == 0 and "1 job record is damaged and cannot run or be shown: d50107539eee" in out
        assert "`cones cancel ID` removes one" in out
    r = CliRunner().invoke(cones_cli.main.app, ["status"])
    assert r.exit_code == 0 and "1 damaged job record: see `cones jobs`" in " ".join(r.output.split()), r.output
