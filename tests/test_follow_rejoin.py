"""A followed job whose service goes away: the CLI waits for the service to come back and
follows the job on (it was queued again there), instead of giving up with exit 11 while the
job runs on (`generate -o` then copied nothing). A stream that goes silent is told, not
waited on forever."""
from __future__ import annotations

import socket
import threading
import time

import pytest

import cones_cli.session
from cones_cli.client import Client
from cones_cli.session import wait_for
from cns_daemon.api.errors import Cancelled, Unavailable
from cns_daemon.api.protocol import JobInfo, ProgressInfo

JOB = "0123456789ab"


def _job(state="running"):
    return JobInfo(id=JOB, kind="learn", state=state, summary="learn <rex>", created=0.0)


class Restarting:
    """A client whose service dies while the job runs, stays away for `down` polls (holding its
    lock as `state` meanwhile, or not at all), then answers again; the job then ends as `end`."""

    def __init__(self, down: int, state: str | None, end: str = "done", breaks: int = 1):
        self.down, self.state, self.end, self.breaks = down, state, end, breaks
        self.follows = self.polls = 0

    def follow(self, job_id):
        self.follows += 1
        yield ProgressInfo(job=job_id, state="running", phase="train", step=self.follows, total=9)
        if self.follows <= self.breaks:
            raise Unavailable("The connection to the cones service broke (it was cut off).")
        yield ProgressInfo(job=job_id, state=self.end)

    def job(self, job_id):
        self.polls += 1
        if self.polls <= self.down:
            raise Unavailable("The cones service is not running.")
        return _job("done" if self.follows > self.breaks else "queued")

    def service_state(self):
        return self.state


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(cones_cli.session, "REJOIN_POLL_S", 0.01)
    monkeypatch.setattr(cones_cli.session, "REJOIN_GRACE_S", 0.2)
    monkeypatch.setattr(cones_cli.session, "REJOIN_LIMIT_S", 5.0)


def test_a_service_restarted_meanwhile_is_followed_to_the_jobs_end(quick, capsys):
    c = Restarting(down=3, state=None)
    assert wait_for(c, _job(), quiet=True, tell_wait=False).state == "done"
    assert c.follows == 2
    said = capsys.readouterr().err
    assert "Waiting for it to come back to follow job 0123456789ab on" in " ".join(said.split())


def test_the_jobs_own_end_after_the_restart_is_what_the_command_says(quick):
    """A learn that fails after a restart (its second crash fails it) ends the command with its
    error, not with "kept: it runs when the service is back"."""
    with pytest.raises(Cancelled):
        wait_for(Restarting(down=1, state=None, end="cancelled"), _job(), quiet=True, tell_wait=False)


def test_a_service_that_loads_its_model_is_waited_for_past_the_grace(quick):
    # 60 polls of 10 ms and more: well past the 0.2 s grace, while its lock says "starting"
    c = Restarting(down=60, state="starting")
    assert wait_for(c, _job(), quiet=True, tell_wait=False).state == "done"


def test_a_service_that_does_not_come_back_is_said_kept_after_the_grace(quick):
    c = Restarting(down=10**9, state=None)
    start = time.monotonic()
    with pytest.raises(Unavailable) as err:
        wait_for(c, _job(), quiet=True, tell_wait=False)
    assert time.monotonic() - start < 3.0
    assert "(job 0123456789ab, kept: it runs when the service is back)" in err.value.message


def test_a_service_that_keeps_breaking_the_stream_is_given_up_on(quick, monkeypatch):
    monkeypatch.setattr(cones_cli.session, "MAX_REJOINS", 2)
    c = Restarting(down=0, state=None, breaks=10**9)
    with pytest.raises(Unavailable):
        wait_for(c, _job(), quiet=True, tell_wait=False)
    assert c.follows == 3


def _silent_service(path, served: threading.Event):
    """An HTTP answer that starts a job's stream and then says nothing (a hung service) until
    `served` is set, then closes mid-answer (as a killed service does)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        served.wait(10)
        conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()


def test_a_stream_silent_past_the_heartbeat_is_told(tmp_path, monkeypatch):
    monkeypatch.setattr("cones_cli.client.STREAM_SILENCE_S", 0.5)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    done = threading.Event()
    _silent_service(run / "cones.sock", done)
    try:
        with Client(run / "cones.sock") as c, pytest.raises(Unavailable) as err:
            list(c.follow(JOB))
    finally:
        done.set()
    assert f"sent nothing about job {JOB} for 0.5 s" in err.value.message and "may hang" in err.value.message
    assert getattr(err.value, "silent", False)   # what tells wait_for a hang from a service gone


def test_a_stream_cut_off_mid_answer_is_said_cut_off(tmp_path):
    """A killed service's half answer read "its answer was not HTTP"."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    done = threading.Event()
    done.set()   # the stream's head, then the connection closes
    _silent_service(run / "cones.sock", done)
    with Client(run / "cones.sock") as c, pytest.raises(Unavailable) as err:
        list(c.follow(JOB))
    assert "broke (it was cut off)" in err.value.message
    assert not getattr(err.value, "silent", False)


class Silent(Restarting):
    """A client whose event stream falls silent once (STREAM_SILENCE_S without a line), its
    service answering (`answers`) or not."""

    def __init__(self, answers: bool):
        super().__init__(down=0 if answers else 10**9, state="serving")

    def follow(self, job_id):
        self.follows += 1
        if self.follows == 1:
            silent = Unavailable("The cones service sent nothing about job x for 60 s: it may hang.")
            silent.silent = True
            raise silent
        yield ProgressInfo(job=job_id, state="done")


def test_a_silent_stream_of_a_service_that_answers_is_followed_anew(quick, capsys):
    c = Silent(answers=True)
    assert wait_for(c, _job(), quiet=True, tell_wait=False).state == "done" and c.follows == 2
    assert "Waiting" not in capsys.readouterr().err


def test_a_hung_service_is_said_hung_not_waited_for_nor_said_kept(quick, capsys):
    """A review's find: a silent stream was told "Waiting for it to come back" and then "kept:
    it runs when the service is back", of a service that never went away."""
    start = time.monotonic()
    with pytest.raises(Unavailable) as err:
        wait_for(Silent(answers=False), _job(), quiet=True, tell_wait=False)
    assert time.monotonic() - start < 0.15   # less than the grace: not waited for
    assert err.value.message.endswith("it may hang (job 0123456789ab).") and "kept" not in err.value.message
    assert "Waiting" not in capsys.readouterr().err


def test_a_stopping_service_is_not_said_kept_twice(quick):
    class Stopping(Restarting):
        def follow(self, job_id):
            raise Unavailable("The service is stopping before the job finished; the job stays in its "
                              "queue and runs when the service is back.")
            yield

    with pytest.raises(Unavailable) as err:
        wait_for(Stopping(down=10**9, state=None), _job(), quiet=True, tell_wait=False)
    assert err.value.message.count("when the service is back") == 1 and "(job 0123456789ab)" in err.value.message


def test_a_service_gone_while_the_queue_is_told_is_waited_for_too(quick):
    """A review's find: the queue's wait was told outside the follow's handling: a service gone
    in that first moment ended the command without the job's id or the wait."""
    class Queued(Restarting):
        def status(self):
            raise Unavailable("The cones service is not running.")

    c = Queued(down=2, state=None)
    assert wait_for(c, _job("queued"), quiet=True, tell_wait=True).state == "done"
