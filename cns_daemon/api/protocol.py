"""The socket API's contract: typed request/response models, the protocol version and limits.

Both sides import this module and nothing heavier (no torch): the CLI builds requests from these
models and parses responses with them; the service validates every request body against them.
Errors travel as `ErrorBody` with the codes of cns_daemon.api.errors.

Routes (all under API_PREFIX, every request carries PROTOCOL_HEADER = PROTOCOL_VERSION):
    GET    /status                    -> StatusInfo
    GET    /concepts                  -> ConceptList
    GET    /concepts/{name}           -> ConceptInfo
    POST   /concepts       AddRequest -> JobInfo       (learn job)
    DELETE /concepts/{name}           -> JobInfo       (remove job)
    GET    /concepts/{name}/export    -> safetensors bytes
    POST   /concepts/import  (bytes)  -> JobInfo       (import job)
    POST   /generate  GenerateRequest -> JobInfo       (generate job)
    POST   /eval      EvalRequest     -> JobInfo       (eval job: CLIP-I / CLIP-T)
    GET    /jobs?limit=N  (1..1000)   -> JobList
    GET    /jobs/{id}                 -> JobInfo
    POST   /jobs/{id}/cancel          -> JobInfo
    GET    /jobs/{id}/events          -> NDJSON stream of ProgressInfo, last one has a final state
    GET    /openapi.json              -> the OpenAPI schema (no header needed)

Path segments ({name}, {id}) are percent-encoded by the client and must match NAME_PATTERN /
JOB_ID_PATTERN after decoding (`check_segment`): a name can never smuggle in a `/` or `..` and
reach another route.
"""
from __future__ import annotations

import math
import re
from typing import Literal

from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from cns_daemon.api.errors import BadInput
from cns_daemon.api.names import NAME_PATTERN, MethodName  # noqa: F401  (part of the protocol)

# 2: concept states, job notes, the seed range, strict path segments, 405/413 answers.
# 3: a photo may carry its caption (`Photo.caption`), as an inbox sidecar does.
# 4: a generate request may carry a negative prompt, a CFG scale and an image size.
# 5: the `storage` error (a folder cannot be written); a learn job keeps its photos' names;
#    ConceptInfo.learned_with, StatusInfo.memory.
# 6: an import may name the concept anew (`?name=`); ConceptInfo.photos_archived,
#    StatusInfo.method, a learn's result says its seed, neurons and bytes; a removal may take
#    the concept's archived photos with it (`?photos=1`); POST /photos/prune; AddRequest.skipped.
# 7: a removal's result names the archived photos it leaves, to learn the concept again
#    (`JobResult.photos`).
# 8: the ids of damaged job records (`JobList.damaged`, `QueueInfo.damaged`): a queued learn
#    whose record cannot be read was gone from every listing without a word.
PROTOCOL_VERSION = "8"
PROTOCOL_HEADER = "X-Cones-Protocol"
# The progress message of a learn while a generate runs inside it (`cones jobs` shows it).
PAUSED_FOR = "paused for generate job "
# The message of the last line of a job's event stream when the service stops before the job ends.
STREAM_STOPPING = ("The service is stopping before the job finished; the job stays in its queue "
                   "and runs when the service is back.")
API_PREFIX = "/v1"
NDJSON = "application/x-ndjson"

# Limits (the request-size limit itself is Settings.max_request_bytes).
MAX_PHOTOS = 64
MAX_PROMPT_CHARS = 1000
MAX_SKIPPED_NAME = 1024     # a 255-byte file name shown with \x escapes is 1,020 characters
MAX_SKIPPED_REASON = 2000
MAX_IMAGES = 16
MAX_BOXES = 8
MAX_SIDE = 2048          # pixels, either side of a generated image
MAX_GUIDANCE_SCALE = 30.0
MAX_JOBS_LISTED = 1000
# Seeds are 32-bit, as in most Stable Diffusion tools: the methods derive per-step and per-image
# generators from them (seed * 1_000_003 + step must stay inside torch's 64-bit seed range).
MAX_SEED = 2**32 - 1
# Every method needs at least this many distinct usable photos (3-5 are recommended).
MIN_PHOTOS = 2
TOO_MANY_HINT = ("Keep the 3-5 best (different angles and light); more photos do not make a "
                 "better concept.")
MAX_LEARN_STEPS = 100_000

CLASS_PATTERN = r"^[A-Za-z][A-Za-z -]{0,63}$"
JOB_ID_PATTERN = r"^[0-9a-f]{12}$"   # what Worker.submit makes: 12 hex digits of a uuid4
JobKind = Literal["learn", "generate", "remove", "import", "eval"]
# ok; damaged: its bytes in the store cannot be read (remove it, or salvage the store);
# not_rebuilt: readable, but it cannot be used on the loaded model (for CNS: it could not be
# written back into the weights at start-up). Generating with either is refused.
ConceptState = Literal["ok", "damaged", "not_rebuilt"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
FINAL_STATES = ("done", "failed", "cancelled")
# Job kinds a cancel stops while they run (at their next step); a removal or import, a moment's
# store write, runs to its end once started (a cancel stops them only while queued).
STOPPED_MIDWAY = ("learn", "generate", "eval")
OptionValue = bool | int | float | str


def learn_steps(value, where: str = "steps") -> int | None:
    """The one check of a learn job's step count, wherever it comes from (a request,
    concept.toml): None (the method's default) or a whole number 1..MAX_LEARN_STEPS."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 1 <= value <= MAX_LEARN_STEPS):
        raise BadInput(f"{where} must be a whole number from 1 to {MAX_LEARN_STEPS}, not {value!r}.")
    return value


def too_many_photos(name: str, n: int) -> str:
    """The words for a concept given more than MAX_PHOTOS photos (cones add and the inbox)."""
    return f"{n} photos for {name!r}; at most {MAX_PHOTOS} are taken."


class Model(BaseModel):
    # Unknown fields are errors: a typo in a script must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Model):
    code: str
    message: str
    hint: str = ""


# ---------------------------------------------------------------- requests


NO_NUL = r"^[^\x00]*$"   # text, not bytes: a NUL in a prompt or caption is no one's words


class Photo(Model):
    # Raw bytes in Python, base64 in JSON (both directions).
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    filename: str = Field(min_length=1, max_length=255)
    data: bytes
    caption: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS,
                                pattern=NO_NUL,   # NUL is no text (UTF-16 read as UTF-8)
                                description="What the photo shows (its sidecar photo.txt); "
                                            "None: the method's template caption.")


class SkippedFile(Model):
    # bounded: a learn's list is kept in its job record and sent back with every job listing
    # (a 60 MB reason made each `cones status` read it again)
    file: str = Field(max_length=MAX_SKIPPED_NAME)
    reason: str = Field(max_length=MAX_SKIPPED_REASON)


class AddRequest(Model):
    name: str = Field(pattern=NAME_PATTERN, description="Concept name used as <name> in prompts.")
    class_word: str = Field(pattern=CLASS_PATTERN, description="What it is: dog, mug, star …")
    method: MethodName | None = Field(None, description="None: the service's default method.")
    steps: StrictInt | None = Field(None, ge=1, le=MAX_LEARN_STEPS)
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    options: dict[str, OptionValue] = Field(default_factory=dict, max_length=32,
                                            description="Method hyper-parameters (e.g. top_p, lr).")
    photos: list[Photo] = Field(min_length=1, max_length=MAX_PHOTOS)
    # Files the client left out itself (not images: a video is not sent whole), kept with the
    # job's own skipped files so `cones jobs` and a refusal name them too
    skipped: list[SkippedFile] = Field(default_factory=list, max_length=MAX_PHOTOS)


class LearnJob(Model):
    """What a learn job's record keeps: photos are already in the archive by then."""
    name: str = Field(pattern=NAME_PATTERN)
    class_word: str = Field(pattern=CLASS_PATTERN)
    method: MethodName
    steps: int | None = Field(None, ge=1, le=MAX_LEARN_STEPS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    options: dict[str, OptionValue] = Field(default_factory=dict, max_length=32)
    photo_digests: list[str] = Field(min_length=1)
    # The file names the photos came with, one per digest, for notes that point at a photo (a
    # job written by an older version has none).
    photo_names: list[str] = Field(default_factory=list)
    # Each photo's caption as this request gave it (None: none): the archive keeps one caption
    # per picture, which a later request with the same photo may replace before this job runs.
    photo_captions: list[str | None] = Field(default_factory=list)
    skipped: list[SkippedFile] = Field(default_factory=list)
    source: Literal["cli", "inbox"] = "cli"
    inbox_folder: str | None = None   # the inbox folder to remove on success


class GenerateRequest(Model):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=NO_NUL)
    n: StrictInt = Field(1, ge=1, le=MAX_IMAGES)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="None: the service picks one.")
    steps: StrictInt | None = Field(None, ge=1, le=1000)
    # Boxes stay in their user-facing text form, NAME=x0,y0,x1,y1 in image fractions: the
    # service parses them with the same routine as every other prompt input (prompts.parse_box).
    boxes: list[str] = Field(default_factory=list, max_length=MAX_BOXES)
    negative_prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS, pattern=NO_NUL,
                                        description="What to steer away from, in plain words (no <name>).")
    guidance_scale: float | None = Field(None, ge=1.0, le=MAX_GUIDANCE_SCALE, description=(
        "Classifier-free guidance scale; 1 turns it off. None: the model's own (its cones.json)."))
    # None: the model's native size. The service refuses sizes its VAE cannot divide.
    width: StrictInt | None = Field(None, ge=1, le=MAX_SIDE)
    height: StrictInt | None = Field(None, ge=1, le=MAX_SIDE)

    @field_validator("guidance_scale", mode="before")   # before: NaN would fail the bounds' words
    @classmethod
    def _finite_scale(cls, v):
        # A number only: JSON's true was read as 1 (guidance off) and "7.5" taken as a number.
        if isinstance(v, bool) or (v is not None and not isinstance(v, (int, float))) or (
                isinstance(v, float) and not math.isfinite(v)):
            raise ValueError(f"must be a number from 1 to {MAX_GUIDANCE_SCALE:g}")
        return v

    @model_validator(mode="after")
    def _seeds_in_range(self):
        """Image k is drawn from seed + k: the last one must be a seed one can ask for too."""
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} with n {self.n} reaches seed {self.seed + self.n - 1}, "
                             f"over {MAX_SEED} (image k is drawn from seed + k)")
        return self


class EvalRequest(Model):
    """Score concepts with CLIP: n images per prompt, all named concepts in every prompt."""
    names: list[str] = Field(min_length=1, max_length=MAX_BOXES)
    # None: the service's shipped prompt list. `{}` marks where the concept references go.
    prompts: list[str] | None = Field(None, min_length=1, max_length=200)
    n: StrictInt = Field(4, ge=1, le=MAX_IMAGES)
    clip: str = Field("ViT-L-14", min_length=1, max_length=100, description="open_clip model name.")
    clip_weights: str | None = Field(None, max_length=4096, description=(
        "Local weights file, a transformers CLIP folder, or an open_clip pretrained tag."))
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    steps: StrictInt | None = Field(None, ge=1, le=1000)

    @field_validator("names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"invalid concept name {name!r}")
        if len(set(v)) != len(v):
            raise ValueError("a concept is named twice")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not p.strip() or len(p) > MAX_PROMPT_CHARS for p in v):
            raise ValueError(f"prompts must be non-empty and at most {MAX_PROMPT_CHARS} characters")
        return v


class RemoveJob(Model):
    name: str = Field(pattern=NAME_PATTERN)
    # Also delete its photos from the archive (those no other concept or queued learn uses)
    photos: bool = False
    # the photos it was learned from, as the service found them when the removal was asked for:
    # deleted with `photos`, else named in the result as kept
    photo_digests: list[str] = Field(default_factory=list)


class ImportJob(Model):
    staged: str   # path of the uploaded file inside the data folder
    # The name it is stored under: the file's, or the one the import gave (a job of an older
    # version: none, the file's)
    name: str = ""


# ---------------------------------------------------------------- responses


class ProgressInfo(Model):
    job: str
    state: JobState
    phase: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta_s: float | None = None
    message: str = ""
    error: ErrorBody | None = None


class JobResult(Model):
    concept: str | None = None
    images: list[str] = Field(default_factory=list)
    contact_sheet: str | None = None
    seed: int | None = None           # generate: the seed used (the service picks one if none was given); learn: its seed
    # eval: clip_i, clip_t, n_images …; learn: neurons, size_bytes (and a note, if any)
    metrics: dict[str, float | int | str] | None = None
    # remove (without its photos): the archived photos it was learned from, kept to learn it again
    photos: list[str] = Field(default_factory=list)


class JobInfo(Model):
    id: str
    kind: JobKind
    state: JobState
    summary: str
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    error: ErrorBody | None = None
    result: JobResult | None = None
    progress: ProgressInfo | None = None
    skipped: list[SkippedFile] = Field(default_factory=list)   # learn: photos not used, and why
    note: str = ""   # e.g. that it was re-queued after the service stopped while it ran


class JobList(Model):
    jobs: list[JobInfo]
    damaged: list[str] = Field(default_factory=list)   # ids of job records that cannot be read


class ConceptInfo(Model):
    name: str
    method: str
    class_word: str
    token: str
    created: float
    photos: int                       # what it was learned from
    # of those, how many this store's archive holds (an imported concept's are in the store it
    # came from); None from a service that does not say
    photos_archived: int | None = None
    size_bytes: int
    neurons: int                      # weight elements this concept touches (0 for cones2)
    overlap: dict[str, int] = Field(default_factory=dict)
    fingerprint: str = ""
    metrics: dict[str, float | int | str | None] = Field(default_factory=dict)
    # What it was learned with: steps, seed and the options given (not the defaults they left)
    learned_with: dict[str, OptionValue | None] = Field(default_factory=dict)
    state: ConceptState = "ok"
    problem: str = ""                 # why it is not ok
    hint: str = ""                    # what to do about it


class ConceptList(Model):
    concepts: list[ConceptInfo]


class PhotosPruned(Model):
    """`POST /photos/prune`: archived photos no concept or queued learn names, deleted."""
    deleted: int
    kept: int                         # photos still in use


class QueueInfo(Model):
    queued: int
    running: JobInfo | None = None
    damaged: list[str] = Field(default_factory=list)   # ids of job records that cannot be read


class StatusInfo(Model):
    protocol: str
    version: str
    pid: int
    uptime_s: float
    socket: str
    data: str
    inbox: str
    inbox_watched: bool
    model: str
    device: str
    dtype: str
    fingerprint: str
    concepts: int
    damaged: int = 0                  # concepts whose bytes cannot be read
    not_rebuilt: int = 0              # readable concepts that cannot be used on this model
    memory: list[str] = Field(default_factory=list)   # memory options acting on this device
    method: str = ""                  # what a learn uses when it names none (the `method` setting)
    queue: QueueInfo


# ---------------------------------------------------------------- helpers

SEGMENTS = {"name": (NAME_PATTERN, "concept name",
                     "Use 1-64 ASCII letters (a-z, A-Z), digits, '-' or '_' (for example: rex, my_mug, red-star)."),
            "id": (JOB_ID_PATTERN, "job id", "A job id is 12 hex digits; `cones jobs` lists them.")}


def check_segment(kind: str, value: str) -> str:
    """A path parameter (`name` or `id`) as it must be, or BadInput saying what it should be."""
    pattern, what, hint = SEGMENTS[kind]
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        shown = value if len(str(value)) <= 80 else f"{str(value)[:77]}..."
        raise BadInput(f"Invalid {what} {shown!r}.", hint)
    return value


def segment(kind: str, value: str) -> str:
    """`value` checked and percent-encoded for a URL path (the client side of check_segment)."""
    return quote(check_segment(kind, value), safe="")


# Plain words for the validation failures a person meets (field, pydantic error type); the
# rest keep pydantic's own message.
FRIENDLY_ERRORS = {
    ("class_word", "string_pattern_mismatch"):
        "what the concept is, in letters, spaces or hyphens (up to 64), such as dog or coffee mug",
    ("prompt", "string_too_short"): "empty",
    ("negative_prompt", "string_too_short"): "empty",
    ("caption", "string_pattern_mismatch"): "holds a NUL character, which no text has (UTF-16 saved "
                                            "without its byte-order mark?)",
    ("prompt", "string_pattern_mismatch"): "holds a NUL character, which no text has",
    ("negative_prompt", "string_pattern_mismatch"): "holds a NUL character, which no text has",
}


# pydantic's bounds in plain words ("Input should be greater than or equal to 1")
BOUNDS = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most"),
          "greater_than": ("gt", "more than"), "less_than": ("lt", "less than")}


def describe_validation_error(exc: Exception, names: dict[str, str] | None = None) -> str:
    """One readable line out of a pydantic ValidationError (field path: message). `names`: what
    the caller calls a field (the CLI: its flag, "--class" for class_word)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors()[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        kind, ctx = err.get("type", ""), err.get("ctx") or {}
        friendly = FRIENDLY_ERRORS.get((loc[-1] if loc else "", kind))
        if friendly is None and kind in BOUNDS and BOUNDS[kind][0] in ctx:
            bound = ctx[BOUNDS[kind][0]]
            friendly = f"must be {BOUNDS[kind][1]} {bound:g}" if isinstance(bound, float) else \
                f"must be {BOUNDS[kind][1]} {bound}"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")   # our own validators' words
        if loc and names and loc[0] in names:
            loc = [names[loc[0]], *loc[1:]]
        # (a check of the whole request, seed with n, says its fields in its own words)
        parts.append(f"{'.'.join(loc)}: {friendly or msg}" if loc else friendly or msg)
    return "; ".join(parts)
