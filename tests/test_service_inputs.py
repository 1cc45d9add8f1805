"""Bad input is refused when it is sent, not when the job runs, on a real daemon process
(FakeEngine): seeds, names and job ids in URLs, HTTP abuse (huge Content-Length, a request head
that never ends, wrong methods), job listing limits, photos, method options, export targets."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from cli.client import Client
from cns_daemon.errors import EXIT_CODES, ErrorCode
from cns_daemon.protocol import API_PREFIX, PROTOCOL_HEADER, PROTOCOL_VERSION
from test_service_harness import cli_in_process, running_daemon, wait_until, write_photos

BAD_INPUT = EXIT_CODES[ErrorCode.BAD_INPUT]
HEAD_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def daemon():
    with running_daemon(CONES_HEADER_TIMEOUT_SECONDS=str(HEAD_TIMEOUT)) as d:
        yield d


@pytest.fixture
def cones(daemon, monkeypatch):
    return cli_in_process(daemon.home, monkeypatch, merged=True)


def raw_http(sock_path: Path, head: str, body: bytes = b"", *, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send exactly these bytes over the socket and read until the service closes the
    connection; returns (everything read, seconds it took)."""
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(head.encode("latin-1") + body)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks), time.monotonic() - t0


def request(method: str, path: str, body: bytes = b"", **headers: str) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: cones", f"{PROTOCOL_HEADER}: {PROTOCOL_VERSION}",
             "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def status_and_body(response: bytes) -> tuple[int, dict, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    pairs = (line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in pairs}
    return int(lines[0].split()[1]), headers, body


def learned(daemon, tmp_path, name: str) -> None:
    with Client(daemon.socket) as c:
        if name in {x.name for x in c.concepts()}:
            return
    from cns_daemon.protocol import AddRequest, Photo

    photos = [Photo(filename=p.name, data=p.read_bytes()) for p in write_photos(tmp_path / name, 2)]
    with Client(daemon.socket) as c:
        job = c.add(AddRequest(name=name, class_word="dog", steps=2, photos=photos))
        wait_until(lambda: c.job(job.id).state == "done", what=f"{name} learned")


# -- item 8: seeds -------------------------------------------------------------------------------


def test_seed_beyond_32_bits_is_refused_at_the_request(cones, daemon, tmp_path):
    photos = write_photos(tmp_path / "p", 2)
    with Client(daemon.socket) as c:
        before = len(c.jobs(1000))
    code, out = cones("add", "seedy", *map(str, photos), "--class", "dog", "--seed",
                      "99999999999999999999999")
    assert code == BAD_INPUT and "seed" in out and "4294967295" in out, out
    code, out = cones("generate", "a plain photo", "--seed", str(2**64))
    assert code == BAD_INPUT and "seed" in out, out
    code, out = cones("generate", "a plain photo", "--seed", "-1")
    assert code == BAD_INPUT and "seed" in out, out
    body = json.dumps({"prompt": "a plain photo", "seed": 2**64}).encode()
    status, _, answer = status_and_body(raw_http(daemon.socket, request("POST", f"{API_PREFIX}/generate", body,
                                                                        content_type="application/json") , body)[0])
    assert status == 400 and json.loads(answer)["code"] == "bad_input" and "seed" in json.loads(answer)["message"]
    with Client(daemon.socket) as c:
        assert len(c.jobs(1000)) == before   # nothing was queued


# -- item 9: names and job ids in URLs ------------------------------------------------------------


def test_names_and_job_ids_never_reach_another_route(cones, daemon, tmp_path):
    learned(daemon, tmp_path, "rex")
    for args, needle in ((("show", "../concepts/rex"), "Invalid concept name"),
                         (("show", "../jobs"), "Invalid concept name"),
                         (("rm", "../concepts/rex"), "Invalid concept name"),
                         (("export", "../concepts/rex", "-o", str(tmp_path / "x.safetensors")),
                          "Invalid concept name"),
                         (("cancel", "../../x"), "Invalid job id")):
        code, out = cones(*args)
        assert code == BAD_INPUT and needle in out, (args, out)
    # the server itself refuses a segment that is not a valid name or id, encoded or not
    for method, path, what in (("GET", f"{API_PREFIX}/concepts/..%2Fjobs", "concept name"),
                               ("DELETE", f"{API_PREFIX}/concepts/..%2Fconcepts%2Frex", "concept name"),
                               ("GET", f"{API_PREFIX}/concepts/rex%20x", "concept name"),
                               ("POST", f"{API_PREFIX}/jobs/..%2F..%2Fx/cancel", "job id"),
                               ("GET", f"{API_PREFIX}/jobs/%2E%2E", "job id")):
        status, _, body = status_and_body(raw_http(daemon.socket, request(method, path))[0])
        err = json.loads(body)
        assert status == 400 and err["code"] == "bad_input" and f"Invalid {what}" in err["message"], (path, err)
    status, _, body = status_and_body(raw_http(daemon.socket, request("DELETE", f"{API_PREFIX}/concepts/../concepts/rex"))[0])
    assert status == 404 and "No such endpoint" in json.loads(body)["message"]
    with Client(daemon.socket) as c:
        assert "rex" in {x.name for x in c.concepts()}   # nothing above removed it
        assert c.concept("rex").name == "rex"


# -- item 13: HTTP ---------------------------------------------------------------------------------


def test_huge_declared_length_is_refused_at_once(daemon):
    head = request("POST", f"{API_PREFIX}/concepts").replace("Content-Length: 0",
                                                             f"Content-Length: {10**12}")
    response, took = raw_http(daemon.socket, head, b'{"name": ')   # the rest never comes
    status, headers, body = status_and_body(response)
    assert status == 413 and json.loads(body)["code"] == "bad_input" and "too large" in json.loads(body)["message"]
    assert headers.get("connection", "").lower() == "close" and took < HEAD_TIMEOUT   # answered, then closed


def test_request_head_that_never_completes_times_out(daemon):
    response, took = raw_http(daemon.socket, f"GET {API_PREFIX}/status HTTP/1.1\r\nHost: cones\r\nX-Slow: 1",
                              timeout=HEAD_TIMEOUT * 8)
    assert response.startswith(b"HTTP/1.1 408")
    assert HEAD_TIMEOUT * 0.8 <= took < HEAD_TIMEOUT * 5
    # and a connection that sent nothing at all is closed the same way
    response, took = raw_http(daemon.socket, "", timeout=HEAD_TIMEOUT * 8)
    assert response.startswith(b"HTTP/1.1 408") and took < HEAD_TIMEOUT * 5
    with Client(daemon.socket) as c:   # ordinary requests are unaffected
        assert c.status().pid == daemon.proc.pid


def test_wrong_method_is_405_with_allow(daemon):
    status, headers, body = status_and_body(raw_http(daemon.socket, request("PUT", f"{API_PREFIX}/concepts"))[0])
    assert status == 405 and json.loads(body)["code"] == "bad_input"
    assert set(headers["allow"].split(", ")) == {"GET", "POST"}
    status, headers, _ = status_and_body(raw_http(daemon.socket, request("POST", f"{API_PREFIX}/status"))[0])
    assert status == 405 and headers["allow"] == "GET"


# -- item 16: job listing --------------------------------------------------------------------------


def test_jobs_limit_below_one_is_refused(cones, daemon):
    code, out = cones("jobs", "--limit", "0")
    assert code == BAD_INPUT, out
    for limit in ("0", "-3", "abc", "1001"):
        status, _, body = status_and_body(raw_http(daemon.socket, request("GET", f"{API_PREFIX}/jobs?limit={limit}"))[0])
        assert status == 400 and "limit" in json.loads(body)["message"], limit
    code, out = cones("jobs", "--limit", "1", "--json")
    assert code == 0 and len(json.loads(out)) <= 1


def test_jobs_table_shows_whole_ids_at_80_columns(cones, daemon, tmp_path, monkeypatch):
    from cli import views

    learned(daemon, tmp_path, "wide")
    from cns_daemon.protocol import GenerateRequest

    with Client(daemon.socket) as c:   # a long prompt and a long note squeeze the other columns
        job = c.generate(GenerateRequest(prompt="a photo of <wide> " + "on a very long beach " * 8, steps=1))
        wait_until(lambda: c.job(job.id).state == "done", what="generate done")
    monkeypatch.setattr(views.console, "_width", 80)
    code, out = cones("jobs")
    assert code == 0, out
    assert max(len(line) for line in out.splitlines()) <= 80
    with Client(daemon.socket) as c:
        ids = [j.id for j in c.jobs(20)]
    assert ids and all(i in out for i in ids), out
