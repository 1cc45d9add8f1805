"""How the CLI shows a followed job: every phase's row ends full or is gone, none is left at
0/1 or spinning after the job finished."""
from __future__ import annotations

import io
import re

from rich.console import Console

from cones_cli.views import follow
from cns_daemon.api.protocol import ProgressInfo


def events(job="0123456789ab"):
    yield ProgressInfo(job=job, state="queued")
    yield ProgressInfo(job=job, state="running", phase="start")
    yield ProgressInfo(job=job, state="running", phase="prepare", step=0, total=1, message="token sks")
    yield ProgressInfo(job=job, state="running", phase="class-images", step=1, total=4)
    yield ProgressInfo(job=job, state="running", phase="waiting")   # no step count: a spinner
    yield ProgressInfo(job=job, state="running", phase="select", step=0, total=1)
    for k in range(4):
        yield ProgressInfo(job=job, state="running", phase="train", step=k, total=3, loss=0.5)
    yield ProgressInfo(job=job, state="done")


def test_finished_phases_are_full_or_gone():
    out = io.StringIO()
    follow(events(), console=Console(file=out, width=100, force_terminal=False))
    rows = {line.split()[0]: line for line in out.getvalue().splitlines() if line.strip()}
    for phase, count in (("prepare", "1/1"), ("class-images", "4/4"), ("select", "1/1"), ("train", "3/3")):
        assert count in rows[phase], out.getvalue()
    assert "waiting" not in rows and "queued" not in rows and "start" not in rows, out.getvalue()


def test_a_learn_paused_for_a_generate_says_so_on_its_bar():
    """The bar stood still (its time left growing) while a generate ran inside the learn."""
    from cns_daemon.api.protocol import PAUSED_FOR

    def paused(job="0123456789ab"):
        yield ProgressInfo(job=job, state="running", phase="train", step=1, total=3, loss=0.5)
        yield ProgressInfo(job=job, state="running", phase="train", step=1, total=3, loss=0.5,
                           message=PAUSED_FOR + "fedcba987654")
        yield ProgressInfo(job=job, state="done")

    out = io.StringIO()
    follow(paused(), console=Console(file=out, width=120, force_terminal=False))
    assert "(paused for generate job fedcba987654)" in out.getvalue(), out.getvalue()


def test_concept_list_keeps_names_and_figures_whole_at_80_columns():
    import time

    from cones_cli.views import concept_table, concepts_table
    from cns_daemon.api.protocol import ConceptInfo

    long = "a_very_long_concept_name_someone_typed"
    concepts = [ConceptInfo(name=f"{long}_{i}", method="cns", class_word="triangle", token="httr",
                            created=time.time(), photos=4, size_bytes=50_002, neurons=16_238,
                            overlap={"SLOW": 9962, "star2": 15230}, metrics={"kv_share": 0.21230246803977273})
                for i in range(3)]
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=False).print(concepts_table(concepts))
    text = out.getvalue()
    assert "…" not in text, text
    cells = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    column = ["".join(row[i].strip() for row in cells) for i in range(7)]   # folded cells joined
    assert column[0] == "".join(c.name for c in concepts), text
    assert column[3] == "50.0 kB" * 3 and column[4] == "16,238" * 3, text   # on one line each
    # the list names the concept shared with most and counts the rest; `show` lists them all
    assert column[5].replace(" ", "") == "star2:15,230(+1)" * 3, text
    assert "state" not in text.splitlines()[2]   # all ok: no column saying so, more room for names
    concepts[1] = concepts[1].model_copy(update={"state": "damaged", "problem": "x"})
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=False).print(concepts_table(concepts))
    assert "state" in out.getvalue().splitlines()[2] and "damaged" in out.getvalue()
    residual = concepts[2].model_copy(update={"method": "cones2", "neurons": 0})   # no neurons: "-"
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=False).print(concepts_table([residual]))
    row = next(line for line in out.getvalue().splitlines() if "cones2" in line)
    assert [cell.strip() for cell in row.split("│")][5] == "-", out.getvalue()
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=False).print(concept_table(concepts[0]))
    assert "0.2123" in out.getvalue() and "0.21230246" not in out.getvalue()
    assert "star2: 15,230, SLOW: 9,962" in out.getvalue()


def test_the_concept_list_stays_one_line_a_concept_as_concepts_add_up():
    """28 concepts each sharing neurons with every earlier one: at 80 columns the list stays
    at most two lines a concept, no number split (the overlap column listed them all: 328
    lines, numbers broken across them)."""
    import time

    from cones_cli.views import concepts_table
    from cns_daemon.api.protocol import ConceptInfo

    concepts = [ConceptInfo(name=f"k{i}", method="cns", class_word="star", token="t", created=time.time(),
                            photos=3, size_bytes=40_000, neurons=20_000,
                            overlap={f"k{j}": 10_000 + 13 * j for j in range(i)}) for i in range(28)]
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=False).print(concepts_table(concepts))
    rows = [line for line in out.getvalue().splitlines() if line.startswith("│")]
    assert len(rows) <= 2 * 28, out.getvalue()
    cells = [row.split("│")[6].strip() for row in rows]
    assert all(re.fullmatch(r"-|k\d+: 10,\d{3}|\(\+\d+\)|k\d+: 10,\d{3} \(\+\d+\)|", c) for c in cells), cells


def test_a_learn_paused_for_a_generate_says_so_in_the_jobs_table():
    import time

    from cones_cli.views import jobs_table
    from cns_daemon.api.protocol import PAUSED_FOR, JobInfo

    learn = JobInfo(id="aaaaaaaaaaaa", kind="learn", state="running", summary="learn <rex>",
                    created=time.time(), progress=ProgressInfo(job="aaaaaaaaaaaa", state="running",
                    phase="train", step=40, total=900, message=PAUSED_FOR + "bbbbbbbbbbbb"))
    out = io.StringIO()
    Console(file=out, width=160, force_terminal=False).print(jobs_table([learn]))
    assert "paused for generate job bbbbbbbbbbbb" in out.getvalue(), out.getvalue()


def test_the_jobs_table_says_what_a_job_made_and_what_a_learn_left_out():
    """A finished learn: its neurons and size, and the files it skipped (an inbox learn's folder
    is gone by then); an eval its scores; a generate its images."""
    import time

    from cones_cli.views import images_line, jobs_table
    from cns_daemon.api.protocol import JobInfo, JobResult, SkippedFile

    now = time.time()
    jobs = [JobInfo(id="a" * 12, kind="learn", state="done", summary="learn <rex>", created=now,
                    skipped=[SkippedFile(file="IMG_1.HEIC", reason="a HEIC photo")],
                    result=JobResult(concept="rex", seed=0, metrics={"neurons": 12345, "size_bytes": 48000})),
            JobInfo(id="e" * 12, kind="learn", state="done", summary="learn <mug>", created=now,
                    result=JobResult(concept="mug", seed=0,
                                     metrics={"method": "cones2", "neurons": 0, "size_bytes": 3000})),
            JobInfo(id="b" * 12, kind="eval", state="done", summary="eval <rex>", created=now,
                    result=JobResult(metrics={"clip_i": 0.8, "clip_t": 0.3})),
            JobInfo(id="c" * 12, kind="generate", state="done", summary="generate 2x", created=now,
                    result=JobResult(images=["/data/outputs/job-c/00.png", "/data/outputs/job-c/01.png"], seed=1)),
            JobInfo(id="d" * 12, kind="remove", state="done", summary="remove <rex> and its photos",
                    created=now, result=JobResult(concept="rex", metrics={"photos_deleted": 3, "photos_kept": 1}))]
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=False).print(jobs_table(jobs))
    text = " ".join(out.getvalue().split())
    assert "12,345 neurons, 48.0 kB; 1 skipped: IMG_1.HEIC (a HEIC photo)" in text, text
    assert "a residual embedding, 3.0 kB" in text and "0 neurons" not in text   # Cones 2
    assert "CLIP-I 0.8, CLIP-T 0.3" in text and "2 images" in text
    assert text.count("CLIP-I") == 1 and "3 photos deleted, 1 kept" in text
    # where the images are is said once under the table, whole (in the note column a path
    # folded over four lines)
    assert images_line(jobs) == ("Generated images are in /data/outputs/, one folder per job, its name ending "
                                 "in the job's id (the newest listed: /data/outputs/job-c).")
    moved = jobs[3].model_copy(update={"result": JobResult(images=["/old/outputs/job-f/00.png"], seed=1)})
    assert images_line([*jobs, moved]).startswith("Generated images are in /data/outputs/ and /old/outputs/,")
    assert images_line(jobs[:2]) is None


def test_status_names_the_running_job_and_how_far_it_is():
    import time

    from cones_cli.views import status_table
    from cns_daemon.api.protocol import JobInfo, QueueInfo, StatusInfo

    learn = JobInfo(id="aaaaaaaaaaaa", kind="learn", state="running", summary="learn <rex>",
                    created=time.time(), progress=ProgressInfo(job="aaaaaaaaaaaa", state="running",
                    phase="train", step=40, total=900, eta_s=120.4))
    s = StatusInfo(protocol="5", version="0", pid=1, uptime_s=1, socket="s", data="d", inbox="i",
                   inbox_watched=True, model="m", device="cpu", dtype="float32", fingerprint="f",
                   concepts=0, queue=QueueInfo(queued=0, running=learn))
    out = io.StringIO()
    Console(file=out, width=160, force_terminal=False).print(status_table(s))
    assert "aaaaaaaaaaaa: learn <rex> (train 40/900, about 120 s left)" in out.getvalue(), out.getvalue()


def test_the_persons_text_is_printed_as_written_not_read_as_markup():
    """A prompt with "[/]" made every `cones jobs` (and `status` while it ran) fail with a
    traceback, after restarts too; "[red]" in a prompt or path vanished. A long prompt is cut
    to one or two lines in the table (`--json` has it whole)."""
    import time

    from cones_cli.views import jobs_table, status_table
    from cns_daemon.api.protocol import JobInfo, QueueInfo, StatusInfo

    summary = "generate 'a photo of [bold red]big[/] <ibx> [/]'"
    job = JobInfo(id="aaaaaaaaaaaa", kind="generate", state="failed", summary=summary, created=time.time(),
                  error={"code": "bad_input", "message": "No [b]such[/] thing.", "hint": ""})
    long = JobInfo(id="bbbbbbbbbbbb", kind="generate", state="done", summary="generate '" + "word " * 60 + "'",
                   created=time.time())
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=False).print(jobs_table([job, long]))
    text = out.getvalue()
    assert "[bold red]big[/] <ibx> [/]" in text and "No [b]such[/] thing." in text, text
    assert "…" in text and text.count("word") < 30, text
    status = StatusInfo(version="1", protocol="6", pid=1, uptime_s=1, model="/models/[v1]/sd", device="cpu",
                        dtype="float32", fingerprint="f", concepts=0, socket="/run/[x]/s", data="/d",
                        inbox="/i", inbox_watched=True, queue=QueueInfo(queued=0, running=job))
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=False).print(status_table(status))
    assert "/models/[v1]/sd" in out.getvalue() and "<ibx> [/]" in out.getvalue(), out.getvalue()


def test_an_output_folder_made_for_a_generate_that_was_cut_off_is_not_left_empty(tmp_path, monkeypatch):
    """SIGTERM while `cones generate -o DIR` waited: the job runs after the restart, into the
    service's outputs; the message says DIR stays empty (it said nothing of it), and a DIR made
    for this generate is not left behind empty."""
    import time

    from typer.testing import CliRunner

    import cones_cli.generation
    import cones_cli.main
    from cns_daemon.api.errors import Unavailable
    from cns_daemon.api.protocol import JobInfo

    class Stopping:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def generate(self, req):
            return JobInfo(id="cccccccccccc", kind="generate", state="running", summary="generate 'x'",
                           created=time.time())

        def follow(self, job_id):
            raise Unavailable("The service is stopping before the job finished.")
            yield

        def job(self, job_id):   # and it does not come back
            raise Unavailable("The cones service is not running.")

        def service_state(self):
            return None

    monkeypatch.setattr("cones_cli.session.REJOIN_GRACE_S", 0.0)
    monkeypatch.setenv("CONES_HOME", str(tmp_path))
    monkeypatch.setattr(cones_cli.generation, "client", lambda: Stopping())
    out = tmp_path / "new" / "shots"
    r = CliRunner().invoke(cones_cli.main.app, ["generate", "a photo of a dog", "-o", str(out)])
    said = (f"(job cccccccccccc, kept: it runs when the service is back); its images stay in the "
            f"service's outputs, not copied to {out}.")
    assert r.exit_code == 11 and "".join(said.split()) in "".join(r.output.split()), r.output   # (wrapped)
    assert not out.exists()
    out.mkdir(parents=True)   # a folder the person had: kept
    r = CliRunner().invoke(cones_cli.main.app, ["generate", "a photo of a dog", "-o", str(out)])
    assert r.exit_code == 11 and out.is_dir()


class _Following:
    """A client whose job ends as `last` says (or whose stream breaks off)."""

    def __init__(self, last: ProgressInfo | None):
        self.last = last

    def follow(self, job_id):
        yield ProgressInfo(job=job_id, state="running", phase="train", step=1, total=3)
        if self.last is None:
            from cns_daemon.api.errors import Unavailable
            raise Unavailable("The service is not running.")
        yield self.last

    def job(self, job_id):   # a service gone away stays away
        from cns_daemon.api.errors import Unavailable
        raise Unavailable("The cones service is not running.")

    def service_state(self):
        return None


def _wait(last):
    import pytest

    import cones_cli.session
    cones_cli.session.REJOIN_GRACE_S, grace = 0.0, cones_cli.session.REJOIN_GRACE_S

    from cones_cli.session import wait_for
    from cns_daemon.api.errors import Unavailable
    from cns_daemon.api.protocol import JobInfo

    job = JobInfo(id="0123456789ab", kind="eval", state="running", summary="eval rex", created=0.0)
    try:
        with pytest.raises(Unavailable) as err:
            wait_for(_Following(last), job, quiet=True, tell_wait=False)
    finally:
        cones_cli.session.REJOIN_GRACE_S = grace
    return err.value.message


def test_a_job_that_failed_for_want_of_an_extra_is_not_said_to_be_kept():
    """A job failing with code `unavailable` (open_clip not installed) was told as the service
    going away: "kept: it runs when the service is back", for a job that had failed for good."""
    from cns_daemon.api.protocol import ErrorBody

    failed = ProgressInfo(job="0123456789ab", state="failed", error=ErrorBody(
        code="unavailable", message="open_clip could not be imported."))
    assert _wait(failed) == "open_clip could not be imported."
    gone = _wait(None)     # the service went away while the job ran: that job is kept
    assert "job 0123456789ab, kept" in gone


def test_a_file_one_may_not_read_is_bad_input_not_a_full_disk(tmp_path, monkeypatch, capsys):
    """A review's find: `cones add rex photo.png` with a photo one may not read exited 12 with
    "Free space on that disk", the hint for a folder that cannot be written; it is bad input
    (exit 2), as an unreadable caption already was. A write refused stays exit 12."""
    import errno
    import os

    import pytest
    import typer

    from cones_cli.views import handled
    from cns_daemon.api.errors import EXIT_CODES, ErrorCode

    photo = tmp_path / "photo.png"
    photo.write_bytes(b"x")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(photo) else real_access(p, mode))

    @handled
    def read_it():
        raise PermissionError(errno.EACCES, "Permission denied", str(photo))

    @handled
    def write_it():
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out"))

    with pytest.raises(typer.Exit) as done:
        read_it()
    assert done.value.exit_code == EXIT_CODES[ErrorCode.BAD_INPUT]
    assert "Cannot read" in capsys.readouterr().err
    with pytest.raises(typer.Exit) as done:
        write_it()
    assert done.value.exit_code == EXIT_CODES[ErrorCode.STORAGE]


def test_json_output_writes_a_non_utf8_path_as_the_cli_shows_it(capsys):
    """`generate --json -o` into a folder whose name is not UTF-8 copied the images, then failed
    on the JSON dump with a traceback and no document."""
    import json

    from cones_cli.views import print_json
    from cns_daemon.api.protocol import SkippedFile

    doc = SkippedFile(file="a.png", reason="r").model_copy(update={"file": "out-\udcff/a.png"})
    print_json(doc)
    assert json.loads(capsys.readouterr().out) == {"file": "out-\\xff/a.png", "reason": "r"}
    print_json([SkippedFile(file="b.png", reason="r")])
    assert json.loads(capsys.readouterr().out) == [{"file": "b.png", "reason": "r"}]


def test_an_error_whose_reader_went_away_keeps_its_exit_code(monkeypatch):
    """`cones show nope --json | true`: printing the error into the closed pipe escaped to click,
    which exited 1; the error's own code now (3, not found)."""
    import pytest
    import typer

    from cones_cli import views
    from cns_daemon.api.errors import EXIT_CODES, ErrorCode, NotFound

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(views, "print_error", closed)
    monkeypatch.setattr(views.os, "dup2", lambda *a: None)   # the test's own stdout stays

    @views.handled
    def show(as_json: bool = True):
        raise NotFound("No concept named 'nope'.")

    with pytest.raises(typer.Exit) as done:
        show(as_json=True)
    assert done.value.exit_code == EXIT_CODES[ErrorCode.NOT_FOUND]


def test_a_bug_in_the_cli_is_exit_70_with_the_error_document(capsys):
    """A review's find: an exception of no expected kind (a concept file's "created": 1e20 in
    `cones show`) printed a bare traceback and exited 1, with nothing on stdout for --json."""
    import json

    import pytest
    import typer

    from cones_cli import views
    from cns_daemon.api.errors import EXIT_CODES, ErrorCode

    @views.handled
    def show(as_json: bool = True):
        raise OverflowError("timestamp out of range for platform time_t")

    with pytest.raises(typer.Exit) as done:
        show(as_json=True)
    assert done.value.exit_code == EXIT_CODES[ErrorCode.INTERNAL] == 70
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "internal" and "OverflowError" in err

    @views.handled
    def leaves(as_json: bool = False):
        raise typer.Exit(4)   # the CLI's own exits pass as they are

    with pytest.raises(typer.Exit) as done:
        leaves()
    assert done.value.exit_code == 4
    for own in (typer.Abort(), typer.BadParameter("no")):   # typer's (its own click's), as they are

        @views.handled
        def raises(as_json: bool = False, own=own):
            raise own

        with pytest.raises(type(own)):
            raises()


def test_a_concepts_odd_metric_names_and_times_are_shown_not_failed():
    """A metric named "loss[/x]" was read as markup (a traceback in `cones show`), and a
    creation time no calendar holds overflowed."""
    from cones_cli.views import concept_table
    from cns_daemon.api.protocol import ConceptInfo

    c = ConceptInfo(name="odd", method="cns", class_word="star", token="t", created=1e20, photos=3,
                    size_bytes=1, neurons=1, metrics={"loss[/x]": 0.5})
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=False).print(concept_table(c))
    assert "metric loss[/x]" in out.getvalue() and "created" in out.getvalue()


def test_narrow_terminals_get_a_block_a_row_with_every_value_whole():
    """At 40-60 columns the tables cut job states to "runn…", emptied the class and created
    cells, folded "square" to "squar/e" and cut CLIP scores to "0.81…": below each table's
    width a row is printed as a block of "column: value" lines instead."""
    import time

    from cones_cli.views import concepts_table, eval_table, jobs_table
    from cns_daemon.api.protocol import ConceptInfo, JobInfo

    now = time.time() - 200
    jobs = [JobInfo(id="ea4c87da6744", kind="learn", state="running", created=now,
                    summary="learn <sq> (square, cones, 20+900 steps, 4 photos)",
                    progress=ProgressInfo(job="ea4c87da6744", state="running", phase="tune", step=232, total=900)),
            JobInfo(id="8667d0b31bfc", kind="generate", state="failed", created=now, summary="generate 'x' ×4",
                    error={"code": "storage", "message": "The disk is full.", "hint": ""})]
    concepts = [ConceptInfo(name=f"rex{i}", method="cns", class_word="square", token="t", created=now,
                            photos=4, size_bytes=50_000, neurons=12_345, overlap={"ring": 300}) for i in range(2)]

    def shown(renderable, width):
        out = io.StringIO()
        Console(file=out, width=width, force_terminal=False, soft_wrap=True).print(renderable)
        return out.getvalue()

    for width in (40, 60):
        text = shown(jobs_table(jobs), width)
        for line in ("ea4c87da6744", "  state: running", "  what: learn <sq> (square, cones, 20+900 steps, 4 photos)",
                     "  progress: tune 232/900", "  created: 3 min ago", "8667d0b31bfc", "  state: failed",
                     "  note: The disk is full."):
            assert line in text.splitlines(), (width, text)
        text = shown(concepts_table(concepts), width)
        for name in ("rex0", "rex1"):
            assert name in text.splitlines(), (width, text)
        for line in ("  method: cns", "  class: square", "  size: 50.0 kB", "  neurons: 12,345",
                     "  overlap: ring: 300", "  created: 3 min ago"):
            assert text.splitlines().count(line) == 2, (width, text)
    text = shown(eval_table(["rex"], {"clip_i": 0.8123, "clip_t": 0.2711, "n_images": 8, "n_prompts": 4,
                                      "clip": "ViT-B-32 laion2b"}), 40)
    assert "  CLIP-I: 0.8123" in text.splitlines() and "  CLIP-T: 0.2711" in text.splitlines(), text
    # a damaged concept adds the state column: blocks up to 8 columns wider
    damaged = [concepts[0].model_copy(update={"state": "damaged", "problem": "x"}), concepts[1]]
    assert "  state: damaged" in shown(concepts_table(damaged), 76).splitlines()
    assert "│ rex0" in shown(concepts_table(damaged), 80)
    # wide enough, the tables as before
    assert "│ rex0" in shown(concepts_table(concepts), 80) and "─" in shown(jobs_table(jobs), 80)
    assert "┃ CLIP-I" in shown(eval_table(["rex"], {"clip_i": 0.8, "clip_t": 0.2, "n_images": 8,
                                                  "n_prompts": 4}), 60)


def test_a_cones_learns_summary_counts_its_value_training():
    """`cones add --method cones --steps 20` read "20 steps" in `cones jobs` and `status`, then
    trained its values 900 steps more: --steps is its selection walk's."""
    from cns_daemon.api.protocol import LearnJob
    from cns_daemon.jobkinds import KINDS

    def summary(**kw):
        return KINDS["learn"].summary(LearnJob(name="sq", class_word="square", photo_digests=["0" * 64], **kw))

    assert "(square, cones, 20+900 steps, 1 photo)" in summary(method="cones", steps=20)
    assert "(square, cones, 30+50 steps, 1 photo)" in summary(method="cones", options={"tune_steps": 50})
    assert "(square, cones, 20 steps, 1 photo)" in summary(method="cones", steps=20, options={"values": "shut"})
    assert "(square, cns, 20 steps, 1 photo)" in summary(method="cns", steps=20)
    assert "(square, cns, 1 photo)" in summary(method="cns")


def test_help_on_a_narrow_terminal_keeps_option_names_and_values_whole():
    """At 40 columns rich's boxed help printed "--meth…", "--opti…" and "42949672…"; below 80
    columns the plain help wraps them instead (wider, the boxed help stays)."""
    import os
    import subprocess
    import sys

    def help_text(columns, terminal_width=""):
        env = {**os.environ, "COLUMNS": str(columns), "TERMINAL_WIDTH": terminal_width}
        run = subprocess.run([sys.executable, "-m", "cones_cli.main", "add", "--help"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout

    narrow = help_text(40)   # (plain help is 50 wide at least: the terminal wraps, nothing is cut)
    assert max(len(line) for line in narrow.splitlines()) <= 50, narrow
    for whole in ("--method", "--option", "--no-wait", "4294967295", "--class"):
        assert whole in narrow, narrow
    assert not re.search(r"\w…", narrow) and "╭" not in narrow, narrow   # (its own "star …" stays)
    assert "╭" in help_text(100)
    assert "╭" not in help_text(100, terminal_width="40")   # the width typer's help sizes itself by


def test_help_paragraphs_are_not_broken_where_the_source_breaks_them():
    """`cones prune-photos --help` printed "Those of concepts a salvage" and went on on the next
    line: the help keeps the line breaks inside a docstring's later paragraphs."""
    import typer

    from cones_cli.main import app

    def broken(command, path):
        later = (command.help or "").strip().split("\n\n")[1:]
        found = [path] if any("\n" in p.strip() for p in later) else []
        for name, sub in getattr(command, "commands", {}).items():
            found += broken(sub, f"{path} {name}")
        return found

    assert broken(typer.main.get_command(app), "cones") == []


def test_a_job_with_no_phase_to_show_prints_nothing():
    """A followed job that finished with no phase shown wrote an empty line to a pipe."""
    def quick(job="0123456789ab"):
        yield ProgressInfo(job=job, state="queued")
        yield ProgressInfo(job=job, state="done")

    out = io.StringIO()
    assert follow(quick(), console=Console(file=out, width=100, force_terminal=False)).state == "done"
    assert out.getvalue() == ""
