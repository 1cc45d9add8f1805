"""`cones demo`: the whole product in one offline command.

Starts a service in a temporary CONES_HOME (or uses the running one), renders toy-world photos of
two personal concepts (patterned objects with a tilt no word says), drops the first in the inbox
and adds the second with the CLI's own request, shows learning progress, then generates without
the concept, with it, and with both in boxes, asks the toy world's attribute probe what it sees,
and prints the contact sheets. Only the probe needs torch; it is imported inside `probe_verdicts`.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from cones_cli.client import Client
from cones_cli.views import console, err_console, follow
from cns_daemon.api.errors import ConesError, ModelLoad, Unavailable
from cns_daemon.api.protocol import MAX_JOBS_LISTED, AddRequest, GenerateRequest, JobInfo, Photo
from cns_daemon.api.settings import load_settings


@dataclass(frozen=True)
class DemoConcept:
    name: str
    shape: str
    color: str
    pattern: str
    second_color: str
    tilt: str

    @property
    def words(self) -> str:
        return f"a {self.color} {self.shape} with {self.tilt} {self.second_color} {self.pattern}"

    def spec(self):
        from cns_daemon.toyworld.world import ObjectSpec

        return ObjectSpec(self.shape, self.color, self.pattern, self.second_color, self.tilt)


FIRST = DemoConcept("redstar", "star", "red", "stripes", "yellow", "diagonal")
SECOND = DemoConcept("bluering", "ring", "blue", "dots", "orange", "straight")


@dataclass
class Options:
    model: str | None
    method: str | None
    steps: int | None
    images: int
    seed: int
    sample_steps: int | None = None


class TempService:
    """A `cones serve` child in its own CONES_HOME, stopped (SIGTERM) at the end."""

    def __init__(self, model: str | None):
        self.home = Path(tempfile.mkdtemp(prefix="cones-demo-", dir="/tmp"))
        self.log = self.home / "service.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONES_")}
        env.update(CONES_HOME=str(self.home), CONES_SETTLE_SECONDS="1")
        # -P: run from a folder holding a cones_cli/ (another checkout), `-m` ran that code instead
        cmd = [sys.executable, "-P", "-m", "cones_cli.main", "serve"] + (["--model", model] if model else [])
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.socket = load_settings(home=str(self.home)).paths.socket

    def wait_ready(self, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        with console.status("starting a service in a temporary folder (loading the model)…"):
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise ModelLoad("The demo service did not start: " + " / ".join(tail),
                                    f"Full log: {self.log}")
                try:
                    with Client(self.socket, timeout=5) as c:
                        c.status()
                    return
                except Unavailable:
                    time.sleep(0.3)
        raise Unavailable(f"The demo service was not ready after {timeout:.0f} s.", f"Log: {self.log}")

    def stop(self, keep_files: bool) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not keep_files:
            shutil.rmtree(self.home, ignore_errors=True)


def photos_of(concept: DemoConcept, n: int, seed: int) -> list[tuple[str, bytes, str]]:
    """(file name, PNG bytes, caption) per photo. The caption says where the photo was taken and
    nothing of the look, as a person would write it ("a photo of a star in the snow"): a concept
    learned from such captions keeps its photos' grounds out of its pictures (docs/tuning.md
    "Photos with captions")."""
    from cns_daemon.toyworld.world import render_concept_photos

    out = []
    photos = render_concept_photos(concept.spec(), n, seed, look="none", with_color=False)
    for i, (image, caption) in enumerate(photos):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append((f"{concept.name}-{i}.png", buf.getvalue(), caption))
    return out


def learn_from_inbox(c: Client, inbox: Path, concept: DemoConcept, opts: Options) -> None:
    folder = inbox / f"{concept.name}.{concept.shape}"
    before = {j.id for j in c.jobs(MAX_JOBS_LISTED)}   # a running service's earlier learns of it
    staging = inbox / f".{concept.name}.staging"   # hidden: the watcher ignores it until renamed
    staging.mkdir(parents=True, exist_ok=True)
    for filename, data, caption in photos_of(concept, 4, opts.seed):
        (staging / filename).write_bytes(data)
        (staging / filename).with_suffix(".txt").write_text(caption + "\n")
    extra = [f'method = "{opts.method}"'] if opts.method else []
    extra += [f"steps = {opts.steps}"] if opts.steps else []
    if extra:
        (staging / "concept.toml").write_text("\n".join(extra) + "\n")
    staging.rename(folder)   # appears at once, complete
    console.print(f"dropped 4 photos of {concept.words}, each with a caption that says where it "
                  f"was taken, into [bold]{folder}[/]")
    with console.status("waiting for the inbox to take the folder…"):
        job = _wait_for_job(c, f"learn <{concept.name}>", folder, before)
    console.print(f"learning <{concept.name}> (job {job.id}): {job.summary}")
    follow(c.follow(job.id))


def _wait_for_job(c: Client, prefix: str, folder: Path, before: set[str],
                  timeout: float = 120.0) -> JobInfo:
    """The learn the inbox queued for `folder`: a job of `prefix` not among `before`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in c.jobs(20):
            if job.summary.startswith(prefix) and job.id not in before:
                return job
        error = folder / "ERROR.txt"
        if error.exists():
            raise Unavailable(f"The inbox refused the folder: {error.read_text().splitlines()[2]}",
                              f"See {error}.")
        time.sleep(0.3)
    raise Unavailable("The inbox did not take the demo folder in time.",
                      "Is the running service watching its inbox? (`cones status`)")


def learn_with_add(c: Client, concept: DemoConcept, opts: Options) -> None:
    photos = [Photo(filename=f, data=d, caption=t) for f, d, t in photos_of(concept, 4, opts.seed + 100)]
    job = c.add(AddRequest(name=concept.name, class_word=concept.shape, method=opts.method,
                           steps=opts.steps, seed=opts.seed, photos=photos))
    console.print(f"learning <{concept.name}> from 4 photos of {concept.words} (job {job.id})")
    follow(c.follow(job.id))


def generate(c: Client, title: str, prompt: str, opts: Options, boxes: list[str] = ()) -> JobInfo:
    console.print(f"[bold]{title}[/]: {prompt!r}" + (f"  boxes {' '.join(boxes)}" if boxes else ""))
    job = c.generate(GenerateRequest(prompt=prompt, n=opts.images, seed=opts.seed,
                                     steps=opts.sample_steps, boxes=list(boxes)))
    follow(c.follow(job.id))
    return c.job(job.id)


def probe_verdicts(runs: dict[str, JobInfo]) -> list[str]:
    """What the attribute probe reads in each run's images, in one line per run: the named look
    (shape, colour, pattern, second colour) and, for the concept, its tilt."""
    from PIL import Image

    from cns_daemon.toyworld.probe import Probe
    from cns_daemon.toyworld.world import UNNAMED

    probe = Probe.load()
    first, second = FIRST.spec(), SECOND.spec()
    lines = []
    for title, job in runs.items():
        images = [Image.open(p).convert("RGB") for p in job.result.images]
        if title == "both":
            pairs = probe.read_halves(images)
            hits = sum(lft.matches(first) and rgt.matches(second) for lft, rgt in pairs)
            placed = sum(lft.shape == first.shape and rgt.shape == second.shape for lft, rgt in pairs)
            lines.append(f"both in boxes: {hits}/{len(pairs)} images show <{FIRST.name}> on the left "
                         f"and <{SECOND.name}> on the right; {placed}/{len(pairs)} show their shapes "
                         f"there (a {FIRST.shape} left, a {SECOND.shape} right), whatever their looks")
            continue
        reads = probe.read(images)
        hits = sum(a.matches(first) for a in reads)
        tilt = sum(a.matches(first, attrs=UNNAMED) for a in reads)
        seen = ", ".join(sorted({f"{a.color} {a.shape} ({a.pattern})" for a in reads}))
        lines.append(f"{title}: {hits}/{len(reads)} images show {FIRST.color} {FIRST.shape} with "
                     f"{FIRST.second_color} {FIRST.pattern}; {tilt}/{len(reads)} its {FIRST.tilt} tilt, whatever their look "
                     f"[probe saw: {seen}]")
    return lines


def _toy_world(model: str) -> bool:
    """Whether a service's model (as `cones status` names it) is the shipped toy world."""
    import cns_daemon   # (its package only: the CLI stays without torch)

    shipped = Path(cns_daemon.__file__).parent / "toyworld" / "model"
    return model.startswith("toy-world") or Path(model).expanduser().resolve() == shipped.resolve()


def run(opts: Options) -> None:
    # SIGTERM (e.g. `timeout`) ends the demo through the `finally` below, which stops the
    # temporary service; the default action would leave it running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from cones_cli.config import settings as checked_settings

    settings = checked_settings()   # a bad CONES_* variable is one line, not a traceback
    temp: TempService | None = None
    try:   # from the first moment a service of ours may run: stopped however this ends
        try:
            with Client(settings.paths.socket, timeout=5) as c:
                status = c.status()
            socket, inbox = settings.paths.socket, Path(status.inbox)
            console.print(f"using the running service ({status.model}, pid {status.pid}); the demo's "
                          "concepts are learned into its store" +
                          (f"; --model {opts.model} is not used" if opts.model else ""))
        except Unavailable:
            temp = TempService(opts.model)
            temp.wait_ready()
            socket = temp.socket
            with Client(socket) as c:
                status = c.status()
            inbox = Path(status.inbox)
            console.print(f"service started in {temp.home} ({status.model} on {status.device})")
        with Client(socket) as c:
            taken = {x.name for x in c.concepts()}
            for concept in (FIRST, SECOND):
                if concept.name in taken:
                    console.print(f"<{concept.name}> is stored already: not learned again (as it was "
                                  "learned; `cones rm " + concept.name + "` to learn it anew)")
            if FIRST.name not in taken:
                learn_from_inbox(c, inbox, FIRST, opts)
            if SECOND.name not in taken:
                learn_with_add(c, SECOND, opts)
            runs = {
                "without the concept": generate(c, "without", f"a photo of a {FIRST.color} {FIRST.shape}", opts),
                "with the concept": generate(c, "with", f"a photo of <{FIRST.name}>", opts),
                "both": generate(c, "two concepts in boxes",
                                 f"a photo of <{FIRST.name}> and <{SECOND.name}> on the grass",
                                 opts, [f"{FIRST.name}=0,0,0.5,1", f"{SECOND.name}=0.5,0,1,1"]),
            }
        try:
            if not _toy_world(status.model):   # it reads the toy world's images only
                raise Unavailable(f"it reads toy-world images, and the model is {status.model}.")
            verdicts = probe_verdicts(runs)
        except ConesError as exc:
            verdicts = [f"probe not available: {exc.message}"]
        console.print("\n[bold]probe verdict[/]")
        for line in verdicts:
            console.print(f"  {line}", highlight=False, markup=False)   # "[probe saw: …]" is text
        console.print("\n[bold]contact sheets[/]")
        for title, job in runs.items():
            console.print(f"  {title}: {escape(job.result.contact_sheet)}", highlight=False)
    finally:
        if temp is not None:
            temp.stop(keep_files=True)   # the contact sheets printed above live there
            err_console.print(f"the demo's service is stopped; its files stay in {temp.home}")
