"""Reliability with a real daemon process (FakeEngine): kill -9 during a learn job and restart,
and a corpus of bad inputs, each answered with a typed error while the service keeps serving."""
from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from cones_cli.client import Client
from cones_cli.views import follow
from cns_daemon.api.errors import Unavailable
from cns_daemon.api.protocol import API_PREFIX, PROTOCOL_HEADER, PROTOCOL_VERSION, AddRequest, Photo
from cns_daemon.worker import CRASH_REASON
from helpers.service import cli_in_process, photo_bytes, short_home, start_daemon, wait_until

LIMIT = 300_000   # a small request limit for this daemon, so "oversized" is cheap to send


def photos_of(seed: int, n: int = 3) -> list[Photo]:
    return [Photo(filename=f"p{i}.png", data=photo_bytes(seed + i)) for i in range(n)]


def learning(home, name: str, seed: int):
    """A service with a long learn running (5,000 steps of 0.05 s): (daemon, job)."""
    daemon = start_daemon(home, CONES_TEST_STEP_S="0.05")
    try:
        with Client(daemon.socket) as c:
            job = c.add(AddRequest(name=name, class_word="cat", steps=5000, photos=photos_of(seed)))
            wait_until(lambda: c.job(job.id).state == "running", what="learn running")
    except BaseException:
        daemon.kill(15)
        raise
    return daemon, job


def test_kill9_during_learn_requeues_once_then_fails(tmp_path, monkeypatch):
    from cones_cli import views

    monkeypatch.setattr(views.console, "_width", 200)
    home = short_home()
    cones = cli_in_process(home, monkeypatch)
    daemon = None
    try:
        daemon = start_daemon(home, CONES_TEST_STEP_S="0.05")
        with Client(daemon.socket) as c:
            early = c.add(AddRequest(name="early", class_word="dog", steps=3, photos=photos_of(0)))
            wait_until(lambda: c.job(early.id).state == "done", what="early learned")
            victim = c.add(AddRequest(name="victim", class_word="cat", steps=5000, photos=photos_of(10)))
            queued = c.add(AddRequest(name="waiting", class_word="mug", steps=3, photos=photos_of(20)))
            wait_until(lambda: c.job(victim.id).state == "running", what="victim running")
        daemon.kill()   # SIGKILL: no clean-up at all

        archived = {p.stem for p in (home / "data" / "archive").rglob("*.png")}
        assert len(archived) == 9   # every photo of all three jobs survived in the archive

        daemon = start_daemon(home, CONES_TEST_STEP_S="0.05")
        with Client(daemon.socket) as c:
            job = c.job(victim.id)
            assert job.attempts == 2 and job.state == "running"   # re-queued once, running again
            assert job.note == "restarted after the service stopped, attempt 2 of 2"
            code, out, err = cones("jobs")
            row = next(line for line in out.splitlines() if line.startswith(victim.id))
            assert "restarted after the service stopped, attempt 2 of 2" in row, out
            assert c.job(queued.id).state == "queued"              # queued jobs survive
            assert {x.name for x in c.concepts()} == {"early"}     # no half concept
            assert c.concept("early").photos == 3
        daemon.kill()

        daemon = start_daemon(home, CONES_TEST_STEP_S="0.05")
        with Client(daemon.socket) as c:
            job = c.job(victim.id)
            assert job.state == "failed" and job.error.message == CRASH_REASON
            wait_until(lambda: c.job(queued.id).state == "done", what="queued job runs after restart")
            assert {x.name for x in c.concepts()} == {"early", "waiting"}
    finally:
        if daemon is not None:
            daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)


def test_a_learn_stored_just_before_a_crash_is_done_after_the_restart(tmp_path):
    """kill -9 after the learn stored its concept but before its job was marked done: the re-run
    finds its own concept and ends done, saying so (it failed with "already exists")."""
    from cones_store import ConceptMeta, ConceptRecord, ConceptStore

    home = short_home()
    daemon = None
    try:
        daemon, job = learning(home, "saved", 40)
        daemon.kill()
        with ConceptStore.open(home / "data" / "store") as store:   # what its store.put left
            digests = store.get_job(job.id).request["photo_digests"]
            store.put(ConceptRecord(meta=ConceptMeta(name="saved", method="cns", class_word="cat",
                                                     token="sks", photo_digests=digests)))
        daemon = start_daemon(home, CONES_TEST_STEP_S="0.05")
        with Client(daemon.socket) as c:
            wait_until(lambda: c.job(job.id).state in ("done", "failed"), what="the re-run ends")
            again = c.job(job.id)
            assert again.state == "done" and again.attempts == 2, again
            assert "stored by its first run" in again.result.metrics["note"]
            assert [x.name for x in c.concepts()] == ["saved"]
    finally:
        if daemon is not None:
            daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)


def test_ctrl_c_twice_stops_cleanly(tmp_path):
    """A second Ctrl-C on `cones serve` made uvicorn force its exit: the app's shutdown was
    cancelled mid-way and its traceback logged. The stop goes on as after one."""
    import signal

    home = short_home()
    daemon = None
    try:
        daemon, job = learning(home, "twice", 40)
        daemon.proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(20) == 0
        assert "Traceback" not in daemon.output() and "already stopping" in daemon.output(), daemon.output()
        assert "cones stopped" in daemon.output()
    finally:
        if daemon is not None:
            daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)


def _wakeups(pid: int) -> int:
    """Voluntary context switches of the process's main thread (each wait it woke from)."""
    with open(f"/proc/{pid}/task/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("voluntary_ctxt_switches"))


@pytest.mark.slow   # 7 s of idle watching (CI runs -m slow)
def test_an_idle_service_wakes_about_once_a_second_and_still_stops_at_once():
    """uvicorn's loop looked whether to stop 10 times a second, most of what an idle service
    did all day; once a second now, and a stop's signal wakes it at once."""
    import signal

    home = short_home()
    daemon = start_daemon(home, CONES_WATCH_INBOX="false")
    try:
        time.sleep(1.0)
        before = _wakeups(daemon.proc.pid)
        time.sleep(4.0)
        assert _wakeups(daemon.proc.pid) - before <= 12   # 4 ticks, and room for a stray wake
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(20) == 0
        assert time.monotonic() - started < 0.9, daemon.output()
        assert "cones stopped" in daemon.output()
    finally:
        daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)


def test_clean_stop_during_learn_says_it_started_over(tmp_path):
    """SIGTERM gives the running job's start back (it is not counted against its attempts), and
    after the restart its note says that it ran when the service stopped and started over."""
    home = short_home()
    daemon = None
    try:
        daemon, job = learning(home, "stopped", 30)
        told: list = []

        def follower() -> None:   # a `cones add` waiting on the job when the service stops
            with Client(daemon.socket) as f:
                try:
                    follow(f.follow(job.id), quiet=True)
                except Unavailable as exc:
                    told.append(exc.message)

        watching = threading.Thread(target=follower)
        watching.start()
        time.sleep(0.5)
        daemon.kill(15)
        watching.join(10)
        assert daemon.proc.returncode == 0
        # the stream ended with a word on what happens to the job, not cut by the graceful timeout
        assert told and "service is stopping" in told[0], told
        assert "Traceback" not in daemon.output(), daemon.output()
        assert "cones is stopping" in daemon.output() and "cones stopped" in daemon.output()   # the log says so
        # and which job starts over (it said "a job running now starts over" with none running)
        assert f"cones is stopping (job {job.id}, a learn, starts over" in daemon.output(), daemon.output()
        daemon = start_daemon(home, CONES_TEST_STEP_S="0.05")
        with Client(daemon.socket) as c:
            wait_until(lambda: c.job(job.id).state == "running", what="learn running again")
            again = c.job(job.id)
            assert again.attempts == 1
            assert again.note == "restarted after the service stopped while it ran; it started over"
            c.cancel(job.id)
    finally:
        if daemon is not None:
            daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("sig", [15, pytest.param(9, marks=pytest.mark.slow)])   # 9: with -m slow
def test_a_job_cancelled_just_before_a_stop_stays_cancelled(tmp_path, sig):
    """A cancel waits for the job's next step; a stop (or a crash) meanwhile must not put the
    job back in the queue to run again after the restart."""
    home = short_home()
    daemon = None
    try:
        daemon = start_daemon(home, CONES_TEST_STEP_S="2")
        with Client(daemon.socket) as c:
            job = c.add(AddRequest(name="unwanted", class_word="cat", steps=50, photos=photos_of(31)))
            wait_until(lambda: c.job(job.id).state == "running", what="learn running")
            c.cancel(job.id)   # takes effect at the end of the current 2 s step
        daemon.kill(sig)
        daemon = start_daemon(home, CONES_TEST_STEP_S="2")
        with Client(daemon.socket) as c:
            assert c.job(job.id).state == "cancelled"
            time.sleep(1)
            assert c.job(job.id).state == "cancelled" and c.status().queue.running is None
    finally:
        if daemon is not None:
            daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)


def test_a_service_whose_socket_folder_was_removed_is_told_apart_from_none(monkeypatch):
    home = short_home()
    daemon = start_daemon(home)
    try:
        cones = cli_in_process(home, monkeypatch)
        (home / "run" / "cones.sock").unlink()   # the socket alone: it was called "starting" for good
        code, out, err = cones("status")
        text = " ".join(err.split())
        assert code == 11 and "is gone" in text and "starting" not in text, err
        shutil.rmtree(home / "run")   # the socket and its lock go; the service runs on
        code, out, err = cones("status")
        text = " ".join(err.split())
        assert code == 11 and f"pid {daemon.proc.pid}" in text and "socket" in text and "is gone" in text, err
        daemon.kill(15)
        code, out, err = cones("status")
        assert code == 11 and "not running" in " ".join(err.split()), err
    finally:
        daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)


def test_a_client_looking_in_another_runtime_folder_is_told_where_the_socket_is(monkeypatch):
    """A service started with its own CONES_RUNTIME_DIR: a shell without it finds the service by
    its data folder and is told the socket's folder, not to kill a healthy service."""
    home = short_home()
    elsewhere = short_home()
    daemon = start_daemon(home, wait=False, CONES_RUNTIME_DIR=str(elsewhere))
    try:
        wait_until(lambda: (elsewhere / "cones.sock").exists(), timeout=90, what="service up")
        cones = cli_in_process(home, monkeypatch)
        code, out, err = cones("status")
        text = " ".join(err.split())
        assert code == 11 and f"with its socket at {elsewhere / 'cones.sock'}" in text, err
        assert f"CONES_RUNTIME_DIR={elsewhere}" in text and "kill" not in text, err
    finally:
        daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon():
    home = short_home()
    d = start_daemon(home, CONES_MAX_REQUEST_BYTES=str(LIMIT))
    yield d
    d.kill(15)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def raw(daemon):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://cones",
                      headers={PROTOCOL_HEADER: PROTOCOL_VERSION}, timeout=30) as http:
        yield http


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["message"] and body["hint"], body
    return body


def _add_body(name: str = "thing", files: list[tuple[str, bytes]] | None = None, **extra) -> dict:
    photos = [Photo(filename=f, data=d) for f, d in (files or [("a.png", photo_bytes(1))])]
    req = AddRequest(name="placeholder", class_word="dog", steps=2, photos=photos)
    body = json.loads(req.model_dump_json())
    body.update(name=name, **extra)
    return body


def test_bad_photos(raw):
    truncated = photo_bytes(3, fmt="JPEG")[:300]
    bad = [("notes.txt", b"hello, not a photo"), ("cut.jpg", truncated), ("empty.png", b""),
           ("tiny.png", photo_bytes(4, size=8))]
    body = _error(raw.post(f"{API_PREFIX}/concepts", json=_add_body(files=bad)), 422, "bad_photo")
    for name, why in (("notes.txt", "not an image"), ("cut.jpg", "truncated"), ("empty.png", "0 bytes"),
                      ("tiny.png", "too small")):
        assert name in body["message"] and why in body["message"], body["message"]
    # two good photos among bad ones: accepted, the bad ones listed as skipped
    ok = raw.post(f"{API_PREFIX}/concepts", json=_add_body("mixed", bad + [("good.png", photo_bytes(5)),
                                                                          ("good2.png", photo_bytes(6))]))
    assert ok.status_code == 202, ok.text
    skipped = {s["file"] for s in ok.json()["skipped"]}
    assert skipped == {"notes.txt", "cut.jpg", "empty.png", "tiny.png"}


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "with space", "<rex>"])
def test_bad_names(raw, name):
    _error(raw.post(f"{API_PREFIX}/concepts", json=_add_body(name)), 400, "bad_input")


def test_bad_requests(raw):
    p = API_PREFIX
    _error(raw.post(f"{p}/concepts", content=b"{not json", headers={"content-type": "application/json"}),
           400, "bad_input")
    _error(raw.post(f"{p}/concepts", json=_add_body(unexpected_field=1)), 400, "bad_input")
    _error(raw.post(f"{p}/concepts", json={"name": "x"}), 400, "bad_input")
    _error(raw.post(f"{p}/generate", json={"prompt": "a photo of <ghost>"}), 404, "not_found")
    _error(raw.post(f"{p}/generate", json={"prompt": "a plain photo", "boxes": ["ghost=0,0,1,1"]}),
           400, "bad_input")
    for box in ["rex", "rex=1,2,3", "rex=a,b,c,d", "rex=0.5,0,0.2,1", "rex=0,0,1,2"]:
        _error(raw.post(f"{p}/generate", json={"prompt": "a plain photo", "boxes": [box]}), 400, "bad_input")
    _error(raw.post(f"{p}/generate", json={"prompt": "", "n": 1}), 400, "bad_input")
    _error(raw.post(f"{p}/generate", json={"prompt": "x", "n": 1000}), 400, "bad_input")
    _error(raw.get(f"{p}/nowhere"), 404, "not_found")
    put = _error(raw.put(f"{p}/concepts"), 405, "bad_input")
    assert "PUT is not allowed" in put["message"]
    _error(raw.get(f"{p}/jobs/" + "x" * 300), 400, "bad_input")


def test_oversized_request(raw):
    big = _add_body(files=[("big.png", b"\0" * (LIMIT * 2))])
    body = _error(raw.post(f"{API_PREFIX}/concepts", json=big), 413, "bad_input")
    assert "too large" in body["message"] and str(LIMIT) in body["message"]
    assert "photos" in body["message"] and "photos" in body["hint"]
    big_file = raw.post(f"{API_PREFIX}/concepts/import", content=b"\0" * (LIMIT * 2),
                        headers={"content-type": "application/octet-stream"})
    body = _error(big_file, 413, "bad_input")   # an exported file, not photos: said so
    assert "too large" in body["message"] and "photos" not in body["message"] + body["hint"]


def test_wrong_or_missing_protocol_version(daemon, raw):
    body = _error(raw.get(f"{API_PREFIX}/status", headers={PROTOCOL_HEADER: "0"}), 400, "protocol")
    assert "protocol 0" in body["message"]
    # an old `cones` left on PATH was told to restart the service, which cannot help it
    assert "older than the service's" in body["message"] and "Restart" not in body["hint"], body
    assert "update this one" in body["hint"], body
    # a digit that is no ASCII digit ("²".isdigit(); b"\xb2" in latin-1) was a 500 "bug in cones"
    _error(raw.get(f"{API_PREFIX}/status", headers={PROTOCOL_HEADER: b"\xb2"}), 400, "protocol")
    newer = _error(raw.get(f"{API_PREFIX}/status", headers={PROTOCOL_HEADER: str(int(PROTOCOL_VERSION) + 1)}),
                   400, "protocol")
    assert "The service speaks protocol" in newer["message"] and "Restart the service" in newer["hint"], newer
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://cones") as bare:
        _error(bare.get(f"{API_PREFIX}/status"), 400, "protocol")
        schema = bare.get("/openapi.json").json()   # the schema needs no header
    assert schema["openapi"].startswith("3.")
    assert {"/v1/concepts", "/v1/generate", "/v1/jobs/{id}/events"} <= set(schema["paths"])
    assert "AddRequest" in schema["components"]["schemas"]


def test_service_still_serves_after_the_corpus(daemon, raw):
    # runs last in this module: every bad request above left the service healthy
    assert daemon.proc.poll() is None
    with Client(daemon.socket) as c:
        assert c.status().pid == daemon.proc.pid
        job = c.add(AddRequest(name="after", class_word="dog", steps=2, photos=photos_of(30)))
        wait_until(lambda: c.job(job.id).state == "done", what="learn after corpus")
        assert "after" in {x.name for x in c.concepts()}


def test_a_client_tells_a_starting_service_from_a_stopping_one(tmp_path):
    """An import waiting while the service stopped was told "starting (loading the model)"."""
    from cns_daemon.daemon import InstanceLock

    run = short_home()
    try:
        lock = InstanceLock(run / "cones.lock")
        lock.acquire(run / "cones.sock")
        for state, needle in (("starting", "is starting (loading the model)"), ("stopping", "is stopping")):
            lock.say(state)
            with Client(run / "cones.sock") as c, pytest.raises(Unavailable) as err:
                c.status()
            assert needle in err.value.message, (state, err.value.message)
        lock.release()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_cones_cancel_removes_a_damaged_job_record(monkeypatch):
    """The hint of a damaged job says `cones cancel ID` removes it; the CLI asked for the job
    first, got the same damage, and never sent the cancel."""
    import lmdb

    home = short_home()
    daemon = None
    try:
        daemon = start_daemon(home)
        daemon.kill(15)
        env = lmdb.open(str(home / "data" / "store"), max_dbs=16)
        with env.begin(write=True) as txn:
            txn.put(b"0123456789ab", b"not a job", db=env.open_db(b"jobs", txn=txn))
        env.close()
        daemon = start_daemon(home)
        cones = cli_in_process(home, monkeypatch)
        code, out, err = cones("cancel", "0123456789ab")
        assert code == 7 and "removed now" in " ".join(err.split()), err
        code, out, err = cones("cancel", "0123456789ab")
        assert code == 3, err   # gone
    finally:
        if daemon is not None:
            daemon.kill(15)
        shutil.rmtree(home, ignore_errors=True)
