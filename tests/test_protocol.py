"""The protocol's models and the API description: what is accepted, what is refused, and that
every route and error code is described."""
from __future__ import annotations

import base64
import json

import pytest
from pydantic import ValidationError

from cns_daemon.api.errors import ERROR_TYPES
from cns_daemon.api.protocol import (AddRequest, GenerateRequest, JobInfo, Photo, ProgressInfo,
                                     describe_validation_error)
from cns_daemon.server import HTTP_STATUS, App


def test_photo_bytes_travel_as_base64():
    req = AddRequest(name="rex", class_word="dog", photos=[Photo(filename="a.png", data=b"\x89PNG\0\xff")])
    text = json.loads(req.model_dump_json())["photos"][0]["data"]
    assert base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) == b"\x89PNG\0\xff"
    assert AddRequest.model_validate_json(req.model_dump_json()) == req


@pytest.mark.parametrize("fields,where", [
    ({"name": "../x"}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"class_word": ""}, "class_word"),
    ({"class_word": "dog; rm -rf"}, "class_word"),
    ({"method": "dreambooth"}, "method"),
    ({"steps": 0}, "steps"),
    ({"photos": []}, "photos"),
    ({"extra": 1}, "extra"),
])
def test_add_request_refusals_name_the_field(fields, where):
    base = {"name": "rex", "class_word": "dog", "photos": [{"filename": "a.png", "data": "AAAA"}]}
    with pytest.raises(ValidationError) as info:
        AddRequest.model_validate_json(json.dumps({**base, **fields}))
    assert describe_validation_error(info.value).startswith(where)


def test_a_skipped_files_list_is_bounded():
    """A learn's skipped files are kept in its job record and sent with every job listing: a
    60 MB reason made every `cones status` read it again."""
    from cns_daemon.api.protocol import MAX_SKIPPED_REASON, SkippedFile

    SkippedFile(file="a" * 1020, reason="r" * MAX_SKIPPED_REASON)
    for fields in ({"file": "x", "reason": "r" * (MAX_SKIPPED_REASON + 1)}, {"file": "x" * 2000, "reason": "r"}):
        with pytest.raises(ValidationError):
            SkippedFile(**fields)


def test_generate_request_limits():
    GenerateRequest(prompt="a photo of <rex>", n=16, boxes=["rex=0,0,1,1"] * 8)
    for bad in ({"prompt": ""}, {"prompt": "x" * 1001}, {"prompt": "x", "n": 0}, {"prompt": "x", "n": 17},
                {"prompt": "x", "boxes": ["a=0,0,1,1"] * 9}, {"prompt": "x", "steps": 0},
                {"prompt": "x", "negative_prompt": ""}, {"prompt": "x", "negative_prompt": "x" * 1001},
                {"prompt": "x", "guidance_scale": 0.5}, {"prompt": "x", "guidance_scale": 31},
                {"prompt": "x", "guidance_scale": float("nan")}, {"prompt": "x", "width": 0},
                {"prompt": "x", "height": 4096}):
        with pytest.raises(ValidationError):
            GenerateRequest(**bad)
    with pytest.raises(ValidationError, match="a number from 1 to 30"):
        GenerateRequest(prompt="x", guidance_scale=float("nan"))
    ok = GenerateRequest(prompt="x", negative_prompt="blurry", guidance_scale=1, width=64, height=2048)
    assert (ok.negative_prompt, ok.guidance_scale, ok.width, ok.height) == ("blurry", 1.0, 64, 2048)


def test_openapi_describes_every_route_and_model():
    app = App(service=None, max_request_bytes=1024)
    schema = app.openapi_schema()
    described = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    assert described == {(r.path, r.method.lower()) for r in app.routes}
    models = schema["components"]["schemas"]
    for name in ("AddRequest", "GenerateRequest", "JobInfo", "StatusInfo", "ConceptList", "ErrorBody",
                 "ProgressInfo"):
        assert name in models
    add = schema["paths"]["/v1/concepts"]["post"]
    assert add["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/AddRequest")
    assert any(p["name"] == "X-Cones-Protocol" for p in add["parameters"])
    # query parameters and the import's raw body are described too (they were left out)
    query = {(path, m, p["name"]) for path, ops in schema["paths"].items() for m, op in ops.items()
             for p in op.get("parameters", []) if p["in"] == "query"}
    assert query == {("/v1/jobs", "get", "limit"), ("/v1/concepts/{name}", "delete", "photos"),
                     ("/v1/concepts/import", "post", "name")}
    imp = schema["paths"]["/v1/concepts/import"]["post"]["requestBody"]["content"]
    assert imp["application/octet-stream"]["schema"]["format"] == "binary"


def test_every_error_code_has_an_http_status():
    assert set(HTTP_STATUS) == set(ERROR_TYPES)
    assert all(400 <= s < 600 for s in HTTP_STATUS.values())


def test_job_and_progress_models_round_trip():
    info = JobInfo(id="abc", kind="learn", state="running", summary="learn <rex>", created=1.0,
                   progress=ProgressInfo(job="abc", state="running", phase="train", step=3, total=10,
                                         loss=0.5, eta_s=2.0))
    assert JobInfo.model_validate_json(info.model_dump_json()) == info


def test_validation_errors_a_person_meets_read_as_words():
    from pydantic import ValidationError

    from cns_daemon.api.protocol import AddRequest, GenerateRequest, Photo, describe_validation_error

    with pytest.raises(ValidationError) as exc:
        AddRequest(name="rex", class_word="", photos=[Photo(filename="a.png", data=b"x")])
    assert describe_validation_error(exc.value).startswith("class_word: what the concept is, in letters")
    with pytest.raises(ValidationError) as exc:
        GenerateRequest(prompt="")
    assert describe_validation_error(exc.value) == "prompt: empty"
    with pytest.raises(ValidationError) as exc:
        GenerateRequest(prompt="a dog", n=0)
    assert describe_validation_error(exc.value).startswith("n: ")   # the rest keep pydantic's words
    # a NUL is no one's words (a review's find: "a\x00b" was drawn, and shown in job lists)
    for field in ("prompt", "negative_prompt"):
        with pytest.raises(ValidationError) as exc:
            GenerateRequest(**{"prompt": "a dog", field: "a\x00b"})
        assert describe_validation_error(exc.value) == f"{field}: holds a NUL character, which no text has"


def test_the_last_image_of_a_batch_has_a_seed_one_can_ask_for():
    """Image k is drawn from seed + k: a batch whose last seed is past MAX_SEED is refused."""
    from cns_daemon.api.protocol import MAX_SEED, describe_validation_error

    GenerateRequest(prompt="x", seed=MAX_SEED - 2, n=3)
    with pytest.raises(ValidationError) as info:
        GenerateRequest(prompt="x", seed=MAX_SEED - 1, n=3)
    said = describe_validation_error(info.value)
    assert said.startswith("seed") and "image k is drawn from seed + k" in said, said


def test_the_guidance_scale_is_a_number_only():
    """JSON's true was read as a scale of 1 (guidance off) and "7.5" taken as a number."""
    for fine, read in (("7", 7), ("7.5", 7.5), ("null", None)):
        assert GenerateRequest.model_validate_json(f'{{"prompt": "x", "guidance_scale": {fine}}}').guidance_scale == read
    for bad in ("true", '"7.5"'):
        with pytest.raises(ValidationError, match="must be a number from 1"):
            GenerateRequest.model_validate_json(f'{{"prompt": "x", "guidance_scale": {bad}}}')


def test_out_of_file_handles_is_said_as_a_busy_service_and_connections_are_capped_below_the_limit():
    """A review's find: a flood of connections ran the service out of file handles; a generate
    failed halfway as "a bug" (exit 70). Now it is `unavailable` with what to do, and the HTTP
    server answers 503 past a cap that leaves handles for the store and the model."""
    import errno
    import resource

    from cns_daemon.api.errors import Storage, Unavailable, os_error
    from cns_daemon.daemon import FILES_SPARE, MAX_CONNECTIONS

    said = os_error(OSError(errno.EMFILE, "Too many open files"))
    assert isinstance(said, Unavailable) and "too many files open" in said.message
    assert "ulimit -n" in said.hint
    assert isinstance(os_error(OSError(errno.ENOSPC, "No space left on device")), Storage)
    assert os_error(OSError(errno.ENOENT, "No such file")) is None and os_error(ValueError()) is None
    # a desktop's soft 1,024 under a higher hard limit is raised to the hard one (in a child:
    # this process keeps its own limits)
    import subprocess
    import sys

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 300:
        pytest.skip("a hard open-files limit too low to lower the soft one under it")
    script = ("import resource; from cns_daemon.daemon import connection_limit\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))\n"
              "cap = connection_limit()\n"
              "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (hard if hard != resource.RLIM_INFINITY "
              "else 65536), cap)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    soft = hard if hard != resource.RLIM_INFINITY else 65536
    assert out == ["True", str(max(32, min(MAX_CONNECTIONS, soft - FILES_SPARE)))]
