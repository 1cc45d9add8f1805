"""How the CLI shows things: rich tables, a progress bar for a followed job, JSON for scripts."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable

import typer
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from cns_daemon.api.errors import BadInput, ConesError, Internal, Interrupted, Storage, from_code, storage_error
from cns_daemon.archive import atomic_write
from cns_daemon.api.protocol import (FINAL_STATES, PAUSED_FOR, STREAM_STOPPING, ConceptInfo, ErrorBody, JobInfo,
                                     ProgressInfo, StatusInfo)

class _Console(Console):
    """Rich ends a print to a pipe whose reader went away with exit 1 (`cones jobs | head`): the
    BrokenPipeError goes to `handled` instead, which exits 141 as the README says."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


console = _Console(soft_wrap=True)   # paths must stay whole for copy and paste
err_console = _Console(stderr=True, soft_wrap=True)   # so must those in errors


def print_json(doc: BaseModel | list[BaseModel]) -> None:
    """One JSON document on stdout (no rich markup, no wrapping). A path whose name is not
    UTF-8 (`-o` into such a folder) is written as the CLI shows it ("out-\\xff"): JSON holds
    text only, and the dump failed on it after the images were copied."""
    if isinstance(doc, list):
        text = json.dumps([_as_text(d.model_dump(mode="json")) for d in doc], indent=2)
    else:
        try:
            text = doc.model_dump_json(indent=2)
        except PydanticSerializationError:   # such a path
            text = json.dumps(_as_text(doc.model_dump(mode="json")), indent=2)
    print(text)


def _as_text(value):
    """`value` with every string's undecodable bytes (surrogate escapes) written as \\xNN."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_as_text(k): _as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_text(v) for v in value]
    return value


def print_error(exc: ConesError) -> None:
    # Escaped: messages quote user input and commands such as pip install 'cones[eval]', whose
    # brackets rich would otherwise take for markup and drop.
    err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
    if exc.hint:
        err_console.print(f"[dim]{escape(exc.hint)}[/]", highlight=False)


try:   # typer 0.2x carries its own click; older ones use click itself
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors


def this_command(ctx=None) -> str:
    """The command being run, as a person types it ("cones add"), for hints that say where its
    help is; "cones COMMAND" outside one."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:   # typer versions that use click itself
        from click import get_current_context
    ctx = ctx or get_current_context(silent=True)
    words = ctx.command_path.split()[1:] if ctx is not None else ["COMMAND"]
    return " ".join(["cones", *words]) if words else "cones"


def _named(hint: str) -> str:
    """A generic hint ("`cones COMMAND --help` shows ...") naming the command it was given in."""
    return hint.replace("cones COMMAND", this_command()) if "cones COMMAND" in hint else hint


def output_folder(path: Path, what: str = "files") -> list[Path]:
    """A folder for -o, made if missing; a file in the way or a place it cannot be made is a
    typed error (one line and exit 2, not a traceback). Returns the folders it made, innermost
    first (for `remove_made`)."""
    if path.exists() and not path.is_dir():
        raise BadInput(f"{path} is a file, not a folder.", f"Give -o a folder for the {what}.")
    made = [p for p in (path, *path.parents) if not p.exists()]   # innermost first
    probe = path / f".cones-write-test-{uuid.uuid4().hex}"   # read-only or full: said now
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        # nothing left of the try: the probe (made empty on a full disk) nor the folders
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        remove_made(made)
        known = storage_error(exc)
        raise (Storage(f"Cannot write into the folder {path}: {exc.strerror}.", "Give -o a folder "
                       "you can write to, on a disk with room.") if known else
               BadInput(f"Cannot write into the folder {path}: {exc.strerror or exc}.",
                        "Give -o a folder you can write to.")) from None
    return made


def remove_made(folders: Iterable[Path]) -> None:
    """Take back the folders `output_folder` made (innermost first) where nothing came into
    them: `-o deep/a/b` of a refused job left deep/a."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:   # not empty (something of another's came in) or gone: the rest stay
            return


def write_file(path: Path, data: bytes, hint: str = "Give -o a writable place.",
               mode: int = 0o666) -> None:
    """`archive.atomic_write` for the person's own paths (a full disk leaves neither a cut file
    nor a lost earlier one), its failures typed: `mode` as open(2) takes it (the umask applies)."""
    try:
        atomic_write(path, data, mode)
    except OSError as exc:
        kind = Storage if storage_error(exc) else BadInput
        raise kind(f"Cannot write {path}: {exc.strerror or exc}.", hint) from None


def write_files(files: Iterable[tuple[Path, bytes, int]], hint: str, made: Iterable[Path] = ()) -> list[Path]:
    """`write_file` for each (path, data, mode), all or none: a full disk leaves neither the
    files written before it nor `made`, the folders made for them. Returns the paths written."""
    written: list[Path] = []
    try:
        for path, data, mode in files:
            write_file(path, data, hint, mode)
            written.append(path)
    except BaseException:   # a full disk, a source that cannot be read, Ctrl-C: none
        for path in written:
            path.unlink(missing_ok=True)
        remove_made(made)   # (the write's error is the one to tell)
        raise
    return written


EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, as a shell reports a command whose reader went away


def handled(fn):
    """Typed errors become one red line + hint on stderr and their exit code; a command run with
    --json also prints the error as its one document on stdout ({"error": ErrorBody}), so a
    script reading stdout gets JSON either way."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:   # exit 130, as the README says (click's Abort exited 1)
                raise Interrupted("Interrupted.", "Run the command again to go on.") from None
            except BrokenPipeError:   # `cones jobs --json | head`: the reader has all it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no flush error at exit
                raise typer.Exit(EXIT_BROKEN_PIPE) from None
            except OSError as exc:   # a file of the person's that cannot be read: no traceback
                where = exc.filename2 or exc.filename
                if where and os.path.isfile(where) and not os.access(where, os.R_OK):
                    raise BadInput(f"Cannot read {where}: {exc.strerror or exc}.",   # an input
                                   "Check that you may read it (its permissions).") from None  # (exit 2)
                raise storage_error(exc) or BadInput(
                    f"Cannot use {where}: {exc.strerror or exc}." if where else f"{exc.strerror or exc}.",
                    "Check the path and that you may read (and write) it.") from None
            except (ConesError, click_errors.Exit, click_errors.ClickException, click_errors.Abort):
                raise
            except Exception as exc:   # a bug: exit 70 (and the --json document), as the README says
                import traceback

                trace = "".join(traceback.format_exception(exc))
                err_console.print(escape(trace.rstrip()), highlight=False, style="dim")
                raise Internal(f"{type(exc).__name__}: {exc}", "This is a bug in cones; please report it "
                               "with the lines above.") from None
        except ConesError as exc:
            exc.hint = _named(exc.hint or "")
            try:
                print_error(exc)
                if kwargs.get("as_json"):
                    body = ErrorBody(code=exc.code.value, message=exc.message, hint=exc.hint or "")
                    print(json.dumps({"error": body.model_dump()}, indent=2))
            except BrokenPipeError:   # `cones show nope --json | true`: the error's code, not click's 1
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(exc.exit_code) from None
    return wrapper


def human_size(n: int) -> str:
    """Decimal units, as `cones add` and `export` print bytes (50,002 bytes is 50.0 kB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def neurons_text(c: ConceptInfo) -> str:
    """Its neurons, or "-" for Cones 2, which learns a residual embedding and no neurons ("0"
    read as nothing learned)."""
    return "-" if c.method == "cones2" else f"{c.neurons:,}"


def overlap_text(overlap: dict[str, int]) -> str:
    """Every concept it shares neurons with, most shared first (`cones show`)."""
    return ", ".join(f"{k}: {v:,}" for k, v in _by_share(overlap)) or "-"


def overlap_summary(overlap: dict[str, int]) -> str:
    """The one it shares most with, and how many more (`cones list`: a column listing every
    earlier concept grew with the square of their number, and 80 columns split its numbers)."""
    ranked = _by_share(overlap)
    if not ranked:
        return "-"
    (name, count), more = ranked[0], len(ranked) - 1
    return f"{name}: {count:,}" + (f" (+{more})" if more else "")


def _by_share(overlap: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0]))


def metric_text(value) -> str:
    """A metric for a rich table: floats to 4 digits, text (a note may name a file) escaped."""
    return f"{value:.4g}" if isinstance(value, float) else escape(str(value))


def _when(t: float | None) -> str:
    """A local date and time; "-" for none, or one no calendar holds (a file edited by hand)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"
    except (OverflowError, OSError, ValueError):
        return "-"


def duration(s: float) -> str:
    """How long, as a person reads it: "3 d 4 h", "5 min 2 s" (uptime was "259200 s")."""
    s = int(s)
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "min"), (s % 60, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), len(parts) - 1)
    return " ".join(f"{n} {unit}" for n, unit in parts[first:first + 2])


def ago(t: float | None) -> str:
    if t is None:
        return "-"
    s = max(0.0, time.time() - t)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


class Records:
    """A table where the terminal is wide enough for it, else one block a row: its first cell
    on a line, then "  column: value" lines, each whole (at 40-60 columns the tables cut job
    states to "runn…", emptied the class and created cells and folded "square" to "squar/e").
    Decided at print time, from the width the console gives it."""

    def __init__(self, table: Table, min_width: int, keyed: bool = True):
        # keyed: the first cell names the row (a job id, a concept name) and heads its block;
        # else (a row of scores) it is labelled like the others
        self.table, self.min_width, self.keyed = table, min_width, keyed

    def __rich_console__(self, console, options):
        if options.max_width >= self.min_width:
            yield self.table
            return
        if self.table.title:
            yield Text(str(self.table.title), style="bold")
        headers = [str(c.header) for c in self.table.columns]
        for row in zip(*(list(c.cells) for c in self.table.columns)):
            yield Text("")
            if self.keyed:
                yield Text.assemble(_text(row[0]), style="bold")
            for header, cell in list(zip(headers, row))[self.keyed:]:
                if (text := _text(cell)).plain not in ("", "-"):
                    yield Text.assemble(f"  {header}: ", text)


def _text(cell) -> Text:
    """A table cell as text: a string cell is markup (escaped where it holds the person's text)."""
    return cell if isinstance(cell, Text) else Text.from_markup(str(cell))


STATE_LABELS = {"ok": "[green]ok[/]", "damaged": "[red]damaged[/]",
                "not_rebuilt": "[yellow]not rebuilt[/]"}


CONCEPTS_MIN_WIDTH = 72   # below, `cones list` prints a block a concept (Records); 8 more with its state column
JOBS_MIN_WIDTH = 80
EVAL_MIN_WIDTH = 60


def concepts_table(concepts: Iterable[ConceptInfo]) -> Records:
    concepts = list(concepts)
    table = Table(title="Concepts")
    # At 80 columns eight columns squeezed alike broke names every 8 letters: the state column
    # shows only when a concept is not ok (`concept_problems` says why under the table), and
    # the short values keep their line, so the width left goes to names and overlaps.
    columns = ["name", "state", "method", "class", "size", "neurons", "overlap", "created"]
    if all(c.state == "ok" for c in concepts):
        columns.remove("state")
    for col in columns:
        # fold, never cut: a name must stay whole to be copied into a prompt (80 columns, pipes)
        # (and never squeezed to nothing: at 40 columns names vanished)
        table.add_column(col, justify="right" if col in ("size", "neurons") else "left",
                         overflow="fold", no_wrap=col in ("method", "size", "neurons"),
                         min_width=6 if col == "name" else None)
    for c in concepts:
        cells = {"name": c.name, "state": STATE_LABELS.get(c.state, c.state), "method": c.method or "?",
                 "class": c.class_word or "?", "size": human_size(c.size_bytes), "neurons": neurons_text(c),
                 "overlap": overlap_summary(c.overlap), "created": ago(c.created) if c.created else "-"}
        table.add_row(*(cells[col] for col in columns))
    return Records(table, CONCEPTS_MIN_WIDTH + 8 * ("state" in columns))


def concept_problems(concepts: Iterable[ConceptInfo]) -> list[str]:
    """One line per concept that is not ok, then each different hint once."""
    bad = [c for c in concepts if c.state != "ok"]
    lines = [f"<{c.name}> {c.state.replace('_', ' ')}: {c.problem}" for c in bad]
    return lines + list(dict.fromkeys(c.hint for c in bad if c.hint))


def photos_text(c: ConceptInfo) -> str:
    """How many photos it was learned from, and where some are not in this store's archive
    (an imported concept's stayed in the store it came from): `cones eval` needs them."""
    if c.photos_archived is None or c.photos_archived >= c.photos:
        return str(c.photos)
    held = "none" if c.photos_archived == 0 else f"{c.photos_archived}"
    return f"{c.photos} ({held} in this store's photo archive)"


def concept_table(c: ConceptInfo) -> Table:
    table = Table(title=f"<{c.name}>", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = ([("state", f"{STATE_LABELS.get(c.state, c.state)}: {escape(c.problem)} {escape(c.hint)}")]
            if c.state != "ok" else [])
    rows += [("method", c.method or "?"), ("class", c.class_word), ("token", escape(c.token) or "-"),
            ("photos", photos_text(c)), ("size", human_size(c.size_bytes)),
            ("neurons", neurons_text(c)), ("overlap", overlap_text(c.overlap)),
            ("learned with", escape(", ".join(f"{k} {v}" for k, v in c.learned_with.items())) or "-"),
            ("created", _when(c.created)),
            ("fingerprint", c.fingerprint or "-")]
    rows += [(f"metric {escape(k)}", metric_text(v)) for k, v in sorted(c.metrics.items())]
    for k, v in rows:
        table.add_row(k, v)
    return table


def eval_table(names: list[str], metrics: dict) -> Records:
    table = Table(title="CLIP scores of " + ", ".join(f"<{n}>" for n in names))
    for col in ("CLIP-I", "CLIP-T", "images", "prompts", "CLIP model"):
        table.add_column(col, justify="left" if col == "CLIP model" else "right",
                         overflow="fold", no_wrap=col != "CLIP model")
    table.add_row(f"{metrics['clip_i']:.4f}", f"{metrics['clip_t']:.4f}", str(metrics["n_images"]),
                  str(metrics["n_prompts"]), escape(str(metrics.get("clip", "-"))))
    return Records(table, EVAL_MIN_WIDTH, keyed=False)


def jobs_table(jobs: Iterable[JobInfo]) -> Records:
    """At 80 columns the id (12 characters, what `cones cancel` takes) and the short columns stay
    whole; `what` (which starts with the kind) and `note` wrap; narrower, a block a job.
    `--json` has every field."""
    table = Table(title="Jobs (newest first)", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                  pad_edge=False, show_edge=False)
    table.add_column("id", no_wrap=True, min_width=12)
    table.add_column("state", no_wrap=True)
    table.add_column("what", ratio=1, min_width=14, overflow="fold")
    table.add_column("progress", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("note", ratio=1, min_width=14, overflow="fold")
    for j in jobs:
        p = j.progress
        prog = f"{p.phase} {p.step}/{p.total}" if p and p.total else (p.phase if p else "-")
        paused = p.message if p and p.message.startswith(PAUSED_FOR) else ""
        # Prompts, file names and messages are the person's text: printed as written ("[/]" in a
        # prompt was read as markup and failed every `cones jobs` after it)
        note = "; ".join(n for n in (escape(paused), escape(j.note),
                                     escape(j.error.message) if j.error else _result_note(j)) if n)
        table.add_row(j.id, _state(j.state), escape(shorten(j.summary)), prog, ago(j.created), note)
    return Records(table, JOBS_MIN_WIDTH)


def images_line(jobs: Iterable[JobInfo]) -> str | None:
    """Where the listed generates' images are, said once under the table: a path in the note
    column folded over four lines and broke when copied. Each generate's folder ends in its job
    id (`cones generate -o` copies them elsewhere; one cut off is found here); the folders they
    are in (one, unless the data folder moved), newest first."""
    folders = [Path(j.result.images[0]).parent for j in jobs
               if j.kind == "generate" and j.result is not None and j.result.images]
    if not folders:
        return None
    where = " and ".join(f"{p}/" for p in dict.fromkeys(f.parent for f in folders))
    return (f"Generated images are in {where}, one folder per job, its name ending in the job's id "
            f"(the newest listed: {folders[0]}).")


SUMMARY_CHARS = 120   # a job's summary in a table; `--json` has it whole


def shorten(text: str, limit: int = SUMMARY_CHARS) -> str:
    """A prompt of 60 words made a row 33 lines tall at 80 columns."""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _result_note(j: JobInfo) -> str:
    """What a finished job made, and the files a learn left out (an inbox learn's folder is gone
    by then: this is where the person sees them)."""
    skipped = (f"{len(j.skipped)} skipped: " + ", ".join(f"{escape(s.file)} ({escape(s.reason)})"
                                                         for s in j.skipped) if j.skipped else "")
    r = j.result
    if r is None:
        return skipped
    if j.kind == "eval" and r.metrics:
        return f"CLIP-I {r.metrics.get('clip_i', '-')}, CLIP-T {r.metrics.get('clip_t', '-')}"
    if j.kind == "remove" and r.metrics and "photos_deleted" in r.metrics:
        return f"{r.metrics['photos_deleted']} photos deleted, {r.metrics.get('photos_kept', 0)} kept"
    if j.kind == "learn" and r.metrics and "neurons" in r.metrics:
        # Cones 2 learns a residual embedding and no neurons (its count reads 0)
        what = ("a residual embedding" if r.metrics.get("method") == "cones2"
                else f"{r.metrics['neurons']:,} neurons")
        made = f"{what}, {human_size(int(r.metrics.get('size_bytes', 0)))}"
        return "; ".join(x for x in (made, skipped) if x)
    if not r.images:
        return skipped
    # where they are: a generate whose `cones generate -o` was cut off is found here
    return f"{len(r.images)} image{'s' if len(r.images) != 1 else ''}"   # where: `images_line`


def status_table(s: StatusInfo) -> Table:
    table = Table(title="cones service", show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")   # a path folds whole, not cut with "…"
    running = _running_line(s.queue.running) if s.queue.running else "-"
    for k, v in (("version", f"{s.version} (protocol {s.protocol})"), ("pid", str(s.pid)),
                 ("uptime", duration(s.uptime_s)), ("model", s.model),
                 ("device", f"{s.device} / {s.dtype}"), ("memory", ", ".join(s.memory) or "-"),
                 ("fingerprint", s.fingerprint), ("default method", s.method or "-"),
                 ("concepts", _concept_count(s)), ("running", running), ("queued", _queued(s)),
                 ("socket", s.socket), ("data", s.data),
                 ("inbox", s.inbox + ("" if s.inbox_watched else " (not watched)"))):
        table.add_row(k, escape(v))   # paths and prompts are text, not markup
    return table


def _running_line(job) -> str:
    """The running job as `cones cancel` needs it, and how far it is."""
    line = f"{job.id}: {shorten(job.summary)}"
    p = job.progress
    if p is not None and p.total:
        line += f" ({p.phase + ' ' if p.phase else ''}{p.step}/{p.total}"
        line += f", about {p.eta_s:.0f} s left)" if p.eta_s is not None else ")"
    return line


def _queued(s: StatusInfo) -> str:
    n = len(s.queue.damaged)
    return f"{s.queue.queued}" + (f" ({n} damaged job record{'s' if n != 1 else ''}: see `cones jobs`)" if n else "")


def damaged_jobs_lines(ids: list[str]) -> list[str]:
    """What `cones jobs` says of job records that cannot be read (a damaged queued learn never
    runs, and no listing shows it)."""
    if not ids:
        return []
    some = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return [f"{len(ids)} job record{'s are' if len(ids) != 1 else ' is'} damaged and cannot run or be "
            f"shown: {some}. `cones cancel ID` removes one (submit it again if you still want "
            "it); `cones store check` says more."]


def _concept_count(s: StatusInfo) -> str:
    bad = [f"{n} {what}" for n, what in ((s.damaged, "damaged"), (s.not_rebuilt, "not rebuilt")) if n]
    return f"{s.concepts} ({', '.join(bad)}; see `cones list`)" if bad else str(s.concepts)


def _state(state: str) -> str:
    colour = {"done": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}.get(state, "white")
    return f"[{colour}]{state}[/]"


def follow(events: Iterable[ProgressInfo], quiet: bool = False,
           console: Console | None = None) -> ProgressInfo:
    """Show a job's progress as a bar per phase; returns the final event. A failed or cancelled
    job raises its typed error (so the exit code says what happened). A phase that is over
    (another began, or the job finished) is shown full; one without a step count (a spinner)
    disappears instead of spinning on."""
    last: ProgressInfo | None = None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[loss]}"), TimeRemainingColumn())
    bar = Progress(*columns, console=console or err_console, transient=False, disable=quiet)
    with contextlib.ExitStack() as shown:   # started at its first row: a job with none printed
        tasks: dict[str, int] = {}          # an empty line to a pipe
        started = []

        def add_task(label: str, **fields) -> int:
            if not started:
                started.append(shown.enter_context(bar))
            return bar.add_task(label, **fields)

        def finish_others(current: str | None) -> None:
            for label, task in list(tasks.items()):
                if label == current:
                    continue
                total = next(t.total for t in bar.tasks if t.id == task)
                if total:
                    bar.update(task, completed=total)
                else:
                    bar.remove_task(task)
                del tasks[label]

        for info in events:
            last = info
            if info.state in FINAL_STATES:
                if info.state == "done":
                    finish_others(None)
                break
            if info.state != "running" or info.phase in ("", "start"):
                continue   # queued, or the job's first line: no phase to show yet
            label = info.phase
            finish_others(label)
            loss = f"loss {info.loss:.4f}" if info.loss is not None else ""
            if info.message.startswith(PAUSED_FOR):   # the bar stands still meanwhile: said why
                loss = f"({info.message})"
            if info.total:
                if label not in tasks:
                    tasks[label] = add_task(label, total=info.total, loss=loss)
                bar.update(tasks[label], completed=info.step, total=info.total, loss=loss)
            elif label not in tasks:
                tasks[label] = add_task(label, total=None, loss="")
    if last is None or last.state not in FINAL_STATES:
        from cns_daemon.api.errors import Unavailable

        if last is not None and last.message == STREAM_STOPPING:
            raise Unavailable(last.message, "`cones jobs` shows the job once the service is back.")
        raise Unavailable("The service stopped reporting before the job finished.",
                          "Check `cones jobs` and the service log.")
    if last.state != "done":
        err = last.error
        exc = from_code(err.code, err.message, err.hint) if err else from_code("cancelled", f"The job {last.state}.")
        exc.job_ended = True   # the job's own end (an extra not installed is `unavailable` too),
        raise exc              # not the service going away under the follower (session.wait_for)
    return last
