"""`cones service ...` and `cones store ...`: the systemd unit and the concept store's files,
handled without the service (the store's commands need it stopped)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from cones_cli.config import JSON, settings
from cones_cli.views import console, handled
from cns_daemon.api.errors import EXIT_CODES

service_app = typer.Typer(help="Install or remove the systemd user service.", no_args_is_help=True)
store_app = typer.Typer(help="Check or repair the concept store (on its files: check needs no service, salvage needs it stopped).",
                        no_args_is_help=True)


# ---------------------------------------------------------------- systemd


UNIT_DIR = typer.Option(None, "--unit-dir", help=(
    "The unit's folder (default ~/.config/systemd/user, where systemd reads it; elsewhere it is "
    "started or disabled only once linked: `systemctl --user link`)."))


@service_app.command("install")
@handled
def service_install(unit_dir: Optional[Path] = UNIT_DIR,
                    no_start: bool = typer.Option(False, "--no-start", help="Write the unit only.")) -> None:
    """Write the user unit with this machine's paths; enable and start it when systemd runs."""
    from cones_cli import service_unit

    service_unit.install(settings(), unit_dir or service_unit.default_unit_dir(), not no_start,
                         say=lambda line: console.print(line, highlight=False, markup=False))


@service_app.command("uninstall")
@handled
def service_uninstall(unit_dir: Optional[Path] = UNIT_DIR) -> None:
    """Stop, disable and remove the user unit (data and inbox are kept)."""
    from cones_cli import service_unit

    service_unit.uninstall(unit_dir or service_unit.default_unit_dir(),
                           say=lambda line: console.print(line, highlight=False, markup=False))


# ---------------------------------------------------------------- the store's files


@store_app.command("check")
@handled
def store_check(as_json: bool = JSON) -> None:
    """Read every record of the concept store and list what is damaged (exit 7 if anything is)."""
    from dataclasses import asdict

    from cns_daemon.api.errors import Corrupt, NotFound
    from cones_store.salvage import check

    paths = settings().paths
    if not paths.store.is_dir():
        raise NotFound(f"No concept store at {paths.store}.",
                       "Check the data folder (CONES_HOME, data_dir); the service makes the store when it first starts.")
    report = check(paths.store)
    if as_json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        for line in _check_lines(report):
            console.print(line, highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_CODES[Corrupt.code])


@store_app.command("salvage")
@handled
def store_salvage(force: bool = typer.Option(False, "--force", help="Copy into a fresh store even when nothing is damaged.")) -> None:
    """Copy every readable concept and job into a fresh store (the service must be stopped).

    The damaged store is kept aside as store.damaged-DATE-TIME."""
    from cns_daemon.api.errors import NotFound
    from cns_daemon.daemon import InstanceLock
    from cones_store.salvage import check, salvage

    paths = settings().paths
    if not paths.store.is_dir():
        raise NotFound(f"No concept store at {paths.store}.", "Nothing to salvage.")
    # Conflict while a service has the store open: it holds the lock in the data folder, whatever
    # runtime folder this shell sees (and the runtime folder's, which an older service held alone).
    paths.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
    locks = [InstanceLock(paths.runtime_lock), InstanceLock(paths.data_lock)]
    try:
        stop_first = ("Stop it first (`systemctl --user stop cones`, or end its `cones serve`), "
                      "then salvage.")
        locks[0].acquire(paths.socket, stop_first)
        locks[1].acquire(None, stop_first)
        if check(paths.store).ok and not force:
            console.print(f"Nothing is damaged in {escape(str(paths.store))}; nothing was moved (--force "
                          "copies it into a fresh store anyway).", highlight=False)
            return
        done = salvage(paths.store)
    finally:
        for lock in locks:
            lock.release()
    lost = done.check.damaged
    if done.other_meta_page:
        console.print("[yellow]One of the two meta pages of the store's data file is damaged: it was "
                      "salvaged as the other one describes it, which may be one commit old (the last "
                      "learn, removal or job's record missing).[/]", highlight=False)
    console.print(f"Copied {len(done.copied)} concepts and {done.jobs_copied} jobs into a fresh store "
                  f"at {escape(str(paths.store))}.", highlight=False)
    for name, key in done.check.refiled.items():
        console.print(f"filed <{name}> under its own name again (its key read '{escape(key)}')", highlight=False)
    for name, why in lost.items():
        console.print(f"[red]left behind[/] <{name}>: {escape(why)}", highlight=False)
        console.print(_relearn_text(name, done.lost.get(name), paths.archive), highlight=False,
                      markup=False, soft_wrap=True)
    if done.check.damaged_jobs:
        console.print(f"{len(done.check.damaged_jobs)} damaged jobs were left behind.", highlight=False)
    if done.check.ok and not done.other_meta_page:
        console.print(f"The old store is kept at {escape(str(done.kept_at))}.", highlight=False)
    else:
        again = "; learn the lost concepts again from their photos" if lost else ""
        console.print(f"The damaged store is kept at {escape(str(done.kept_at))}{again}.", highlight=False)
    if any(k.photo_digests for k in done.lost.values()):
        console.print("Their archived photos are kept (`cones prune-photos` leaves them) until each is "
                      "learned again under its name, or let go with `cones rm NAME --photos`.", highlight=False)


def _relearn_text(name: str, known, archive_root) -> str:
    """How to learn a concept salvage left behind again: the command with its archived photos,
    where its metadata or its learn job still says which they were."""
    from cns_daemon.archive import Archive

    archive = Archive(archive_root)
    held = [archive.path(d) for d in (known.photo_digests if known else []) if archive.has(d)]
    if not held:
        return (f"  Which photos <{name}> was learned from is not known here (or they are not in "
                f"{archive_root}): learn it again from your photos of it.")
    missing = len(known.photo_digests) - len(held)
    note = f" ({missing} of its photos are not in the archive)" if missing else ""
    return (f"  Its photos are in the archive{note}; " + relearn_command(
        name, held, known.class_word, {"method": known.method, "steps": known.steps, "seed": known.seed},
        known.options) + _caption_notes(known, archive))


def relearn_command(name: str, photos, class_word: str, flags: dict, options: dict) -> str:
    """"to learn it again as it was:" and the `cones add` line that does (its photos, class,
    method, steps, seed and options; a name a command line would read as an option renamed)."""
    import shlex

    renamed = name.lstrip("-") or "NEW_NAME"
    words = ["cones", "add", renamed, *map(str, photos), "--class", class_word or "CLASS"]
    for flag, value in flags.items():
        words += [f"--{flag}", str(value)] if value not in (None, "") else []
    for key, value in options.items():
        words += ["--option", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    new_name = f" (under a new name: '{name}' starts with '-')" if renamed != name else ""
    return f"to learn it again as it was{new_name}:\n    {shlex.join(words)}"


def _caption_notes(known, archive) -> str:
    """The archive keeps one caption per photo (`cones add` reads it beside the photo): where a
    later learn of the same photo replaced this concept's, say which caption it had."""
    from cns_daemon.archive import sidecar_caption

    lines = []
    for digest, caption in zip(known.photo_digests, known.photo_captions or []):
        if not archive.has(digest):
            continue
        path = archive.path(digest)
        beside = sidecar_caption(path)
        if beside != caption:
            had = f"the caption {caption!r}" if caption else "no caption"
            lines.append(f"    {path.name} was learned with {had}, and the archive now holds "
                         + (f"another concept's, {beside!r}" if beside else "none") + ": copy the photo "
                         "elsewhere with " + ("that caption in a .txt beside it" if caption else "no .txt")
                         + " and give the copy instead.")
    return "\n" + "\n".join(lines) if lines else ""


def _check_lines(report) -> list[str]:
    if report.open_error:
        return [f"[red]cannot open[/] {escape(report.path)}: {escape(report.open_error)}"]
    lines = [f"{escape(report.path)}: {len(report.concepts)} concepts and {report.jobs} jobs read whole."]
    lines += [f"[red]damaged database[/] {db}: {escape(why)}" for db, why in report.databases.items()]
    lines += [f"[red]damaged[/] <{name}>: {escape(why)}" for name, why in report.damaged.items()]
    lines += [f"[yellow]misfiled[/] <{name}>: whole, but its key reads '{escape(key)}' (a damaged byte); "
              "salvage files it under its name again" for name, key in report.refiled.items()]
    lines += [f"[red]damaged job[/] {escape(job)}: {escape(why)}" for job, why in report.damaged_jobs.items()]
    lines += [f"[red]damaged store record[/] {escape(key)}: {escape(why)} (salvage makes it anew from "
              "the concepts, or leaves it behind)" for key, why in report.damaged_records.items()]
    if not report.ok:
        lines.append("Stop the service and run `cones store salvage` to keep everything readable "
                     "in a fresh store (a concept damaged only in its own bytes can also be removed "
                     "with `cones rm NAME`).")
    return lines
