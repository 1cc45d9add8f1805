"""`cones` entry point: a thin client of the service's socket API.

This module must never import torch (the CLI starts in a blink and runs where the model does
not): it imports only the protocol, settings and errors from cns_daemon, plus httpx/typer/rich.
`cones serve` and `cones demo` import the daemon lazily inside the command.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from cli.admin import service_app, store_app
from cli.client import Client
from cli.config import CONCEPT, JSON, config_file, settings
from cli.toyworld import toyworld_app
from cli.views import (concept_problems, concept_table, concepts_table, console, err_console,
                       eval_table, follow, handled, jobs_table, output_folder, print_json,
                       shorten, status_table, this_command, write_file)
from cns_daemon.api.errors import BadInput, BadPhoto, ConesError, Conflict, Corrupt, Interrupted, Unavailable
from cns_daemon.api.names import validate_new_name
from cns_daemon.archive import caption_file, read_text, shown, sidecar_caption, sniff
from cns_daemon.api.protocol import (MAX_GUIDANCE_SCALE, MAX_IMAGES, MAX_JOBS_LISTED, MAX_PROMPT_CHARS, MAX_SEED,
                                     MAX_PHOTOS, ErrorBody, TOO_MANY_HINT, AddRequest, EvalRequest,
                                     GenerateRequest, JobInfo, Photo, too_many_photos)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
QUEUED_GRACE_S = 1.0   # how long a job may sit queued before the CLI says what it waits for

app = typer.Typer(name="cones", help="Personalize Stable Diffusion: learn concepts, generate them.",
                  no_args_is_help=True, add_completion=False)


def _installed_version() -> str:
    from importlib.metadata import version as v

    return v("cones")


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(_installed_version())
        raise typer.Exit()


@app.callback()
def _root(version_flag: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                            help="Print the installed version and exit.")) -> None:
    """Personalize Stable Diffusion: learn concepts, generate them."""


app.add_typer(service_app, name="service")
app.add_typer(store_app, name="store")
app.add_typer(toyworld_app, name="toyworld")


def client() -> Client:
    paths = settings().paths
    return Client(paths.socket, data_lock=paths.data_lock)


def wait_for(c: Client, job: JobInfo, quiet: bool = False, tell_wait: bool = True,
             left_behind: str = "") -> JobInfo:
    """Follow a job to its end; Ctrl-C stops following, not the job (`left_behind`: what the
    command will then not do, said with it). A job still queued after a moment waits for
    another: say which (on stderr; `tell_wait` False for --json output)."""
    try:
        running = c.status().queue.running if tell_wait and job.state == "queued" else None
        # A generate runs inside a running learn at its next step: that is no wait to tell.
        if running is not None and running.id != job.id and not (
                job.kind == "generate" and running.kind == "learn"):
            time.sleep(QUEUED_GRACE_S)
            if c.job(job.id).state == "queued" and c.job(running.id).state == "running":
                what = escape(shorten(running.summary))
                err_console.print(f"Job {job.id} is queued behind job {running.id} ({what}); "
                                  "`cones jobs` shows the queue. Ctrl-C stops waiting, not the job.",
                                  highlight=False)
        follow(c.follow(job.id), quiet=quiet)
    except KeyboardInterrupt:   # exit 130; with --json the error document says it too
        raise Interrupted(f"Stopped following; job {job.id} goes on in the service{left_behind}.",
                          f"`cones jobs` shows it; `cones cancel {job.id}` stops it.") from None
    except Unavailable as exc:   # the service went away under us: which job to look for later
        raise Unavailable(f"{exc.message.rstrip('.')} (job {job.id}){left_behind}.", exc.hint) from None
    return c.job(job.id)


# ---------------------------------------------------------------- the service


@app.command()
@handled
def serve(model: Optional[str] = typer.Option(None, help="Diffusers folder or .safetensors/.ckpt file (default: the shipped toy-world model; 'tiny': a seeded test model)."),
          device: Optional[str] = typer.Option(None, help="auto | cpu | cuda (default: auto, the GPU where there is one)."),
          dtype: Optional[str] = typer.Option(None, help="auto | float32 | float16 | bfloat16 (default: auto, bfloat16 on a GPU that has it natively, else float16; float32 on the CPU)."),
          settle: Optional[float] = typer.Option(None, help="Seconds an inbox folder must be quiet before it is taken, 0 to 3600 (default 5)."),
          no_inbox: bool = typer.Option(False, "--no-inbox", help="Do not watch the inbox folder."),
          log_level: str = typer.Option("INFO", help=" | ".join(LOG_LEVELS))) -> None:
    """Run the service in the foreground (what the systemd unit starts)."""
    from cns_daemon.daemon import configure_logging, serve as run

    if log_level.upper() not in LOG_LEVELS:
        raise BadInput(f"Unknown log level {log_level!r}.", f"Use one of {' | '.join(LOG_LEVELS)}.")
    configure_logging(log_level)
    run(settings(model=model, device=device, dtype=dtype, settle_seconds=settle,
                 watch_inbox=False if no_inbox else None))


@app.command()
@handled
def status(as_json: bool = JSON) -> None:
    """Is the service running, on what model, with what queue."""
    with client() as c:
        info = c.status()
    if as_json:
        print_json(info)
        return
    console.print(status_table(info))
    # The service read config.toml when it started; an edit since counts after a restart (this
    # command and `cones add` read it now, so their defaults and the service's can differ).
    cfg = config_file()
    with contextlib.suppress(OSError):
        if cfg.is_file() and cfg.stat().st_mtime > time.time() - info.uptime_s:
            err_console.print(f"note: {escape(str(cfg))} changed after the service started; it applies "
                              "to the service once it restarts (`systemctl --user restart cones`, or "
                              "stop and start `cones serve`); its method and steps count for "
                              "`cones add` at once, as this command reads them itself.", highlight=False)


# ---------------------------------------------------------------- concepts


@app.command()
@handled
def add(name: str = typer.Argument(..., help="Concept name, used as <name> in prompts."),
        photos: List[Path] = typer.Argument(..., help="Photos of it: at least 2 different, 3-5 work best, at most 64."),
        class_word: str = typer.Option(..., "--class", help="What it is: dog, mug, star …"),
        method: Optional[str] = typer.Option(None, help="cns | cones | cones2 (default: CONES_METHOD or "
                                             "config.toml's `method` where this command runs, else the "
                                             "service's, which `cones status` shows; cns unless set)."),
        steps: Optional[int] = typer.Option(None, help="Training steps (default: CONES_STEPS or "
                                            "config.toml's `steps` where this command runs, else the "
                                            "service's; the method's own unless set)."),
        seed: int = typer.Option(0, help=f"Training seed (0 to {MAX_SEED})."),
        option: List[str] = typer.Option([], "--option", help="Method hyper-parameter KEY=VALUE (e.g. top_p=5); repeatable."),
        no_wait: bool = typer.Option(False, "--no-wait", help="Queue the job and return."),
        as_json: bool = JSON) -> None:
    """Learn a concept from photos (a photo.txt beside photo.jpg is its caption, as in the inbox)."""
    validate_new_name(name)   # the friendly words, before the photos are read
    options = _options(option)
    # `cones add rex dir/*` names each photo's caption too: a caption is read with its photo
    # (as in the inbox), not counted against the 64 nor said to be "not an image"
    captions = {c.resolve() for p in photos if p.is_file() and (c := caption_file(p)) is not None}
    photos = [p for p in photos if p.resolve() not in captions]
    if len(photos) > MAX_PHOTOS:
        raise BadInput(too_many_photos(name, len(photos)), TOO_MANY_HINT)
    items, not_photos = [], []
    for p in photos:
        if p.is_dir():
            raise BadInput(f"{p} is a directory, not a photo.", f"Give the photos in it, e.g. {p}/*.jpg.")
        if not p.is_file():
            raise BadInput(f"No such file: {p}." if not p.exists() else
                           f"{p} is not a regular file (a pipe or a device?).", "Give paths of photo files.")
        if (why := sniff(p)) is not None:   # not sent (a video can be gigabytes): said here
            not_photos.append(why)
            continue
        caption = sidecar_caption(p)
        if caption is not None and len(caption) > MAX_PROMPT_CHARS:
            raise BadInput(f"The caption {caption_file(p)} has {len(caption)} characters, over "
                           f"{MAX_PROMPT_CHARS}.", "Shorten it: a sentence saying what the photo shows.")
        # a name that is not UTF-8 cannot travel as text: sent as shown ("\ufffd" for its odd bytes)
        items.append(_model(Photo, filename=shown(p.name), data=p.read_bytes(), caption=caption))
    # Left out, the method and steps are the service's settings, unless this command's own
    # config.toml or CONES_METHOD / CONES_STEPS set them (the layering the README promises).
    mine = settings()
    if method is None and "method" in mine.model_fields_set:
        method = mine.method
    if steps is None and "steps" in mine.model_fields_set:   # --steps 0 is refused, not "default"
        steps = mine.steps
    for s in not_photos:   # said first: the service's refusal, if any, cannot name them
        err_console.print(f"[yellow]skipped[/] {escape(s.file)}: {escape(s.reason)}", highlight=False)
    if not items:
        raise BadPhoto(f"No usable photo for {name!r}: " + "; ".join(f"{s.file}: {s.reason}" for s in not_photos) + ".")
    req = _model(AddRequest, name=name, class_word=class_word, method=method, steps=steps,
                 seed=seed, photos=items, options=options, skipped=not_photos)
    with client() as c:
        job = c.add(req)
        for s in job.skipped[len(not_photos):]:   # the service's own (ours were said above)
            err_console.print(f"[yellow]skipped[/] {escape(s.file)}: {escape(s.reason)}", highlight=False)
        if no_wait:
            print_json(job) if as_json else console.print(f"Queued job {job.id}: {escape(shorten(job.summary))}")
            return
        job = wait_for(c, job, quiet=as_json, tell_wait=not as_json)
        if as_json:
            print_json(job)
            return
        info = c.concept(name)
        what = "a residual embedding" if info.method == "cones2" else f"{info.neurons:,} neurons"
        console.print(f"Learned <{info.name}> ({info.method}, {info.class_word}): "
                      f"{what}, {info.size_bytes:,} bytes.")
        if info.metrics.get("note"):   # what the method wants the person to know (masks.py, ...)
            console.print(f"[yellow]Note:[/] {escape(str(info.metrics['note']))}", highlight=False)


@app.command("list")
@handled
def list_(as_json: bool = JSON) -> None:
    """The stored concepts: method, class, size on disk, neurons, overlap."""
    with client() as c:
        concepts = c.concepts()
    if as_json:
        print_json(concepts)
        return
    console.print(concepts_table(concepts))
    for line in concept_problems(concepts):
        err_console.print(line, highlight=False, markup=False)


@app.command()
@handled
def show(name: str = CONCEPT, as_json: bool = JSON) -> None:
    """One concept in detail."""
    with client() as c:
        info = c.concept(name)
    print_json(info) if as_json else console.print(concept_table(info))


@app.command()
@handled
def rm(name: str = CONCEPT, no_wait: bool = typer.Option(False, "--no-wait", help="Queue the removal and return at once."),
       photos: bool = typer.Option(False, "--photos", help=(
           "Also delete its photos from the archive (those no other concept or queued learn uses); without "
           "them it cannot be learned again from the archive."))) -> None:
    """Remove a concept (its weights come off the model, its record out of the store)."""
    with client() as c:
        job = c.remove(name, photos)
        if no_wait:
            console.print(f"Queued job {job.id}: {escape(shorten(job.summary))}")
            return
        job = wait_for(c, job, quiet=True)
    m = job.result.metrics if job.result and job.result.metrics else {}
    deleted, kept = m.get("photos_deleted"), m.get("photos_kept")
    said = "" if deleted is None else f" and {deleted} archived photo{'s' if deleted != 1 else ''}" + (
        f" ({kept} kept: another concept or a queued learn uses {'them' if kept != 1 else 'it'})" if kept else "")
    console.print(f"Removed <{name}>{said}.")


@app.command("prune-photos")
@handled
def prune_photos() -> None:
    """Delete the archived photos no concept or queued learn uses.

    Photos a plain `cones rm` kept (to learn the concept again) go. Those of concepts a salvage
    could not copy stay until each is learned again or let go with `cones rm NAME --photos`."""
    with client() as c:
        done = c.prune_photos()
    console.print(f"Deleted {done.deleted} archived photo{'s' if done.deleted != 1 else ''}; "
                  f"{done.kept} in use kept.")


@app.command()
@handled
def export(name: str = CONCEPT,
           output: str = typer.Option(..., "-o", "--output", help=(
               "File to write (.safetensors), or a folder for NAME.safetensors: one that exists, "
               "or a path ending in / (made if missing).")),
           force: bool = typer.Option(False, "--force", help="Overwrite a file that exists.")) -> None:
    """Write a concept to one safetensors file (with its metadata)."""
    target = _export_target(name, output)
    if target.exists() and not force:
        raise Conflict(f"{target} already exists.", "Give -o another path, or add --force to overwrite it.")
    with client() as c:
        data = c.export(name)
    output_folder(target.parent)   # a new folder only once there is something to put in it
    write_file(target, data, "Give -o a writable file path; an earlier file there is kept as it was.",
               mode=0o600)   # a concept can draw a person: private as the data folder is
    console.print(f"Wrote <{name}> to {escape(str(target))} ({len(data):,} bytes).", highlight=False)


@app.command("import")
@handled
def import_(file: Path = typer.Argument(..., help="A concept file `cones export` wrote (.safetensors)."),
            name: Optional[str] = typer.Option(None, "--name", help="Store it under this name instead of its own.")) -> None:
    """Add a concept from an exported file (refused if made on another base model)."""
    if name is not None:
        validate_new_name(name)
    if not str(file).strip() or str(file) == ".":   # typer turns "" into "."
        raise BadInput("No file given (a blank path, or '.', the current folder).",
                       "Give the exported .safetensors file: cones import FILE.")
    if file.is_dir():
        raise BadInput(f"{file} is a folder.", "Give the exported .safetensors file itself.")
    if not file.is_file():
        raise BadInput(f"No such file: {file}.", "Check the path of the exported .safetensors file.")
    try:
        with client() as c:
            job = wait_for(c, c.import_file(file.read_bytes(), name), quiet=True)
    except BadInput as exc:   # the service saw bytes: which file they were is said here
        raise BadInput(f"{file}: {exc.message}", exc.hint) from None
    console.print(f"Imported <{job.result.concept if job.result else '?'}>.", highlight=False)
    if job.result and job.result.metrics and job.result.metrics.get("note"):
        console.print(f"[yellow]Note:[/] {escape(str(job.result.metrics['note']))}", highlight=False)


# ---------------------------------------------------------------- generation


@app.command()
@handled
def generate(prompt: str = typer.Argument(..., help="Prompt; name concepts as <name>."),
             n: int = typer.Option(1, "-n", help=f"Number of images (1-{MAX_IMAGES})."),
             seed: Optional[int] = typer.Option(
                 None, help=f"Seed of the first image, 0 to {MAX_SEED}; image k is drawn from seed + k "
                 "(default: random)."),
             steps: Optional[int] = typer.Option(None, help="Denoising steps, 2 to 999 (default: the model's, 30 unless its cones.json says; the toy world's 20)."),
             box: List[str] = typer.Option([], "--box", help="NAME=x0,y0,x1,y1 (fractions); repeatable."),
             negative: Optional[str] = typer.Option(None, "--negative", help="What to steer away from, in plain words."),
             guidance_scale: Optional[float] = typer.Option(
                 None, "--guidance-scale", "--cfg",
                 help=f"Classifier-free guidance, 1 to {MAX_GUIDANCE_SCALE:g} (default: the model's; 1 turns it off)."),
             width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the model's)."),
             height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the model's)."),
             out: Optional[Path] = typer.Option(None, "-o", "--out", help="Copy the PNGs into this folder."),
             as_json: bool = JSON) -> None:
    """Generate images; writes PNGs and a contact sheet and prints their paths (the sheet last)."""
    # as a blank one is told by the service ("" failed as "prompt: empty", from the protocol)
    from cns_daemon.prompts import blank_negative, empty_prompt

    if not prompt.strip():
        raise empty_prompt()
    if negative is not None and not negative.strip():
        raise blank_negative()
    req = _model(GenerateRequest, prompt=prompt, n=n, seed=seed, steps=steps, boxes=box,
                 negative_prompt=negative, guidance_scale=guidance_scale, width=width, height=height)
    if out is not None:
        out = out.expanduser().absolute()   # the paths printed (and in --json) work from anywhere
        if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and not out.exists():
            raise BadInput(f"-o {out} names a file, but generate writes its images and a contact "
                           "sheet into a folder.", f"Give -o a folder, e.g. -o {out.with_suffix('')}/")
        made = not out.exists()
        output_folder(out, "images")   # before the job: a bad -o must not cost a generation
    with client() as c:
        left = f"; its images stay in the service's outputs, not copied to {out}" if out else ""
        try:
            job = wait_for(c, c.generate(req), quiet=as_json, tell_wait=not as_json, left_behind=left)
        except ConesError:
            if out is not None and made:   # made for this generate, and nothing came: not left empty
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
    result = job.result
    if result is None:
        raise BadInput("The job finished without images.")
    if out is not None:
        # Named after the job, so a second run into the same folder adds its images beside the
        # first's instead of replacing some of them under a contact sheet that no longer fits.
        def keep(p: str) -> str:
            target = out / f"{job.id}-{Path(p).name}"
            write_file(target, Path(p).read_bytes(),
                       f"The images are in {Path(p).parent}; free space or give -o a writable folder.",
                       mode=Path(p).stat().st_mode & 0o777)   # as private as the service keeps them
            return str(target)

        copied: list[str] = []
        try:
            for p in result.images + ([result.contact_sheet] if result.contact_sheet else []):
                copied.append(keep(p))
        except ConesError:   # all or nothing: a full disk must not leave half the images
            for done in copied:
                Path(done).unlink(missing_ok=True)
            if made:   # nor the folder made for them
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        sheet = copied.pop() if result.contact_sheet else None
        job = job.model_copy(update={"result": result.model_copy(update={"images": copied, "contact_sheet": sheet})})
        result = job.result
    if as_json:
        print_json(job)
        return
    if result.seed is not None:
        seeds = f"seed {result.seed}" if len(result.images) == 1 else (
            f"seeds {result.seed}-{result.seed + len(result.images) - 1}, one per image in order")
        err_console.print(f"{seeds}; the contact sheet is the last line", highlight=False)
    for p in result.images:
        console.print(p, highlight=False, markup=False)   # a path, as written ("shots[red]/")
    if result.contact_sheet:   # last, alone on its line: `cones generate ... | tail -1` opens it
        console.print(result.contact_sheet, highlight=False, markup=False)


@app.command("eval")
@handled
def eval_(names: List[str] = typer.Argument(..., help="Concepts to score (all of them in every prompt)."),
          prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file, one a line; `{}` marks the concepts (default: the shipped list)."),
          n: int = typer.Option(4, "-n", help=f"Images per prompt (1-{MAX_IMAGES})."),
          clip: str = typer.Option("ViT-L-14", "--clip", help="open_clip model name."),
          clip_weights: Optional[str] = typer.Option(None, "--clip-weights", help="Weights file, transformers CLIP folder, or open_clip pretrained tag."),
          seed: int = typer.Option(0, help=f"Seed of each prompt's first image, 0 to {MAX_SEED}."),
          steps: Optional[int] = typer.Option(None, help="Denoising steps, 2 to 999 (default: the model's)."),
          as_json: bool = JSON) -> None:
    """Score concepts with CLIP-I (likeness to their photos) and CLIP-T (prompt fidelity)."""
    lines = _prompt_lines(prompts) if prompts is not None else None
    if clip_weights is not None and (Path(clip_weights).expanduser().exists() or "/" in clip_weights):
        # a path, not an open_clip tag: the service has its own working folder, so send it whole
        clip_weights = str(Path(clip_weights).expanduser().absolute())
    req = _model(EvalRequest, names=names, prompts=lines, n=n, clip=clip, clip_weights=clip_weights,
                 seed=seed, steps=steps)
    with client() as c:
        job = wait_for(c, c.evaluate(req), quiet=as_json, tell_wait=not as_json)
    if job.result is None or job.result.metrics is None:
        raise BadInput("The job finished without scores.")
    if as_json:
        print(json.dumps({"names": names, **job.result.metrics}, indent=2))
        return
    console.print(eval_table(names, job.result.metrics))


def _export_target(name: str, output: str) -> Path:
    """Where `cones export -o OUTPUT` writes: OUTPUT itself, or OUTPUT/NAME.safetensors when it
    is a folder or says it is one (a trailing slash, which pathlib would drop)."""
    if not output.strip():   # "" was the current folder, written into without a word
        raise BadInput("-o is empty.", "Give -o a file path (NAME.safetensors) or a folder.")
    path = Path(output)
    if output.endswith(("/", os.sep)) or path.is_dir():
        if path.exists() and not path.is_dir():
            raise BadInput(f"{path} is a file, not a folder.", "Give -o a file path, or a folder.")
        return path / f"{name}.safetensors"
    if not path.parent.is_dir():
        raise BadInput(f"The folder {path.parent} does not exist.",
                       "Create it first, give -o a file in an existing folder, or end -o with / for a new folder.")
    return path


def _prompt_lines(path: Path) -> list[str]:
    """One prompt a line; blank lines and # comments are skipped (as in the shipped list)."""
    if not path.is_file():
        raise BadInput(f"No prompt file at {path}.", "Give a text file with one prompt per line; "
                       "`{}` marks where the concepts go.")
    lines = [ln.strip() for ln in read_text(path, f"The prompt file {path}").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise BadInput(f"The prompt file {path} has no prompts.", "Write one prompt per line.")
    return lines


# ---------------------------------------------------------------- jobs


@app.command()
@handled
def jobs(limit: int = typer.Option(20, min=1, max=MAX_JOBS_LISTED, help="How many (newest first)."),
         as_json: bool = JSON) -> None:
    """Recent jobs and their state."""
    with client() as c:
        items = c.jobs(limit)
    print_json(items) if as_json else console.print(jobs_table(items))


@app.command()
@handled
def cancel(job_id: str = typer.Argument(..., help="The job's id, as `cones jobs` lists it.")) -> None:
    """Cancel a job (a running one stops at its next step; nothing partial is kept)."""
    job_id = job_id.strip().lower()   # ids are hex: 142AADC707EA is the same job
    with client() as c:
        try:
            before = c.job(job_id)
        except Corrupt:   # a damaged record: the service removes it when asked to cancel it
            c.cancel(job_id)
            raise
        if before.state not in ("queued", "running"):
            raise Conflict(f"Job {before.id} ({shorten(before.summary)}) has already finished: "
                           f"{before.state}.", "Nothing to cancel; `cones jobs` lists the jobs still queued or running.")
        job = c.cancel(job_id)
    if job.state == "cancelled":
        console.print(f"Cancelled job {job.id} ({escape(shorten(job.summary))}) before it started.")
    elif job.state == "running":
        console.print(f"Cancelling job {job.id} ({escape(shorten(job.summary))}): it stops at its next step.")
    else:   # it finished between the two calls
        console.print(f"Job {job.id} ({escape(shorten(job.summary))}) finished before the cancel "
                      f"reached it: {job.state}.")


# ---------------------------------------------------------------- demo


@app.command()
@handled
def demo(model: Optional[str] = typer.Option(None, help="Model for a temporary service (default: the toy world)."),
         method: Optional[str] = typer.Option(None, help="cns (default) | cones | cones2"),
         steps: Optional[int] = typer.Option(None, help="Training steps per concept (default: the method's)."),
         images: int = typer.Option(4, help="Images per generation."),
         seed: int = typer.Option(0, help="Seed for photos and generations."),
         sample_steps: Optional[int] = typer.Option(None, help="Denoising steps per generation.")) -> None:
    """Offline tour: learn two toy-world concepts, generate with them, in boxes, and without.

    One concept comes through the inbox, one through `cones add`; the probe's verdict and the
    contact sheets' paths are printed."""
    from cli import demo as tour

    tour.run(tour.Options(model=model, method=method, steps=steps, images=images, seed=seed,
                          sample_steps=sample_steps))


# ---------------------------------------------------------------- misc


@app.command()
def version() -> None:
    """Print the installed version (also: cones --version)."""
    typer.echo(_installed_version())


def _options(texts: list[str]) -> dict:
    """Every --option KEY=VALUE; a key given twice is refused (the last one won without a word,
    where an inbox folder's concept.toml refuses it)."""
    options: dict = {}
    for text in texts:
        key, value = _option(text)
        if key in options:
            raise BadInput(f"Option {key!r} is given twice ({options[key]!r} and {value!r}).",
                           "Give each option once.")
        options[key] = value
    return options


def _option(text: str) -> tuple[str, bool | int | float | str]:
    """KEY=VALUE with the value read as a bool, whole number, number or text, in that order."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"Malformed option {text!r}.", "Write options as KEY=VALUE, e.g. --option top_p=5.")
    raw = raw.strip()
    if raw.lower() in ("true", "false"):
        return key.strip(), raw.lower() == "true"
    for kind in (int, float) if "_" not in raw else ():   # "1_0" is Python's 10, no one else's
        try:
            value = kind(raw)
        except ValueError:
            continue
        if value != value or value in (float("inf"), float("-inf")):
            raise BadInput(f"Option {key.strip()!r} must be a finite number, not {raw!r}.")
        return key.strip(), value
    return key.strip(), raw


# A request field as the person gave it: the flag or argument (not "class_word" or "guidance_scale")
ARGUMENTS = {"class_word": "--class", "method": "--method", "steps": "--steps", "seed": "--seed",
             "options": "--option", "n": "-n", "boxes": "--box", "negative_prompt": "--negative",
             "guidance_scale": "--cfg", "width": "--width", "height": "--height", "clip": "--clip",
             "clip_weights": "--clip-weights", "prompts": "--prompts", "name": "NAME", "names": "NAMES",
             "prompt": "PROMPT", "photos": "PHOTOS"}


def _model(model, **fields):
    """Build a request model; a bad value becomes BadInput naming the flag it came from."""
    from pydantic import ValidationError

    from cns_daemon.api.protocol import describe_validation_error

    try:
        return model(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise BadInput(f"Invalid value: {describe_validation_error(exc, ARGUMENTS)}.") from None


def main() -> None:
    """The `cones` command: the typer app, except that a command line it cannot parse, given
    with --json, also prints the error document on stdout (as every other failure does)."""
    try:   # typer 0.2x carries its own click; older ones use click itself
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)
    except click_errors.ClickException as exc:
        try:
            from typer import rich_utils
            rich_utils.rich_format_error(exc)   # the usage box typer prints by itself
        except (ImportError, AttributeError):
            exc.show()
        if "--json" in sys.argv[1:]:
            body = ErrorBody(code="bad_input", message=exc.format_message(),
                             hint=f"`{this_command(getattr(exc, 'ctx', None))} --help` shows what it takes.")
            print(json.dumps({"error": body.model_dump()}, indent=2))
        sys.exit(exc.exit_code)
    except typer.Abort:   # input ended (EOF) where a command read it; Ctrl-C is Exit(130) already
        print("Aborted.", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
