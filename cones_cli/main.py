"""`cones` entry point: a thin client of the service's socket API.

This module must never import torch (the CLI starts in a blink and runs where the model does
not): it imports only the protocol, settings and errors from cns_daemon, plus httpx/typer/rich.
`cones serve` and `cones demo` import the daemon lazily inside the command.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from cones_cli.admin import service_app, store_app
from cones_cli.config import CONCEPT, JSON, config_file, settings
from cones_cli.generation import eval_, generate
from cones_cli.session import client, request, wait_for
from cones_cli.toyworld import toyworld_app
from cones_cli.views import (click_errors, concept_problems, concept_table, concepts_table, console, err_console,
                       damaged_jobs_lines, handled, images_line, jobs_table, output_folder, print_json, shorten, status_table,
                       remove_made, this_command, write_file)
from cns_daemon.api.errors import BadInput, BadPhoto, Conflict, ConesError, Corrupt
from cns_daemon.api.names import METHODS, validate_new_name
from cns_daemon.archive import ACCEPTED_FORMATS, byte_copies, caption_file, shown, sidecar_caption, sniff
from cns_daemon.api.protocol import (MAX_IMAGES, MAX_JOBS_LISTED, MAX_LEARN_STEPS, MAX_PROMPT_CHARS, MAX_SEED,
                                     MAX_PHOTOS, ErrorBody,
                                     STOPPED_MIDWAY, TOO_MANY_HINT, AddRequest, Photo, too_many_photos)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

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
        steps: Optional[int] = typer.Option(None, help="Training steps; for Cones its selection walk's "
                                            "(its values train --option tune_steps=N). Default: CONES_STEPS or "
                                            "config.toml's `steps` where this command runs, else the "
                                            "service's; the method's own unless set."),
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
    # Copies of one photo count once, as the service and the inbox count them (found once read);
    # files past any such count are not read at all.
    if len(photos) > COPIES_READ * MAX_PHOTOS:
        raise BadInput(too_many_photos(name, len(photos)), TOO_MANY_HINT)
    items, not_photos = [], []
    for p in photos:
        if p.is_dir():
            raise BadInput(f"{p} is a directory, not a photo.", f"Give the photos in it, e.g. {p}/{_photo_glob(p)}.")
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
        items.append(request(Photo, filename=shown(p.name), data=p.read_bytes(), caption=caption))
    copies = byte_copies([(i.filename, i.data) for i in items])   # skipped here, as the service would
    not_photos += [c for c in copies if c is not None]
    items = [i for i, c in zip(items, copies) if c is None]
    if len(items) > MAX_PHOTOS:
        raise BadInput(too_many_photos(name, len(items)), TOO_MANY_HINT)
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
    req = request(AddRequest, name=name, class_word=class_word, method=method, steps=steps,
                  seed=seed, photos=items, options=options, skipped=not_photos[:MAX_PHOTOS])
    with client() as c:
        job = c.add(req)
        for s in job.skipped[len(not_photos[:MAX_PHOTOS]):]:   # the service's own (ours were said above)
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


def _photo_glob(folder: Path) -> str:
    """A pattern for the photos in `folder`: its commonest picture suffix ("*.png" for a folder
    of PNGs; "*.jpg" was said of every folder)."""
    try:
        known = set(ACCEPTED_FORMATS.values()) | {".jpeg", ".tiff"}
        suffixes = Counter(f.suffix for f in folder.iterdir() if f.suffix.lower() in known and f.is_file())
    except OSError:
        suffixes = Counter()
    return f"*{suffixes.most_common(1)[0][0]}" if suffixes else "*.jpg"


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
        learned = None if photos else _concept_or_none(c, name)   # to say how to learn it again
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
    left = job.result.photos if job.result else []   # (a plain rm's: in the archive still)
    if left:
        from cones_cli.admin import relearn_command

        with_ = dict(learned.learned_with) if learned else {}
        flags = {"method": learned.method if learned else None, "steps": with_.pop("steps", None),
                 "seed": with_.pop("seed", None)}
        many = len(left) != 1
        console.print(f"Its {len(left)} photo{'s stay' if many else ' stays'} in the archive (`cones "
                      f"prune-photos` deletes {'those' if many else 'it, if'} no other concept uses"
                      f"{'' if many else ' it'}); " + relearn_command(
                          name, left, learned.class_word if learned else "", flags, with_),
                      markup=False, highlight=False, soft_wrap=True)


def _concept_or_none(c, name: str):
    """What `cones show` says of it; of a damaged one, what its `cones list` row still says (its
    class and method); None where neither answers (the removal then says why)."""
    try:
        return c.concept(name)
    except ConesError:
        pass
    try:
        return next((row for row in c.concepts() if row.name == name and row.class_word), None)
    except ConesError:
        return None


@app.command("prune-photos")
@handled
def prune_photos() -> None:
    """Delete the archived photos no concept or queued learn uses.

    Photos a plain `cones rm` kept (to learn the concept again) go. Those of concepts a salvage could not copy stay until each is learned again or let go with `cones rm NAME --photos`."""   # (one line: the help keeps a paragraph's line breaks)
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
    made = output_folder(target.parent)   # a new folder only once there is something to put in it
    try:
        write_file(target, data, "Give -o a writable file path; an earlier file there is kept as it was.",
                   mode=0o600)   # a concept can draw a person: private as the data folder is
    except ConesError:
        remove_made(made)
        raise
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
    _check_concept_file(file)
    try:
        with client() as c:
            job = wait_for(c, c.import_file(file.read_bytes(), name), quiet=True)
    except BadInput as exc:   # the service saw bytes: which file they were is said here
        raise BadInput(f"{file}: {exc.message}", exc.hint) from None
    console.print(f"Imported <{job.result.concept if job.result else '?'}>.", highlight=False)
    if job.result and job.result.metrics and job.result.metrics.get("note"):
        console.print(f"[yellow]Note:[/] {escape(str(job.result.metrics['note']))}", highlight=False)


def _check_concept_file(file: Path) -> None:
    """Its header before the file is read whole and sent: a checkpoint or LoRA given by mistake
    (gigabytes) was read into memory, sent, and refused as too large a request."""
    from cns_daemon.api import concept_file

    with open(file, "rb") as f:
        head = f.read(8)
        try:
            head += f.read(concept_file.header_length(head) - 8)
            concept_file.check_format(concept_file.metadata(head))
        except Exception as exc:   # noqa: BLE001 - a short file, bad JSON, another format: refused
            refused = concept_file.refusal(exc)
            raise BadInput(f"{file}: {refused.message}", refused.hint) from None


def _export_target(name: str, output: str) -> Path:
    """Where `cones export -o OUTPUT` writes: OUTPUT itself, or OUTPUT/NAME.safetensors when it
    is a folder or says it is one (a trailing slash, which pathlib would drop)."""
    if not output.strip():   # "" was the current folder, written into without a word
        raise BadInput("-o is empty.", "Give -o a file path (NAME.safetensors) or a folder.")
    path = Path(output).expanduser()   # `--output=~/x`: no shell expands that `~`
    if output.endswith(("/", os.sep)) or path.is_dir():
        if path.exists() and not path.is_dir():
            raise BadInput(f"{path} is a file, not a folder.", "Give -o a file path, or a folder.")
        return path / f"{name}.safetensors"
    if not path.parent.is_dir():
        raise BadInput(f"The folder {path.parent} does not exist.",
                       "Create it first, give -o a file in an existing folder, or end -o with / for a new folder.")
    return path


# ---------------------------------------------------------------- generation (cones_cli/generation.py)

app.command()(generate)
app.command("eval")(eval_)


# ---------------------------------------------------------------- jobs


@app.command()
@handled
def jobs(limit: int = typer.Option(20, min=1, max=MAX_JOBS_LISTED, help="How many (newest first)."),
         as_json: bool = JSON) -> None:
    """Recent jobs and their state."""
    with client() as c:
        listed = c.job_list(limit)
    items = listed.jobs
    for line in damaged_jobs_lines(listed.damaged):   # (on stderr: --json's document stays the list)
        err_console.print(line, highlight=False, markup=False)
    if as_json:
        print_json(items)
        return
    console.print(jobs_table(items))
    if (where := images_line(items)) is not None:
        console.print(where, highlight=False, markup=False)
    failed = next((j for j in items if j.state == "failed" and j.error and j.error.hint), None)
    if failed is not None:   # the table has room for what went wrong, not for what to do
        err_console.print(f"job {failed.id} failed: {failed.error.hint}", highlight=False, markup=False)


@app.command()
@handled
def cancel(job_id: str = typer.Argument(..., help="The job's id, as `cones jobs` lists it.")) -> None:
    """Cancel a job (a running learn, generate or eval stops at its next step; nothing partial is kept)."""
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
    if job.state == "cancelled" and before.state == "queued":
        console.print(f"Cancelled job {job.id} ({escape(shorten(job.summary))}) before it started.")
    elif job.state == "running" and job.kind not in STOPPED_MIDWAY:
        console.print(f"Job {job.id} ({escape(shorten(job.summary))}) is already under way and is not "
                      "stopped midway: it ends in a moment (`cones jobs` shows how).")
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
         steps: Optional[int] = typer.Option(None, min=1, max=MAX_LEARN_STEPS, help="Training steps per concept (default: the method's)."),
         images: int = typer.Option(4, min=1, max=MAX_IMAGES, help="Images per generation."),
         seed: int = typer.Option(0, min=0, max=MAX_SEED - MAX_IMAGES, help="Seed for photos and generations."),
         sample_steps: Optional[int] = typer.Option(None, min=2, max=999, help="Denoising steps per generation (default: the model's).")) -> None:
    """Offline tour: learn two toy-world concepts, generate with them, in boxes, and without.

    One concept comes through the inbox, one through `cones add`; prints the probe's verdict and the contact sheets' paths.
    """
    from cones_cli import demo as tour

    if method is not None and method not in METHODS:   # (it failed 12 s in, naming a concept.toml)
        raise BadInput(f"Unknown method {method!r}.", f"Use one of: {', '.join(METHODS)}.")
    tour.run(tour.Options(model=model, method=method, steps=steps, images=images, seed=seed,
                          sample_steps=sample_steps))


# ---------------------------------------------------------------- misc


@app.command()
def version() -> None:
    """Print the installed version (also: cones --version)."""
    typer.echo(_installed_version())


COPIES_READ = 4   # files given per photo taken that `cones add` reads before refusing them all


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


NARROW_HELP_COLUMNS = 80


def _plain_help_when_narrow() -> None:
    """Below 80 columns rich's boxed help cut option names and values ("--meth…",
    "42949672…", the `--cfg` alias gone); click's plain help wraps them whole there (at 50
    columns at least: narrower, it split words, so the terminal wraps its lines)."""
    width = os.environ.get("TERMINAL_WIDTH", "")   # what typer's rich help sizes itself by, where set
    columns = int(width) if width.isdigit() else shutil.get_terminal_size().columns
    if columns < NARROW_HELP_COLUMNS:
        for typer_app in (app, service_app, store_app, toyworld_app):
            typer_app.rich_markup_mode = None


def main() -> None:
    """The `cones` command: the typer app, except that a command line it cannot parse, given
    with --json, also prints the error document on stdout (as every other failure does)."""
    _plain_help_when_narrow()
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
