"""The socket API: a small ASGI app (no framework) over the Service.

Each route names its request and response models (cns_daemon.api.protocol), which gives the typed
validation and the OpenAPI document from one table. Every request must carry the protocol
header; bodies are size-limited before they are parsed (a declared Content-Length over the limit
is refused with 413 before a byte of the body is read, and the connection is closed); routes are
matched on the raw, still percent-encoded path, so an encoded `/` inside a name never reaches
another route, and every path parameter is checked (protocol.check_segment); a known path with
the wrong method answers 405 with an Allow header. Errors are ErrorBody JSON with an HTTP status
per error code. Blocking work (store reads, photo checks) runs in threads so a long `cones add`
upload never stalls a progress stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import unquote

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from cns_daemon.api.errors import BadInput, ConesError, ErrorCode, Internal, NotFound, ProtocolMismatch
from cns_daemon.api.protocol import (API_PREFIX, FINAL_STATES, MAX_JOBS_LISTED, NDJSON, PROTOCOL_HEADER,
                                     PROTOCOL_VERSION, SEGMENTS, AddRequest, ConceptInfo, ConceptList,
                                     ErrorBody, EvalRequest, GenerateRequest, JobInfo, JobList,
                                     ProgressInfo, StatusInfo, check_segment, describe_validation_error)
from cns_daemon.service import Service

log = logging.getLogger(__name__)

HTTP_STATUS = {
    ErrorCode.BAD_INPUT: 400, ErrorCode.NOT_FOUND: 404, ErrorCode.CONFLICT: 409,
    ErrorCode.BAD_PHOTO: 422, ErrorCode.MODEL_MISMATCH: 409, ErrorCode.CORRUPT: 500,
    ErrorCode.MODEL_LOAD: 503, ErrorCode.PROTOCOL: 400, ErrorCode.CANCELLED: 409,
    ErrorCode.UNAVAILABLE: 503, ErrorCode.INTERNAL: 500,
}


class TooLarge(BadInput):
    """A request body over the limit: HTTP 413, and the connection is closed (its unread body
    must not be parsed as the next request)."""
    http_status = 413
    headers = [(b"connection", b"close")]


class MethodNotAllowed(BadInput):
    http_status = 405

    def __init__(self, message: str, hint: str, allowed: list[str]):
        super().__init__(message, hint)
        self.headers = [(b"allow", ", ".join(allowed).encode())]


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: bytes


@dataclass
class Response:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None


@dataclass
class Route:
    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    content_type: str = "application/json"   # of the response; the schema says what it carries
    versioned: bool = True                    # needs the protocol header
    regex: re.Pattern = field(init=False)

    def __post_init__(self):
        self.regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json().encode(), status)


def error_response(exc: ConesError) -> Response:
    body = ErrorBody(code=exc.code.value, message=exc.message, hint=exc.hint)
    response = json_response(body, getattr(exc, "http_status", HTTP_STATUS.get(exc.code, 500)))
    response.headers.extend(getattr(exc, "headers", []))
    return response


def parse_body(model: type[BaseModel], data: bytes) -> BaseModel:
    try:
        return model.model_validate_json(data or b"{}")
    except ValidationError as exc:
        raise BadInput(f"Invalid request: {describe_validation_error(exc)}.",
                       "See `cones --help`, or the schema at GET /openapi.json.") from None


class App:
    """The ASGI callable. `service` does the work; this class only speaks HTTP."""

    def __init__(self, service: Service, max_request_bytes: int):
        self.service = service
        self.max_request_bytes = max_request_bytes
        self.routes = self._routes()

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
                  response=JobInfo),
            Route("GET", f"{p}/concepts/{{name}}", self.show_concept, "One concept",
                  response=ConceptInfo),
            Route("DELETE", f"{p}/concepts/{{name}}", self.remove, "Remove a concept (queues a job)",
                  response=JobInfo),
            Route("GET", f"{p}/concepts/{{name}}/export", self.export,
                  "Export a concept as one safetensors file", content_type="application/octet-stream"),
            Route("POST", f"{p}/generate", self.generate, "Generate images (queues a job)",
                  request=GenerateRequest, response=JobInfo),
            Route("POST", f"{p}/eval", self.evaluate, "Score concepts with CLIP-I / CLIP-T (queues a job)",
                  request=EvalRequest, response=JobInfo),
            Route("GET", f"{p}/jobs", self.list_jobs, "Recent jobs, newest first", response=JobList),
            Route("GET", f"{p}/jobs/{{id}}", self.show_job, "One job", response=JobInfo),
            Route("POST", f"{p}/jobs/{{id}}/cancel", self.cancel, "Cancel a job", response=JobInfo),
            Route("GET", f"{p}/jobs/{{id}}/events", self.events,
                  "Follow a job: JSON lines (ProgressInfo) until a final state",
                  response=ProgressInfo, content_type=NDJSON),
            Route("GET", "/openapi.json", self.openapi, "This schema", versioned=False),
        ]

    # ------------------------------------------------------------ handlers

    async def status(self, req: Request) -> Response:
        return json_response(await asyncio.to_thread(self.service.status))

    async def list_concepts(self, req: Request) -> Response:
        concepts = await asyncio.to_thread(self.service.concepts)
        return json_response(ConceptList(concepts=concepts))

    async def show_concept(self, req: Request) -> Response:
        return json_response(await asyncio.to_thread(self.service.concept, req.params["name"]))

    async def add(self, req: Request) -> Response:
        body = await asyncio.to_thread(parse_body, AddRequest, req.body)
        job = await asyncio.to_thread(self.service.add, body)
        return json_response(self.service.job_info(job), 202)

    async def remove(self, req: Request) -> Response:
        job = await asyncio.to_thread(self.service.remove, req.params["name"])
        return json_response(self.service.job_info(job), 202)

    async def export(self, req: Request) -> Response:
        data = await asyncio.to_thread(self.service.export, req.params["name"])
        return Response(data, content_type="application/octet-stream")

    async def import_concept(self, req: Request) -> Response:
        job = await asyncio.to_thread(self.service.import_file, req.body)
        return json_response(self.service.job_info(job), 202)

    async def generate(self, req: Request) -> Response:
        body = parse_body(GenerateRequest, req.body)
        job = await asyncio.to_thread(self.service.generate, body)
        return json_response(self.service.job_info(job), 202)

    async def evaluate(self, req: Request) -> Response:
        body = parse_body(EvalRequest, req.body)
        job = await asyncio.to_thread(self.service.evaluate, body)
        return json_response(self.service.job_info(job), 202)

    async def list_jobs(self, req: Request) -> Response:
        raw = req.query.get("limit", "50")
        limit = int(raw) if raw.isdigit() else 0
        if not 1 <= limit <= MAX_JOBS_LISTED:
            raise BadInput(f"limit must be a whole number from 1 to {MAX_JOBS_LISTED}, not {raw!r}.")
        jobs = await asyncio.to_thread(self.service.jobs, limit)
        return json_response(JobList(jobs=jobs))

    async def show_job(self, req: Request) -> Response:
        job = await asyncio.to_thread(self.service.job, req.params["id"])
        return json_response(self.service.job_info(job))

    async def cancel(self, req: Request) -> Response:
        job = await asyncio.to_thread(self.service.cancel, req.params["id"])
        return json_response(self.service.job_info(job))

    async def events(self, req: Request) -> Response:
        job_id = req.params["id"]
        await asyncio.to_thread(self.service.job, job_id)   # NotFound before the stream starts
        return Response(status=200, content_type=NDJSON, stream=self._follow(job_id))

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
                    info = await asyncio.wait_for(queue.get(), timeout=10.0)
                except asyncio.TimeoutError:
                    # Heartbeat: the same state again, so a dead client is noticed and a
                    # follower sees the job is alive; also catches a final state missed by
                    # a job that finished through a path that published nothing.
                    job = await asyncio.to_thread(self.service.job, job_id)
                    info = (ProgressInfo(job=job_id, state=job.state, error=job.error)
                            if job.state in FINAL_STATES else
                            hub.latest(job_id) or ProgressInfo(job=job_id, state=job.state))
                yield _line(info)
                if info.state in FINAL_STATES:
                    return
        finally:
            hub.unsubscribe(job_id, queue)

    async def openapi(self, req: Request) -> Response:
        return Response(json.dumps(self.openapi_schema()).encode())

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
            params = re.findall(r"\{(\w+)\}", r.path)
            if params or r.versioned:
                op["parameters"] = [{"name": n, "in": "path", "required": True,
                                     "schema": {"type": "string"}} for n in params]
                if r.versioned:
                    op["parameters"].append({"name": PROTOCOL_HEADER, "in": "header", "required": True,
                                             "schema": {"type": "string", "enum": [PROTOCOL_VERSION]}})
            paths.setdefault(r.path, {})[r.method.lower()] = op
        return {"openapi": "3.1.0",
                "info": {"title": "cones service", "version": PROTOCOL_VERSION},
                "paths": paths, "components": {"schemas": defs.get("$defs", {})}}

    # ------------------------------------------------------------ ASGI plumbing

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            route, params = self._match(scope["method"], _raw_path(scope))
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if route.versioned:
                _check_protocol(headers.get(PROTOCOL_HEADER.lower()))
            body = await self._read_body(headers, receive)
            query = dict(_query_pairs(scope.get("query_string", b"")))
            response = await route.handler(Request(scope["method"], scope["path"], params, query, body))
        except ConesError as exc:
            response = error_response(exc)
        except Exception as exc:  # a bug: log it, answer in typed form, keep serving
            log.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            response = error_response(Internal(f"The service failed on this request: "
                                               f"{type(exc).__name__}: {exc}"))
        await _send(response, send, receive)

    def _match(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]]:
        """The route for a raw (percent-encoded) path; its parameters decoded and checked."""
        allowed: list[str] = []
        for route in self.routes:
            m = route.regex.match(raw_path)
            if not m:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            params = {k: unquote(v) for k, v in m.groupdict().items()}
            for kind, value in params.items():
                if kind in SEGMENTS:
                    check_segment(kind, value)
            return route, params
        shown = unquote(raw_path)
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {shown}; use {' or '.join(allowed)}.",
                                   "See GET /openapi.json.", allowed)
        raise NotFound(f"No such endpoint: {shown}.", "See GET /openapi.json for the API.")

    async def _read_body(self, headers: dict[str, str], receive) -> bytes:
        limit = self.max_request_bytes
        raw_length = headers.get("content-length", "")
        declared = int(raw_length) if raw_length.isdigit() else 0
        if declared > limit:   # refused before reading: nothing of it is ever buffered
            raise _too_large(declared, limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:   # a body longer than declared (or chunked): stop reading here
                raise _too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(f"The request is too large ({size} bytes; the limit is {limit}).",
                    "Send fewer or smaller photos, or raise max_request_bytes in config.toml.")


def _raw_path(scope) -> str:
    """The request path as sent (percent-encoding kept), without the query."""
    raw = scope.get("raw_path")
    if raw is None:   # an ASGI server without raw_path: fall back to the decoded path
        return scope["path"]
    return raw.decode("latin-1").split("?", 1)[0]


def _check_protocol(value: str | None) -> None:
    if value != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"The client speaks protocol {value or '(none)'}, this service speaks {PROTOCOL_VERSION}.")


def _query_pairs(raw: bytes):
    from urllib.parse import parse_qsl

    return parse_qsl(raw.decode("latin-1"))


def _line(info: BaseModel) -> bytes:
    return info.model_dump_json().encode() + b"\n"


async def _send(response: Response, send, receive) -> None:
    headers = [(b"content-type", response.content_type.encode())] + response.headers
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        return
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    disconnected = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    watcher = asyncio.create_task(watch())
    stream = response.stream
    try:
        while not disconnected.is_set():
            nxt = asyncio.ensure_future(stream.__anext__())
            gone = asyncio.ensure_future(disconnected.wait())
            done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:   # the client went away: stop the generator, then close it
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                break
            gone.cancel()
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
        await stream.aclose()


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
