"""The service end to end with a real daemon process (FakeEngine: the model parts are sleeps),
driven through the real CLI: add, list, show, generate, jobs, cancel, rm, status, the socket's
modes, one instance per socket, and two clients at once."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from cones_cli.client import Client
from cones_cli.main import app
from cns_daemon.api.errors import EXIT_CODES, ErrorCode
from helpers.service import (REPO, cli_in_process, daemon_env, running_daemon, short_home,
                                  start_daemon, wait_until, write_photos)

runner = CliRunner()


@pytest.fixture(scope="module")
def daemon():
    with running_daemon() as d:
        yield d


@pytest.fixture
def cones(daemon, monkeypatch):
    """Run the CLI in-process against the module's daemon; returns (exit code, stdout + stderr)."""
    return cli_in_process(daemon.home, monkeypatch, merged=True)


def test_add_list_show_generate(cones, daemon, tmp_path):
    photos = write_photos(tmp_path / "rex", 3)
    code, out = cones("add", "rex", *map(str, photos), "--class", "dog", "--steps", "5")
    assert code == 0, out
    assert "Learned <rex>" in out
    code, out = cones("list", "--json")
    assert code == 0, out
    names = {c["name"]: c for c in json.loads(out)}
    assert names["rex"]["class_word"] == "dog" and names["rex"]["photos"] == 3
    assert names["rex"]["size_bytes"] > 0
    code, out = cones("show", "rex", "--json")
    assert json.loads(out)["method"] == "cns"
    code, out = cones("show", "Rex")
    assert code == EXIT_CODES[ErrorCode.NOT_FOUND] and "Did you mean 'rex'?" in out, out
    code, out = cones("generate", "a photo of <rex>", "-n", "2", "--seed", "1", "--json",
                      "-o", str(tmp_path / "out"))
    assert code == 0, out
    job = json.loads(out)
    assert job["state"] == "done" and len(job["result"]["images"]) == 2
    for p in job["result"]["images"] + [job["result"]["contact_sheet"]]:
        assert p.startswith(str(tmp_path / "out")) and open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # photos are in the content-addressed archive
    archived = [p for p in (daemon.home / "data" / "archive").rglob("*.png")]
    assert len(archived) >= 3
    # a folder named with brackets: the paths printed are where the files are ("[red]" was
    # read as markup and left out), and a prompt with "[/]" does not break `cones jobs`
    code, out = cones("generate", "a photo of <rex> [/]", "--seed", "1", "-o", str(tmp_path / "shots[red]"))
    printed = [line for line in out.splitlines() if line.endswith(".png")]
    assert code == 0 and printed and all(os.path.isfile(p) and "shots[red]" in p for p in printed), out
    code, out = cones("jobs")
    assert code == 0 and "<rex> [/]" in out, out


def test_add_prints_the_learn_results_note(cones, tmp_path):
    photos = write_photos(tmp_path / "n", 3)
    code, out = cones("add", "noted1", *map(str, photos), "--class", "noted", "--steps", "2")
    assert code == 0, out
    assert "Learned <noted1>" in out and f"Note: photo 2 of 3 ({photos[1].name}) was trained whole" in out


def test_ctrl_c_while_following_says_the_job_goes_on_and_json_gets_its_document(daemon, tmp_path, monkeypatch):
    import cones_cli.session

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cones_cli.session, "follow", interrupted)
    cones = cli_in_process(daemon.home, monkeypatch)
    code, out, err = cones("generate", "a plain photo", "--json")
    assert code == 130 and "goes on in the service" in err, err
    body = json.loads(out)["error"]
    assert body["code"] == "interrupted" and "goes on in the service" in body["message"]
    assert "cones cancel" in body["hint"]
    code, out, err = cones("generate", "a plain photo")
    assert code == 130 and out == "" and "cancel" in err and "goes on in the service" in err
    # Ctrl-C before the service answered the submission: it exited 130 without a word, and the
    # job was queued all the same
    import httpx

    sent = httpx.Client.request

    def cut_short(self, method, url, **kw):
        if method == "POST":
            raise KeyboardInterrupt
        return sent(self, method, url, **kw)

    monkeypatch.setattr(httpx.Client, "request", cut_short)
    code, out, err = cones("generate", "a plain photo", "--json")
    said = " ".join(err.split())
    assert code == 130 and "the service may have taken it" in said and "cones jobs" in said, err
    assert json.loads(out)["error"]["code"] == "interrupted"


def test_a_concept_still_being_learned_is_said_to_be(cones, tmp_path):
    photos = write_photos(tmp_path / "pending", 2)
    code, out = cones("add", "pending", *map(str, photos), "--class", "dog", "--steps", "5000",
                      "--no-wait", "--json")
    assert code == 0, out
    job = json.loads(out)["id"]
    try:
        for verb in (("rm", "pending"), ("show", "pending"), ("export", "pending", "-o", str(tmp_path / "x")),
                     ("generate", "a photo of <pending> on the grass")):
            code, out = cones(*verb)
            assert code == 3 and "not learned yet" in out and f"cones cancel {job}" in out, (verb, out)
        code, out = cones("show", "nosuch")
        assert code == 3 and "No concept named 'nosuch'" in out, out
    finally:
        cones("cancel", job)


def test_the_commands_own_method_and_steps_settings_apply(cones, tmp_path, monkeypatch):
    """CONES_METHOD / CONES_STEPS (or config.toml) where `cones add` runs are what it sends when
    its flags leave them out; flags still win."""
    photos = [str(p) for p in write_photos(tmp_path / "envd", 2)]
    monkeypatch.setenv("CONES_METHOD", "cones2")
    monkeypatch.setenv("CONES_STEPS", "3")
    code, out = cones("add", "envd", *photos, "--class", "dog", "--json")
    assert code == 0, out
    assert "(dog, cones2, 3 steps" in json.loads(out)["summary"], out
    code, out = cones("add", "flagd", *photos, "--class", "dog", "--method", "cns", "--steps", "4", "--json")
    assert code == 0 and "(dog, cns, 4 steps" in json.loads(out)["summary"], out


def test_status_json_has_paths_model_and_queue(cones, daemon):
    code, out = cones("status", "--json")
    assert code == 0, out
    s = json.loads(out)
    assert s["socket"] == str(daemon.socket)
    assert s["data"] == str(daemon.home / "data") and s["inbox"] == str(daemon.home / "inbox")
    assert (s["model"], s["device"], s["dtype"]) == ("fake", "cpu", "float32")
    assert s["fingerprint"] == "f" * 32 and s["queue"]["queued"] >= 0 and s["pid"] == daemon.proc.pid
    assert s["method"] == "cns"   # what `cones add` without --method learns with


def test_typed_errors_and_exit_codes(cones, tmp_path):
    code, out = cones("show", "nobody")
    assert code == EXIT_CODES[ErrorCode.NOT_FOUND] and "No concept named 'nobody'" in out
    code, out = cones("generate", "a photo of <nobody>")
    assert code == EXIT_CODES[ErrorCode.NOT_FOUND] and "<nobody>" in out
    photos = write_photos(tmp_path / "p", 1)
    code, out = cones("add", "../x", str(photos[0]), "--class", "dog")
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "name" in out
    code, out = cones("cancel", "0123456789ab")
    assert code == EXIT_CODES[ErrorCode.NOT_FOUND]
    code, out = cones("cancel", "0123456789AB")   # hex in capitals: the same id, not a bad one
    assert code == EXIT_CODES[ErrorCode.NOT_FOUND], out
    code, out = cones("cancel", "nosuchjob")   # not a job id at all: refused before it is sent
    assert code == EXIT_CODES[ErrorCode.BAD_INPUT] and "Invalid job id" in out


def test_json_commands_print_their_error_as_json(daemon, monkeypatch):
    """With --json, stdout holds one JSON document even when the command fails: {"error": ...}
    with the error's code, message and hint; the exit code is the error's."""
    cones = cli_in_process(daemon.home, monkeypatch)   # stdout and stderr apart
    for args, code_word in ((("show", "nobody", "--json"), "not_found"),
                            (("generate", "a photo of <nobody>", "--json"), "not_found"),
                            (("generate", "a dog", "--cfg", "99", "--json"), "bad_input")):
        code, out, err = cones(*args)
        error = json.loads(out)["error"]
        assert error["code"] == code_word and code == EXIT_CODES[ErrorCode(code_word)], (args, out)
        assert error["message"][:20] in err   # the words on stderr as without --json


def test_cancel_running_learn_leaves_no_concept(cones, daemon, tmp_path):
    photos = write_photos(tmp_path / "slow", 3)
    code, out = cones("add", "slowpoke", *map(str, photos), "--class", "cat", "--steps", "400",
                      "--no-wait", "--json")
    assert code == 0, out
    job_id = json.loads(out)["id"]
    with Client(daemon.socket) as c:
        wait_until(lambda: c.job(job_id).state == "running", what="job running")
        code, out = cones("cancel", job_id)
        assert code == 0 and "stops at its next step" in out, out
        wait_until(lambda: c.job(job_id).state == "cancelled", what="job cancelled")
        assert "slowpoke" not in {x.name for x in c.concepts()}
        assert c.job(job_id).error.code == "cancelled"
    # a job that has finished is not cancelled again, and the CLI says so with exit code 4
    code, out = cones("cancel", job_id)
    assert code == EXIT_CODES[ErrorCode.CONFLICT] and "already finished: cancelled" in out, out


@pytest.mark.slow   # 8-10 s of service restarts and waits (CI runs -m slow)
def test_a_queued_job_says_what_it_waits_for(cones, daemon, tmp_path):
    photos = [str(p) for p in write_photos(tmp_path / "w", 2)]

    def start_long(name: str) -> str:
        code, out = cones("add", name, *photos, "--class", "dog", "--steps", "150", "--no-wait", "--json")
        assert code == 0, out
        with Client(daemon.socket) as c:
            wait_until(lambda: c.job(json.loads(out)["id"]).state == "running", what=f"{name} running")
        return json.loads(out)["id"]

    start_long("ahead")
    # with --json nothing but the document is printed, queued or not
    code, out = cones("add", "later", *photos, "--class", "dog", "--steps", "2", "--json")
    assert code == 0 and json.loads(out)["state"] == "done", out
    ahead = start_long("ahead2")
    code, out = cones("add", "behind", *photos, "--class", "dog", "--steps", "2")
    assert code == 0 and f"is queued: job {ahead} runs (learn <ahead2>" in out, out
    # with others queued too, they are counted (one running job named, not all that go first)
    ahead3 = start_long("ahead3")
    code, out = cones("add", "queued1", *photos, "--class", "dog", "--steps", "2", "--no-wait")
    assert code == 0, out
    code, out = cones("add", "behind2", *photos, "--class", "dog", "--steps", "2")
    said = " ".join(out.split())
    assert code == 0 and f"job {ahead3} runs (learn <ahead3>" in said and "with 1 other job queued" in said, out


def test_generate_runs_inside_a_running_learn_and_before_queued_ones(daemon, tmp_path):
    with Client(daemon.socket) as c:
        from cns_daemon.api.protocol import AddRequest, GenerateRequest, Photo

        photos = [Photo(filename=p.name, data=p.read_bytes()) for p in write_photos(tmp_path / "q", 2)]
        first = c.add(AddRequest(name="first", class_word="dog", steps=150, photos=photos))
        wait_until(lambda: c.job(first.id).state == "running", what="first running")
        second = c.add(AddRequest(name="second", class_word="dog", steps=5, photos=photos))
        gen = c.generate(GenerateRequest(prompt="a plain photo", steps=2))
        wait_until(lambda: c.job(gen.id).state == "done", timeout=60, what="generate done")
        assert c.job(first.id).state == "running"   # it paused for the generate, and goes on
        wait_until(lambda: c.job(second.id).state == "done", timeout=60, what="second done")
        first_job, gen_job, second_job = c.job(first.id), c.job(gen.id), c.job(second.id)
        # the generate ran between two steps of the running learn; the queued learn waited
        assert first_job.state == "done" and first_job.attempts == 1
        assert first_job.started <= gen_job.started <= gen_job.finished <= first_job.finished
        assert first_job.finished <= second_job.started


def test_two_clients_follow_and_list_at_once(daemon, tmp_path):
    from cns_daemon.api.protocol import AddRequest, Photo

    photos = [Photo(filename=p.name, data=p.read_bytes()) for p in write_photos(tmp_path / "two", 2)]
    with Client(daemon.socket) as c1, Client(daemon.socket) as c2:
        job = c1.add(AddRequest(name="followed", class_word="mug", steps=40, photos=photos))
        events, lists = [], []

        def follow():
            events.extend(c1.follow(job.id))

        t = threading.Thread(target=follow)
        t.start()
        while t.is_alive():
            lists.append(len(c2.concepts()))
        t.join()
    steps = [e.step for e in events if e.phase == "train"]
    assert events[-1].state == "done"
    assert steps == sorted(steps) and steps[-1] == 40 and len(steps) > 5
    assert len(lists) > 3   # listing kept answering while the other client followed


def test_socket_and_folder_modes(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.socket.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(daemon.socket).st_mode)


def test_peer_credentials_name_the_connecting_user():
    import socket as so

    from cns_daemon.daemon import peer_uid

    a, b = so.socketpair(so.AF_UNIX, so.SOCK_STREAM)
    with a, b:
        assert peer_uid(a) == os.getuid()   # what the server compares with its own uid


def test_second_serve_refuses_with_clear_message(daemon):
    proc = subprocess.run([sys.executable, "-m", "cones_cli.main", "serve"], env=daemon_env(daemon.home),
                          cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_CODES[ErrorCode.CONFLICT], proc.stderr
    assert "already running" in proc.stderr and str(daemon.socket) in proc.stderr
    assert daemon.proc.poll() is None and daemon.socket.exists()   # the first one is untouched


def test_not_running_says_how_to_start(monkeypatch, tmp_path):
    monkeypatch.setenv("CONES_HOME", str(tmp_path / "nothing"))
    result = runner.invoke(app, ["list"])
    assert result.exit_code == EXIT_CODES[ErrorCode.UNAVAILABLE]
    assert "not running" in result.stderr and "cones serve" in result.stderr


def test_starting_service_is_reported_as_starting(monkeypatch, tmp_path):
    import fcntl

    home = tmp_path / "h"
    (home / "run").mkdir(parents=True)
    monkeypatch.setenv("CONES_HOME", str(home))
    with open(home / "run" / "cones.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # what `cones serve` holds while the model loads
        result = runner.invoke(app, ["status"])
    assert result.exit_code == EXIT_CODES[ErrorCode.UNAVAILABLE] and "starting" in result.stderr
    result = runner.invoke(app, ["status"])
    assert "not running" in result.stderr


def test_stale_socket_is_replaced():
    home = short_home()
    try:
        run = home / "run"
        run.mkdir(parents=True)
        import socket as so

        s = so.socket(so.AF_UNIX)
        s.bind(str(run / "cones.sock"))   # a socket file nobody listens on
        s.close()
        d = start_daemon(home)
        try:
            with Client(d.socket) as c:
                assert c.status().pid == d.proc.pid
        finally:
            d.kill(15)
        assert d.proc.returncode == 0 and not d.socket.exists()   # clean shutdown removes it
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_follower_that_disconnects_leaves_the_service_healthy(daemon, tmp_path):
    from cns_daemon.api.protocol import AddRequest, Photo

    photos = [Photo(filename=p.name, data=p.read_bytes()) for p in write_photos(tmp_path / "gone", 2)]
    with Client(daemon.socket) as c:
        job = c.add(AddRequest(name="leaver", class_word="dog", steps=100, photos=photos))
        for i, _ in enumerate(c.follow(job.id)):   # read a few lines, then hang up mid-stream
            if i == 3:
                break
    with Client(daemon.socket) as c:
        wait_until(lambda: c.job(job.id).state == "done", timeout=60, what="job done after hang-up")
        assert c.status().pid == daemon.proc.pid
    assert "RuntimeError" not in daemon.output() and "Traceback" not in daemon.output()


def test_data_store_and_archive_are_private():
    """Photos of people: the data folder, store, archive and outputs are 0700 folders with 0600
    files, and looser ones left by an older version are tightened at start-up."""
    from cns_daemon.api.protocol import AddRequest, GenerateRequest, Photo

    home = short_home()
    try:
        (home / "data" / "archive" / "ab").mkdir(parents=True, mode=0o755)
        os.chmod(home / "data", 0o755)
        os.chmod(home / "data" / "archive", 0o755)
        old_output = home / "data" / "outputs" / "0123456789ab" / "old.png"   # loosened since
        old_output.parent.mkdir(parents=True)
        old_output.write_bytes(b"png")
        os.chmod(old_output.parent, 0o755)
        os.chmod(old_output.parent.parent, 0o755)
        os.chmod(old_output, 0o644)
        d = start_daemon(home)
        try:
            photos = [Photo(filename=p.name, data=p.read_bytes()) for p in write_photos(home / "src", 2)]
            with Client(d.socket) as c:
                job = c.add(AddRequest(name="private", class_word="dog", steps=2, photos=photos))
                wait_until(lambda: c.job(job.id).state == "done", what="learned")
                gen = c.generate(GenerateRequest(prompt="a photo of <private>", steps=2))
                wait_until(lambda: c.job(gen.id).state == "done", what="generated")
        finally:
            d.kill(15)
        data = home / "data"
        paths = [data] + [p for p in data.rglob("*")]
        assert any(p.suffix == ".png" for p in (data / "archive").rglob("*"))
        assert any(p.name == "data.mdb" for p in paths) and any(p.parent.name.endswith(gen.id) for p in paths)
        loose = [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in paths
                 if stat.S_IMODE(p.stat().st_mode) != (0o700 if p.is_dir() else 0o600)]
        assert not loose, loose
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_config_toml_method_and_steps_reach_the_learn_job():
    """`method` and `steps` in config.toml are the defaults of a learn request that leaves them
    out (the queued job says which it got); a request's own value still wins."""
    from cns_daemon.api.protocol import AddRequest, Photo

    home = short_home()
    try:
        (home / "config").mkdir(parents=True)
        (home / "config" / "config.toml").write_text('method = "cones"\nsteps = 3\n')
        d = start_daemon(home)
        try:
            photos = [Photo(filename=p.name, data=p.read_bytes()) for p in write_photos(home / "src", 2)]
            with Client(d.socket) as c:
                plain = c.add(AddRequest(name="plain", class_word="dog", photos=photos))
                own = c.add(AddRequest(name="own", class_word="dog", method="cns", steps=5, photos=photos))
                assert "(dog, cones, 3+900 steps, 2 photos)" in plain.summary, plain.summary
                assert "(dog, cns, 5 steps, 2 photos)" in own.summary, own.summary
                for job in (plain, own):
                    wait_until(lambda: c.job(job.id).state == "done", what="learned")
                assert c.concept("plain").method == "cones"
        finally:
            d.kill(15)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_rm_with_photos_deletes_the_photos_no_other_concept_uses(cones, daemon, tmp_path):
    """`cones rm NAME --photos`: the concept's archived photos go too (photos of people), but
    a photo another concept was learned from stays; plain `cones rm` keeps them all."""
    import hashlib

    from cns_daemon.archive import Archive

    photos = write_photos(tmp_path / "p", 4, seed=300)
    archive = Archive(daemon.home / "data" / "archive")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos}
    assert cones("add", "pa", *map(str, photos[:3]), "--class", "dog", "--steps", "2")[0] == 0
    assert cones("add", "pb", *map(str, photos[2:]), "--class", "dog", "--steps", "2")[0] == 0
    assert all(archive.has(d) for d in digest.values())
    code, out = cones("rm", "pa", "--photos")
    assert code == 0 and "Removed <pa> and 2 archived photos (1 kept: another concept or a queued " \
        "learn uses it)." in " ".join(out.split()), out
    assert [archive.has(digest[p.name]) for p in photos] == [False, False, True, True]
    assert json.loads(cones("show", "pb", "--json")[1])["photos_archived"] == 2
    assert "remove <pa> and its photos" in [j["summary"] for j in json.loads(cones("jobs", "--json")[1])]
    code, out = cones("rm", "pb")   # says how to learn it again from the photos it keeps
    said = out.strip().splitlines()
    kept = sorted(str(archive.path(digest[f"photo{k}.png"])) for k in (2, 3))
    assert code == 0 and said[:2] == ["Removed <pb>.", "Its 2 photos stay in the archive (`cones prune-photos` "
                                      "deletes those no other concept uses); to learn it again as it was:"], out
    words = said[2].split()
    assert words[:3] == ["cones", "add", "pb"] and sorted(words[3:5]) == kept, out
    assert " ".join(words[5:]).startswith("--class dog --method cns"), out   # (the fake engine's: no steps)
    assert archive.has(digest["photo2.png"]) and archive.has(digest["photo3.png"])
    # ... until `cones prune-photos`, which deletes what no concept uses, and nothing else
    def held() -> dict:
        return {c["name"]: c["photos_archived"] for c in json.loads(cones("list", "--json")[1])}

    before = held()
    code, out = cones("prune-photos")
    assert code == 0 and out.startswith("Deleted "), out
    assert not archive.has(digest["photo2.png"]) and not archive.has(digest["photo3.png"])
    assert held() == before   # every stored concept keeps the photos it had here


def test_rm_with_photos_keeps_a_photo_a_queued_learn_needs(cones, daemon, tmp_path):
    """A learn queued behind the running one names a photo of the concept being removed: the
    removal (which runs first: it outranks learns) keeps it, and the learn then has it."""
    import hashlib

    from cns_daemon.archive import Archive

    photos = write_photos(tmp_path / "q", 3, seed=400)
    others = write_photos(tmp_path / "o", 2, seed=450)
    archive = Archive(daemon.home / "data" / "archive")
    shared = hashlib.sha256(photos[0].read_bytes()).hexdigest()
    assert cones("add", "qa", *map(str, photos[:2]), "--class", "dog", "--steps", "2")[0] == 0
    with Client(daemon.socket) as c:
        busy = json.loads(cones("add", "qbusy", *map(str, others), "--class", "dog", "--steps", "150",
                                "--no-wait", "--json")[1])["id"]
        wait_until(lambda: c.job(busy).state == "running", what="a learn running")
        queued = json.loads(cones("add", "qnext", str(photos[0]), str(photos[2]), "--class", "dog",
                                  "--steps", "2", "--no-wait", "--json")[1])["id"]
        code, out = cones("rm", "qa", "--photos")
        assert code == 0 and "Removed <qa> and 1 archived photo (1 kept" in " ".join(out.split()), out
        assert archive.has(shared)
        wait_until(lambda: c.job(queued).state == "done", timeout=30, what="the queued learn done")


def test_the_photos_of_a_cancelled_or_failed_learn_are_let_go(cones, daemon, tmp_path):
    """A review's find: a learn cancelled or failed kept its photos in the archive for good,
    nothing pointing to them (a failed `cones add` of 45 phone photos kept them all). A photo a
    stored concept was learned from stays."""
    import hashlib

    from cns_daemon.archive import Archive

    photos = write_photos(tmp_path / "c", 3, seed=480)
    others = write_photos(tmp_path / "b", 2, seed=490)
    archive = Archive(daemon.home / "data" / "archive")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in photos]
    assert cones("add", "ckeep", str(photos[0]), str(photos[1]), "--class", "dog", "--steps", "2")[0] == 0
    with Client(daemon.socket) as c:
        busy = json.loads(cones("add", "cbusy", *map(str, others), "--class", "dog", "--steps", "150",
                                "--no-wait", "--json")[1])["id"]
        wait_until(lambda: c.job(busy).state == "running", what="a learn running")
        gone = json.loads(cones("add", "cgone", *map(str, photos[1:]), "--class", "dog", "--steps", "2",
                                "--no-wait", "--json")[1])["id"]
        assert all(archive.has(d) for d in digest)
        assert cones("cancel", gone)[0] == 0
        wait_until(lambda: not archive.has(digest[2]), what="the cancelled learn's own photo let go")
        assert archive.has(digest[0]) and archive.has(digest[1])   # <ckeep>'s
        c.cancel(busy)
        wait_until(lambda: c.job(busy).state == "cancelled", what="the busy learn cancelled")
        wait_until(lambda: not any(archive.has(hashlib.sha256(p.read_bytes()).hexdigest()) for p in others),
                   what="its photos let go")


def test_a_removal_retried_after_a_crash_still_deletes_its_photos():
    """The first run removed the concept and died before the photos: the retry finds the
    concept gone, does not fail on it, and deletes the photos the job recorded."""
    from types import SimpleNamespace

    from cns_daemon.api.protocol import RemoveJob
    from cns_daemon.jobkinds import _remove

    class Store(set):   # none stored; "gone" is one a salvage left behind (its photos kept for it)
        lost = {"gone"}

        def drop_lost(self, name):
            self.lost.discard(name)

    forgotten = []

    def forget(digests):   # the lost concept is let go first, or its photos would be kept for it
        forgotten.append((digests, set(service.store.lost)))
        return len(digests), 0

    service = SimpleNamespace(store=Store(), forget_photos=forget)
    req = RemoveJob(name="gone", photos=True, photo_digests=["ab" * 32])
    result = _remove(service, req, SimpleNamespace(attempts=2), None, None)
    assert result.concept == "gone" and result.metrics == {"photos_deleted": 1, "photos_kept": 0}
    assert forgotten == [(["ab" * 32], set())]


@pytest.mark.slow   # 8-10 s of service restarts and waits (CI runs -m slow)
def test_finished_jobs_beyond_the_kept_number_are_pruned_at_start(tmp_path, monkeypatch):
    """keep_jobs: the newest finished jobs stay, older ones go at start-up (and every 50
    finished jobs); the newest learn of a stored concept stays however old (salvage reads it)."""
    home = short_home()
    try:
        d = start_daemon(home, CONES_KEEP_JOBS="10")
        cones = cli_in_process(home, monkeypatch)
        photos = write_photos(tmp_path / "k", 2)
        assert cones("add", "keepme", *map(str, photos), "--class", "dog", "--steps", "2")[0] == 0
        for i in range(14):
            assert cones("generate", "a photo of <keepme>", "--steps", "2", "--seed", str(i))[0] == 0
        assert len(json.loads(cones("jobs", "--json", "--limit", "100")[1])) == 15
        d.kill(15)
        d = start_daemon(home, CONES_KEEP_JOBS="10")
        jobs = json.loads(cones("jobs", "--json", "--limit", "100")[1])
        assert len(jobs) == 11 and sum(j["kind"] == "learn" for j in jobs) == 1, jobs
        assert sorted(j["result"]["seed"] for j in jobs if j["kind"] == "generate") == list(range(4, 14))
        d.kill(15)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_requests_for_one_name_at_once_are_one_job(cones, daemon, tmp_path):
    """Adds of one name sent at the same moment: one is queued, the others refused at once
    (all were accepted, and all but one failed later); the same for removals of one concept,
    and for an add of a name an import queued before it is bringing in."""
    from concurrent.futures import ThreadPoolExecutor

    from cns_daemon.api.protocol import AddRequest, Photo

    photos = write_photos(tmp_path / "race", 2, seed=500)
    req = AddRequest(name="racer", class_word="dog", steps=2,
                     photos=[Photo(filename=p.name, data=p.read_bytes()) for p in photos])

    def add(_):
        with Client(daemon.socket) as c:
            try:
                return c.add(req).id
            except Exception as exc:   # noqa: BLE001 - the refusal is the result
                return type(exc).__name__

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(add, range(6)))
    assert sum(r == "Conflict" for r in results) == 5, results
    with Client(daemon.socket) as c:
        wait_until(lambda: "racer" in {x.name for x in c.concepts()}, what="racer learned")

        def rm(_):
            with Client(daemon.socket) as c2:
                try:
                    return c2.remove("racer").id
                except Exception as exc:   # noqa: BLE001
                    return type(exc).__name__

        with ThreadPoolExecutor(4) as pool:
            removals = list(pool.map(rm, range(4)))
        assert sum(r in ("Conflict", "NotFound") for r in removals) == 3, removals


def test_a_file_that_is_no_concept_file_is_named_without_python_words(cones, daemon, tmp_path):
    """`cones import trunc.safetensors` said "(SafetensorError: ...)" and not which file."""
    from cns_daemon.api.errors import BadInput
    from cns_daemon.transfer import decode

    cut = tmp_path / "trunc.safetensors"
    cut.write_bytes(b"\x08\x00\x00")
    code, out = cones("import", str(cut))
    said = " ".join(out.split())
    assert code == 2 and f"{cut}: This is not a cones concept file (" in said, said
    assert "SafetensorError" not in said and "Export it again" in said
    import numpy as np
    import safetensors.numpy

    from cns_daemon.transfer import FORMAT
    with pytest.raises(BadInput) as refused:   # a key it must have, named as missing
        decode(safetensors.numpy.save({"x": np.zeros(2, np.float32)}, metadata={"format": FORMAT}))
    assert "KeyError" not in refused.value.message and "no 'meta' in it" in refused.value.message


def test_an_import_queued_holds_its_name_and_its_upload_goes_with_a_cancel(cones, daemon, tmp_path):
    """An add of a name a queued import brings in is refused; cancelling the import before it
    runs removes its upload from the data folder (it stayed there for good)."""
    photos = write_photos(tmp_path / "imp", 2, seed=600)
    assert cones("add", "src", *map(str, photos), "--class", "dog", "--steps", "2")[0] == 0
    exported = tmp_path / "src.safetensors"
    assert cones("export", "src", "-o", str(exported))[0] == 0
    uploads = daemon.home / "data" / "imports"
    with Client(daemon.socket) as c:
        busy = json.loads(cones("add", "blocker", *map(str, photos), "--class", "dog", "--steps", "400",
                                "--no-wait", "--json")[1])["id"]
        wait_until(lambda: c.job(busy).state == "running", what="a learn running")
        imp = c.import_file(exported.read_bytes(), "incoming")
        assert len(list(uploads.glob("*.safetensors"))) == 1
        code, out = cones("add", "incoming", *map(str, photos), "--class", "dog", "--steps", "2")
        assert code == EXIT_CODES[ErrorCode.CONFLICT] and "being imported" in out, out
        c.cancel(imp.id)
        wait_until(lambda: not list(uploads.glob("*.safetensors")), what="the upload removed")
        c.cancel(busy)


def test_start_up_sweeps_what_a_killed_process_left_half_made(tmp_path):
    """An output folder a killed generate was writing (hidden until whole) and an upload no
    queued import will read are removed at start-up; finished output folders stay."""
    home = short_home()
    try:
        outputs, uploads = home / "data" / "outputs", home / "data" / "imports"
        (outputs / ".partial-20261206-000000-aaaaaaaaaaaa").mkdir(parents=True)
        (outputs / ".partial-20261206-000000-aaaaaaaaaaaa" / "00.png").write_bytes(b"cut")
        (outputs / "20261205-000000-bbbbbbbbbbbb").mkdir()
        uploads.mkdir(parents=True)
        (uploads / "0123.safetensors").write_bytes(b"orphan")
        d = start_daemon(home)
        assert [p.name for p in outputs.iterdir()] == ["20261205-000000-bbbbbbbbbbbb"]
        assert not list(uploads.iterdir())
        d.kill(15)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_files_the_cli_leaves_out_are_kept_with_the_job_and_named_in_a_refusal(cones, daemon, tmp_path):
    """A HEIC or video `cones add` does not send is in the job's skipped list (`cones jobs`
    shows it) and in the service's refusal when too few photos remain."""
    photos = write_photos(tmp_path / "cli", 2, seed=700)
    heic = tmp_path / "cli" / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    code, out = cones("add", "clikept", *map(str, photos), str(heic), "--class", "dog", "--steps", "2", "--json")
    assert code == 0, out
    job, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])   # after the "skipped" line
    assert [s["file"] for s in job["skipped"]] == ["IMG_0001.HEIC"]
    code, out = cones("add", "clione", str(photos[0]), str(heic), "--class", "dog", "--steps", "2")
    assert code == EXIT_CODES[ErrorCode.BAD_PHOTO] and "IMG_0001.HEIC: a HEIC photo" in " ".join(out.split()), out


def test_pruning_keeps_the_jobs_that_ended_last(tmp_path):
    """Newest by when a job ended, not when it was asked: a learn queued first that failed after
    an hour is the news of the day, and was pruned the moment it ended."""
    from cns_daemon.api.settings import load_settings
    from cns_daemon.service import Service
    from cones_store import ConceptStore
    from cones_store.records import JobRecord

    settings = load_settings(home=str(tmp_path), keep_jobs=10)
    store = ConceptStore.open(tmp_path / "store")
    service = Service(settings, store, engine=None)
    now = time.time()
    ends = {"long-learn": (now - 100, now)}
    ends |= {f"gen-{i:02}": (now - 90 + i, now - 80 + i) for i in range(11)}
    for job_id, (created, finished) in ends.items():
        store.put_job(JobRecord(id=job_id, kind="learn" if "learn" in job_id else "generate",
                                request={"name": "gone"}, state="failed", created=created, finished=finished))
    assert service.prune_jobs() == 2
    assert sorted(j.id for j in store.jobs()) == [f"gen-{i:02}" for i in range(2, 11)] + ["long-learn"]
    store.close()


def test_status_says_when_config_toml_changed_after_the_service_started(cones, daemon):
    """The service reads config.toml once; an edit while it runs applied to `cones add` (which
    reads it itself) but not to the service, and nothing said so."""
    code, out = cones("status")
    assert code == 0 and "changed after the service started" not in out, out
    cfg = daemon.home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('method = "cones2"\n')
    try:
        code, out = cones("status")
        assert code == 0 and "changed after the service started" in " ".join(out.split()), out
    finally:
        cfg.unlink()


def test_adding_a_name_whose_removal_is_queued_says_to_wait_for_it():
    """`cones rm v2 --no-wait`, then `cones add v2 ...`: the refusal said to remove it first."""
    import types

    from cns_daemon.api.errors import Conflict
    from cns_daemon.service import Service
    from cones_store.records import JobRecord

    service = Service.__new__(Service)
    service.store = {"v2"}
    queued = [JobRecord(id="r1", kind="remove", request={"name": "v2"})]
    service.worker = types.SimpleNamespace(jobs=types.SimpleNamespace(jobs=lambda states=None: queued),
                                           view=lambda job: job)
    with pytest.raises(Conflict, match=r"exists until its removal \(job r1\)") as err:
        service._check_name_free("v2")
    assert "cones rm" not in err.value.hint
    queued.clear()
    with pytest.raises(Conflict, match="already exists") as err:
        service._check_name_free("v2")
    assert "cones rm v2" in err.value.hint
