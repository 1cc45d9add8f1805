"""The socket API: a Starlette app over the Service.

Starlette does the HTTP: routing, 404/405 (with Allow), streaming the job events (it stops the
stream when the follower hangs up) and the lifespan. What stays here is what is ours:

- the route table: each route names its request and response models (cns_daemon.api.protocol),
  which gives the typed validation and the OpenAPI document from one place;
- every versioned route needs the protocol header;
- bodies are size-limited before they are parsed: a declared Content-Length over the limit is
  refused with 413 before a byte of the body is read (and the connection is closed), and a body
  that turns out longer than declared is cut off the same way;
- routes are matched on the raw, still percent-encoded path, so an encoded `/` inside a name
  never reaches another route, and every path parameter is checked (protocol.check_segment);
- errors are ErrorBody JSON with an HTTP status per error code; a bug is logged and answered
  as an Internal error, and the service keeps serving;
- blocking work (store reads, photo checks, parsing a big upload) runs in threads, so a long
  `cones add` upload never stalls a progress stream.
"""
from __future__ import annotations

import asyncio
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import unquote

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute

from cns_daemon.api.errors import (BadInput, ConesError, ErrorCode, Internal, NotFound, ProtocolMismatch,
                                   Unavailable, os_error)
from cns_daemon.api.protocol import (API_PREFIX, FINAL_STATES, MAX_JOBS_LISTED, MAX_PHOTOS, NDJSON, PROTOCOL_HEADER,
                                     PROTOCOL_VERSION, SEGMENTS, STREAM_STOPPING, AddRequest, ConceptInfo, ConceptList,
                                     ErrorBody, EvalRequest, GenerateRequest, JobInfo, JobList,
                                     PhotosPruned, ProgressInfo, StatusInfo, check_segment,
                                     describe_validation_error)
from cns_daemon.service import Service
from cns_daemon.worker import release_freed

log = logging.getLogger(__name__)

HTTP_STATUS = {
    ErrorCode.BAD_INPUT: 400, ErrorCode.NOT_FOUND: 404, ErrorCode.CONFLICT: 409,
    ErrorCode.BAD_PHOTO: 422, ErrorCode.MODEL_MISMATCH: 409, ErrorCode.CORRUPT: 500,
    ErrorCode.MODEL_LOAD: 503, ErrorCode.PROTOCOL: 400, ErrorCode.CANCELLED: 409,
    ErrorCode.UNAVAILABLE: 503, ErrorCode.STORAGE: 507, ErrorCode.INTERNAL: 500,
    ErrorCode.INTERRUPTED: 499,   # the CLI's own (Ctrl-C); the service never answers it
}


class TooLarge(BadInput):
    """A request body over the limit: HTTP 413, and the connection is closed (its unread body
    must not be parsed as the next request)."""
    http_status = 413
    headers = {"connection": "close"}


class MethodNotAllowed(BadInput):
    http_status = 405


Handler = Callable[[Request, dict], Awaitable[Response]]

# A generate or eval request is a prompt and its settings: kilobytes. Held to this, not to the
# photos' max_request_bytes: 250 MB of `"boxes": [1, 1, ...]` within that limit took the
# service's event loop for 30 s and 8.8 GB of memory to be refused.
SMALL_BODY = 1 << 20
# JSON objects, arrays and items an add request may hold, counted as its `{`, `[` and `,`
# bytes (base64 photos hold none): 64 photos and their skipped files, a few options, and the
# commas and braces captions and file names may hold (64 x 1,000 + 64 x 3,024 characters at
# most). 250 MB of `"photos": [{}, {}, ...]` took 15 GB to be refused, 64 MB of
# `"skipped": [[], [], ...]` 6 GB and 51 s with the event loop stalled.
MAX_TOKENS = 400_000


@dataclass
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    content_type: str = "application/json"   # of the response; the schema says what it carries
    versioned: bool = True                    # needs the protocol header
    # For the schema: query parameters as (name, JSON schema, description), and a request body
    # that is not a model (its content type)
    query: tuple[tuple[str, dict, str], ...] = ()
    raw_body: str | None = None
    small_body: bool = False                  # held to SMALL_BODY, not max_request_bytes


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status, media_type="application/json")


def error_response(exc: ConesError, headers: dict[str, str] | None = None) -> Response:
    body = ErrorBody(code=exc.code.value, message=exc.message, hint=exc.hint)
    response = json_response(body, getattr(exc, "http_status", HTTP_STATUS.get(exc.code, 500)))
    response.headers.update({**getattr(exc, "headers", {}), **(headers or {})})
    return response


def parse_body(model: type[BaseModel], data: bytes) -> BaseModel:
    try:
        return model.model_validate_json(data or b"{}")
    except ValidationError as exc:
        raise BadInput(f"Invalid request: {describe_validation_error(exc)}.",
                       "See `cones --help`, or the schema at GET /openapi.json.") from None


class App:
    """The ASGI callable. `service` does the work; this class only says what each route does."""

    def __init__(self, service: Service, max_request_bytes: int):
        self.service = service
        self.max_request_bytes = max_request_bytes
        # Set when the server begins to shut down: job event streams end by themselves then,
        # instead of being cancelled mid-await at the graceful timeout (a traceback in the log).
        self.stopping = asyncio.Event()
        self.routes = self._routes()
        by_path: dict[str, dict[str, Route]] = {}
        for r in self.routes:
            by_path.setdefault(r.path, {})[r.method] = r
        self.app = Starlette(
            routes=[_OnlyTheseMethods(path, self._endpoint(methods), methods=list(methods))
                    for path, methods in by_path.items()],
            exception_handlers={HTTPException: _http_error})
        # "/v1/generate/" is not a route: a typed 404, not a redirect built from the Host header
        self.app.router.redirect_slashes = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            # Route on the path as sent: a percent-encoded `/` stays inside its segment.
            raw = scope.get("raw_path")
            if raw is not None:
                scope = {**scope, "path": raw.decode("latin-1").split("?", 1)[0]}
            receive = _limited(receive, self.max_request_bytes, scope.get("path", ""),
                               scope.get("method", "POST"))
        await self.app(scope, receive, send)

    # ------------------------------------------------------------ routing table

    def _routes(self) -> list[Route]:
        p = API_PREFIX
        return [
            Route("GET", f"{p}/status", self.status, "Service status", response=StatusInfo),
            Route("GET", f"{p}/concepts", self.list_concepts, "List concepts", response=ConceptList),
            Route("POST", f"{p}/concepts", self.add, "Learn a concept (queues a learn job)",
                  request=AddRequest, response=JobInfo),
            Route("POST", f"{p}/concepts/import", self.import_concept,
                  "Import a concept file (body: safetensors bytes; queues an import job)",
                  response=JobInfo, raw_body="application/octet-stream",
                  query=(("name", {"type": "string"}, "Store it under this name instead of its own"),)),
            Route("GET", f"{p}/concepts/{{name}}", self.show_concept, "One concept",
                  response=ConceptInfo),
            Route("DELETE", f"{p}/concepts/{{name}}", self.remove, "Remove a concept (queues a job)",
                  response=JobInfo, query=(("photos", {"type": "string", "enum": ["0", "1"]},
                                            "1: its archived photos go too, but those in use"),)),
            Route("GET", f"{p}/concepts/{{name}}/export", self.export,
                  "Export a concept as one safetensors file", content_type="application/octet-stream"),
            Route("POST", f"{p}/generate", self.generate, "Generate images (queues a job)",
                  request=GenerateRequest, response=JobInfo, small_body=True),
            Route("POST", f"{p}/eval", self.evaluate, "Score concepts with CLIP-I / CLIP-T (queues a job)",
                  request=EvalRequest, response=JobInfo, small_body=True),
            Route("POST", f"{p}/photos/prune", self.prune_photos,
                  "Delete the archived photos no concept or queued learn uses", response=PhotosPruned),
            Route("GET", f"{p}/jobs", self.list_jobs, "Recent jobs, newest first", response=JobList,
                  query=(("limit", {"type": "integer", "minimum": 1, "maximum": MAX_JOBS_LISTED,
                                    "default": 50}, "How many"),)),
            Route("GET", f"{p}/jobs/{{id}}", self.show_job, "One job", response=JobInfo),
            Route("POST", f"{p}/jobs/{{id}}/cancel", self.cancel, "Cancel a job", response=JobInfo),
            Route("GET", f"{p}/jobs/{{id}}/events", self.events,
                  "Follow a job: JSON lines (ProgressInfo) until a final state",
                  response=ProgressInfo, content_type=NDJSON),
            Route("GET", "/openapi.json", self.openapi, "This schema", versioned=False),
        ]

    def _endpoint(self, methods: dict[str, Route]):
        """One Starlette endpoint per path: the checks every route shares, then its handler."""
        async def endpoint(request: Request) -> Response:
            try:
                route = methods[request.method]
                params = {k: unquote(v) for k, v in request.path_params.items()}
                for kind, value in params.items():
                    if kind in SEGMENTS:
                        check_segment(kind, value)
                if route.versioned:
                    _check_protocol(request.headers.get(PROTOCOL_HEADER))
                limit = min(SMALL_BODY, self.max_request_bytes) if route.small_body else self.max_request_bytes
                _check_declared_length(request, limit)
                request.state.body_limit = limit
                return await route.handler(request, params)
            except asyncio.CancelledError:
                if not self.stopping.is_set():
                    raise
                # the stop's grace ran out while this request was still arriving or being
                # handled: said in typed form (it was the HTTP server's bare 500, "a bug")
                log.info("request %s %s: cut short by the service's stop", request.method, request.url.path)
                return error_response(Unavailable(
                    "The cones service stopped while this request was being taken.",
                    "Once it is back (`cones status`), `cones jobs` shows whether it was queued; "
                    "send it again if it was not."), {"connection": "close"})
            except ClientDisconnect:   # it went away, or its body stopped coming (daemon.py's timer)
                log.info("request %s %s: the client went away before its body arrived",
                         request.method, request.url.path)
                return error_response(BadInput("The request's body did not arrive whole."))
            except ConesError as exc:
                return error_response(exc)
            except Exception as exc:  # a full disk, or a bug: answer in typed form, keep serving
                known = os_error(exc)
                if known is not None:
                    log.warning("request %s %s: %s", request.method, request.url.path, known.message)
                    return error_response(known)
                log.exception("request %s %s failed", request.method, request.url.path)
                return error_response(Internal(f"The service failed on this request: "
                                               f"{type(exc).__name__}: {exc}"))
        return endpoint

    # ------------------------------------------------------------ handlers

    async def status(self, req: Request, params: dict) -> Response:
        return json_response(await asyncio.to_thread(self.service.status))

    async def list_concepts(self, req: Request, params: dict) -> Response:
        concepts = await asyncio.to_thread(self.service.concepts)
        return json_response(ConceptList(concepts=concepts))

    async def show_concept(self, req: Request, params: dict) -> Response:
        return json_response(await asyncio.to_thread(self.service.concept, params["name"]))

    async def add(self, req: Request, params: dict) -> Response:
        data = await _body(req)
        tokens = data.count(b"{") + data.count(b"[") + data.count(b",")
        if tokens > MAX_TOKENS:   # refused before pydantic builds them all
            raise BadInput(f"The request holds {tokens:,} JSON objects, arrays and items; a learn "
                           f"request has at most {MAX_PHOTOS} photos.", "Send what `cones add` sends.")
        try:
            body = await asyncio.to_thread(parse_body, AddRequest, data)
        except BadInput:   # a refused body of hundreds of MB: its memory back now, not after a job
            del data
            await asyncio.to_thread(release_freed)
            raise
        job = await asyncio.to_thread(self.service.add, body)
        return json_response(self.service.job_info(job), 202)

    async def remove(self, req: Request, params: dict) -> Response:
        photos = req.query_params.get("photos", "0")
        if photos not in ("0", "1"):
            raise BadInput(f"photos must be 0 or 1, not {photos!r}.")
        job = await asyncio.to_thread(self.service.remove, params["name"], photos == "1")
        return json_response(self.service.job_info(job), 202)

    async def export(self, req: Request, params: dict) -> Response:
        data = await asyncio.to_thread(self.service.export, params["name"])
        return Response(data, media_type="application/octet-stream")

    async def import_concept(self, req: Request, params: dict) -> Response:
        job = await asyncio.to_thread(self.service.import_file, await _body(req),
                                      req.query_params.get("name"))
        return json_response(self.service.job_info(job), 202)

    async def generate(self, req: Request, params: dict) -> Response:
        body = parse_body(GenerateRequest, await _body(req))
        job = await asyncio.to_thread(self.service.generate, body)
        return json_response(self.service.job_info(job), 202)

    async def evaluate(self, req: Request, params: dict) -> Response:
        body = parse_body(EvalRequest, await _body(req))
        job = await asyncio.to_thread(self.service.evaluate, body)
        return json_response(self.service.job_info(job), 202)

    async def prune_photos(self, req: Request, params: dict) -> Response:
        deleted, kept = await asyncio.to_thread(self.service.prune_photos)
        return json_response(PhotosPruned(deleted=deleted, kept=kept))

    async def list_jobs(self, req: Request, params: dict) -> Response:
        raw = req.query_params.get("limit", "50")
        limit = int(raw) if raw.isascii() and raw.isdigit() else 0   # "²" is a digit int() refuses
        if not 1 <= limit <= MAX_JOBS_LISTED:
            raise BadInput(f"limit must be a whole number from 1 to {MAX_JOBS_LISTED}, not {raw!r}.")
        return json_response(await asyncio.to_thread(self.service.jobs, limit))

    async def show_job(self, req: Request, params: dict) -> Response:
        job = await asyncio.to_thread(self.service.job, params["id"])
        return json_response(self.service.job_info(job))

    async def cancel(self, req: Request, params: dict) -> Response:
        job = await asyncio.to_thread(self.service.cancel, params["id"])
        return json_response(self.service.job_info(job))

    async def events(self, req: Request, params: dict) -> Response:
        job_id = params["id"]
        await asyncio.to_thread(self.service.job, job_id)   # NotFound before the stream starts
        return StreamingResponse(self._follow(job_id), media_type=NDJSON)

    async def _follow(self, job_id: str) -> AsyncIterator[bytes]:
        hub = self.service.worker.hub
        queue = hub.subscribe(job_id)   # before reading the state, so no event falls between
        try:
            job = await asyncio.to_thread(self.service.job, job_id)
            if job.state in FINAL_STATES:
                yield _line(ProgressInfo(job=job_id, state=job.state, error=job.error))
                return
            yield _line(hub.latest(job_id) or ProgressInfo(job=job_id, state=job.state))
            while True:
                try:
                    info = await self._next_event(queue, timeout=10.0)
                    if info is None:   # the service is stopping: the job's state, then the end
                        job = await asyncio.to_thread(self.service.job, job_id)
                        if job.state in FINAL_STATES:
                            yield _line(ProgressInfo(job=job_id, state=job.state, error=job.error))
                        else:
                            yield _line(ProgressInfo(job=job_id, state=job.state, message=STREAM_STOPPING))
                        return
                except asyncio.TimeoutError:
                    # Heartbeat: the same state again, so a follower sees the job is alive;
                    # also catches a final state missed by a job that finished through a path
                    # that published nothing.
                    job = await asyncio.to_thread(self.service.job, job_id)
                    info = (ProgressInfo(job=job_id, state=job.state, error=job.error)
                            if job.state in FINAL_STATES else
                            hub.latest(job_id) or ProgressInfo(job=job_id, state=job.state))
                yield _line(info)
                if info.state in FINAL_STATES:
                    return
        finally:   # also when the follower hung up and Starlette stopped the stream
            hub.unsubscribe(job_id, queue)

    async def _next_event(self, queue: asyncio.Queue, timeout: float) -> ProgressInfo | None:
        """The next event of a followed job; None once the service is stopping and no event is
        waiting (one already queued, e.g. the job's final state, is still told)."""
        if self.stopping.is_set():
            try:
                return queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        got = asyncio.ensure_future(queue.get())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait({got, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (got, stop):
                task.cancel()
        if got in done:
            return got.result()
        if stop in done:
            return await self._next_event(queue, timeout)   # drains what came meanwhile
        raise asyncio.TimeoutError

    async def openapi(self, req: Request, params: dict) -> Response:
        return JSONResponse(self.openapi_schema())

    def openapi_schema(self) -> dict:
        models = {ErrorBody}
        for r in self.routes:
            models.update(m for m in (r.request, r.response) if m is not None)
        _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                     ref_template="#/components/schemas/{model}")
        ref = "#/components/schemas/{}".format
        paths: dict[str, dict] = {}
        for r in self.routes:
            op: dict = {"summary": r.summary, "responses": {
                "default": {"description": "Error", "content": {"application/json": {
                    "schema": {"$ref": ref("ErrorBody")}}}}}}
            ok: dict = {"description": "OK"}
            if r.response is not None:
                ok["content"] = {r.content_type: {"schema": {"$ref": ref(r.response.__name__)}}}
            elif r.content_type != "application/json":
                ok["content"] = {r.content_type: {"schema": {"type": "string", "format": "binary"}}}
            op["responses"]["200"] = ok
            if r.request is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": ref(r.request.__name__)}}}}
            elif r.raw_body is not None:
                op["requestBody"] = {"required": True, "content": {r.raw_body: {
                    "schema": {"type": "string", "format": "binary"}}}}
            params = re.findall(r"\{(\w+)\}", r.path)
            if params or r.versioned or r.query:
                op["parameters"] = [{"name": n, "in": "path", "required": True,
                                     "schema": {"type": "string"}} for n in params]
                op["parameters"] += [{"name": n, "in": "query", "required": False, "schema": schema,
                                      "description": text} for n, schema, text in r.query]
                if r.versioned:
                    op["parameters"].append({"name": PROTOCOL_HEADER, "in": "header", "required": True,
                                             "schema": {"type": "string", "enum": [PROTOCOL_VERSION]}})
            paths.setdefault(r.path, {})[r.method.lower()] = op
        return {"openapi": "3.1.0",
                "info": {"title": "cones service", "version": PROTOCOL_VERSION},
                "paths": paths, "components": {"schemas": defs.get("$defs", {})}}


class _OnlyTheseMethods(StarletteRoute):
    """A route that answers only the methods it names (Starlette adds HEAD to every GET route;
    this API serves no HEAD, so its Allow header would say something untrue)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.methods.discard("HEAD")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no route, wrong method) in the API's typed form."""
    shown = unquote(request.url.path)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return error_response(MethodNotAllowed(
            f"{request.method} is not allowed on {shown}; use {allowed.replace(', ', ' or ')}.",
            "See GET /openapi.json."), {"allow": allowed})
    if exc.status_code == 404:
        return error_response(NotFound(f"No such endpoint: {shown}.", "See GET /openapi.json for the API."))
    return error_response(BadInput(f"The request was refused: {exc.detail}."))


def _too_large(size: int, limit: int, path: str = "") -> TooLarge:
    """`path`: the endpoint, so the words fit what was sent (an import is a file, a learn
    photos, anything else a few settings)."""
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    # in bytes where the rounded sizes would read alike ("1.0 MiB; the service takes up to 1.0")
    said, most = (mib(size), mib(limit)) if mib(size) != mib(limit) else (f"{size:,} bytes", f"{limit:,} bytes")
    if not path.endswith(("/concepts", "/import")):   # generate, eval: a prompt and its settings
        return TooLarge(f"The request is too large ({said}; this endpoint takes up to {most}: a prompt "
                        "and its settings).", "Send what `cones` sends.")
    file = path.endswith("/import")
    return TooLarge(f"The request is too large ({said}; the service takes up to {most}, "
                    f"max_request_bytes = {limit}"
                    + (")." if file else "; photos count a third more than their files)."),
                    ("Raise" if file else "Send fewer or smaller photos, or raise")
                    + " the service's max_request_bytes (its config.toml or CONES_MAX_REQUEST_BYTES "
                    "where the service runs) and restart it.")


async def _body(request: Request) -> bytes:
    """The body, held to its route's limit (`endpoint` set it) as it arrives."""
    limit, size, chunks = request.state.body_limit, 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit, request.url.path)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_declared_length(request: Request, limit: int) -> None:
    """Refused before reading: nothing of an over-long body is ever buffered."""
    raw = request.headers.get("content-length", "")
    if raw.isascii() and raw.isdigit() and int(raw) > limit:
        raise _too_large(int(raw), limit, request.url.path)


def _limited(receive, limit: int, path: str = "", method: str = "POST"):
    """`receive` that stops a body longer than `limit` (longer than declared, or chunked). A GET
    or DELETE takes no body: what one sends is dropped as it comes (a job's event stream keeps
    receiving, to hear of a disconnect, and a limit raised there was a traceback)."""
    size = 0

    async def limited_receive():
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            if method in ("GET", "HEAD", "DELETE"):
                return {**message, "body": b""}
            size += len(message.get("body", b""))
            if size > limit:
                raise _too_large(size, limit, path)
        return message
    return limited_receive


def _check_protocol(value: str | None) -> None:
    """The client's protocol must be this service's. Which side is older says what to do: an old
    `cones` left on PATH was told to restart the service, which cannot help it."""
    if value == PROTOCOL_VERSION:
        return
    if value and value.isascii() and value.isdigit():   # "²".isdigit(), and int() refuses it
        if int(value) < int(PROTOCOL_VERSION):
            raise ProtocolMismatch(
                f"This cones command speaks protocol {value}, older than the service's {PROTOCOL_VERSION}.",
                f"Use the cones command of the install the service runs from (in {Path(sys.executable).parent}), "
                "or update this one to the same version.")
        raise ProtocolMismatch(
            f"The service speaks protocol {PROTOCOL_VERSION}, older than this cones command's {value}.",
            "Restart the service so it runs this install (`systemctl --user restart cones`, or stop "
            "`cones serve` and start it again; after an update `cones service install` writes its unit "
            "again).")
    raise ProtocolMismatch(
        f"The client speaks protocol {value or '(none)'}, this service speaks {PROTOCOL_VERSION}.")


def _line(info: BaseModel) -> bytes:
    return info.model_dump_json().encode() + b"\n"
