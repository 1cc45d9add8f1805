"""`cones service install|uninstall`: the systemd user unit, written with this machine's paths.

The template is cones_cli/cones.service (package data: a wheel carries it as an editable install
does); `render` fills in the command and the environment that selects the data folders. `install`
writes it and, when a systemd user manager answers, runs daemon-reload and enable --now (and a
restart, where that changes something and throws no job away); every step it takes is printed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from cns_daemon.api.errors import BadInput, NotFound, Storage, Unavailable, storage_error
from cns_daemon.api.settings import Settings, setting_variables

TEMPLATE = Path(__file__).resolve().parent / "cones.service"
UNIT_NAME = "cones.service"


def default_unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def exec_command() -> list[str]:
    """The `cones` script this Python installed (beside it, or in its scripts folder: a --user
    install's is ~/.local/bin), else `python -P -m cones_cli.main` (as words). -P: `-m` would first
    look in the working folder (the home folder under systemd), where a cones_cli/ of the user's own
    would run instead."""
    folders = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    if sys.prefix == sys.base_prefix:   # not a venv: `pip install --user` puts it in ~/.local/bin
        with contextlib.suppress(KeyError):
            folders.append(Path(sysconfig.get_path("scripts", sysconfig.get_preferred_scheme("user"))))
    script = next((f / "cones" for f in folders if (f / "cones").is_file()), None)
    return [str(script)] if script else [sys.executable, "-P", "-m", "cones_cli.main"]


def _quote(value: str, command: bool = False) -> str:
    """A systemd word: quoted when it holds a space, a tab, a quote of either kind or a
    backslash (systemd reads ' as quoting too), "%" doubled (systemd reads %i and the like as
    specifiers everywhere), and in a command line "$" doubled too (systemd expands $HOME there)."""
    value = value.replace("%", "%%")
    if command:
        value = value.replace("$", "$$")
    if not any(c in value for c in ' \t"\'\\'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_environment(settings: Settings) -> dict[str, str]:
    """The unit's Environment= lines."""
    paths = settings.paths
    env = {"PYTHONUNBUFFERED": "1"}
    # What this shell's environment sets goes into the unit, resolved as this shell resolves it:
    # the service starts elsewhere (another working folder, no shell). Settings from config.toml
    # stay there (the unit's service reads the same file), so editing it later still counts.
    # Every CONES_* setting this shell sets goes along (steps, method, memory options ...), not
    # only the folders: a service that silently ignored them would surprise.
    given = setting_variables()   # CONES_Steps is read as CONES_STEPS: carried so
    for field in Settings.model_fields:
        key = f"CONES_{field.upper()}"
        if key in given:
            env[key] = given[key]
    for field in ("data_dir", "runtime_dir", "inbox_dir", "model"):
        value, key = getattr(settings, field), f"CONES_{field.upper()}"
        if field == "model" and (value is None or not Path(value).exists()):
            continue   # a model named otherwise than by a path
        if value is not None and key not in env and not str(value).startswith(("/", "~")):
            # a relative folder in config.toml: the service would read it from its own working
            # folder (the home folder), not the one this was installed from
            raise BadInput(f"{field} is a relative path in config.toml ({str(value)!r}): the service "
                           "resolves it from its own working folder, not this one.",
                           f"Make it a full path (or one starting with ~/) in {settings.paths.config_file}, "
                           "then install again.")
    if settings.home:
        env["CONES_HOME"] = str(Path(settings.home).expanduser().absolute())
    for key, path in (("CONES_DATA_DIR", paths.data), ("CONES_RUNTIME_DIR", paths.runtime),
                      ("CONES_INBOX_DIR", paths.inbox)):
        if key in env:
            env[key] = str(path)
    if (not settings.home and settings.runtime_dir is None and "CONES_RUNTIME_DIR" not in env
            and not os.environ.get("XDG_RUNTIME_DIR")):
        # This shell has no XDG_RUNTIME_DIR, so its runtime folder is a fallback under /tmp; the
        # service under systemd would get the manager's (/run/user/UID): its socket would be
        # where no CLI here looks.
        env["CONES_RUNTIME_DIR"] = str(paths.runtime)
    # Folders this shell finds through XDG or HF_HOME: a systemd manager is started without
    # the shell's variables, so the service read another config.toml and served other folders
    # than this shell's CLI looks in.
    xdg = ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_PICTURES_DIR", "XDG_RUNTIME_DIR")
    for key in ((() if settings.home else xdg) + ("HF_HOME",)):
        if os.environ.get(key, "").strip():
            env[key] = str(Path(os.environ[key]).expanduser().absolute())
    if "CONES_MODEL" in env and Path(env["CONES_MODEL"]).expanduser().exists():
        env["CONES_MODEL"] = str(Path(env["CONES_MODEL"]).expanduser().absolute())
    for key, value in env.items():
        if any(c in value for c in "\n\r"):   # it would end the Environment= line: a line of its own
            raise BadInput(f"{key} holds a line break; a unit file cannot carry it.",
                           f"Set {key} without the line break, then install again.")
    return env


def render(settings: Settings) -> str:
    if not TEMPLATE.is_file():
        raise NotFound(f"The unit template {TEMPLATE} is missing.",
                       "Install cones again: `bash scripts/setup.sh` in its source folder (or "
                       "`pip install --force-reinstall .` there).")
    env = unit_environment(settings)
    text = TEMPLATE.read_text()
    fields = {
        "@EXEC@": " ".join(_quote(w, command=True) for w in exec_command()),
        "@ENVIRONMENT@": "\n".join(f"Environment={_quote(f'{k}={v}')}" for k, v in sorted(env.items())),
    }
    for key, value in fields.items():
        text = text.replace(key, value)
    # the template's header comment describes the template, not this file
    body = text.split("\n[Unit]", 1)[1]
    return ("# Written by `cones service install`; edit the template cones_cli/cones.service or the\n"
            "# settings (config.toml) and run it again rather than editing this file.\n[Unit]" + body)


def systemd_user_available() -> bool:
    if shutil.which("systemctl") is None:
        return False
    probe = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True, timeout=10)
    return probe.returncode == 0


def _systemctl(*args: str, say, check: bool = True) -> bool:
    cmd = ["systemctl", "--user", *args]
    say(f"$ {' '.join(cmd)}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and check:
        raise Unavailable(f"`{' '.join(cmd)}` failed: {(result.stderr or result.stdout).strip()}",
                          "Check `systemctl --user status cones` and `journalctl --user -u cones`.")
    return result.returncode == 0


def _unit_property(name: str) -> str:
    """One property of the unit as the user manager knows it ("" where it answers nothing)."""
    shown = subprocess.run(["systemctl", "--user", "show", "-p", name, "--value", UNIT_NAME],
                           capture_output=True, text=True, timeout=60)
    return shown.stdout.strip() if shown.returncode == 0 else ""


def _running() -> bool:
    """Whether the unit runs or is starting (loading its model: is-active says "activating",
    which `enable --now` leaves as it is too)."""
    return _unit_property("ActiveState") in ("active", "activating", "reloading")


def _running_job(settings: Settings):
    """The job the service runs now (a restart would start it over), or None (none, or no answer)."""
    from cones_cli.client import Client
    from cns_daemon.api.errors import ConesError

    try:
        with Client(settings.paths.socket, timeout=10.0, data_lock=settings.paths.data_lock) as c:
            return c.status().queue.running
    except ConesError:
        return None


def _read_by_systemd(unit: Path) -> bool:
    """Whether the user manager reads this unit file: it reads the default folder's; one written
    elsewhere only once linked (`systemctl --user link`)."""
    if unit.parent.expanduser().absolute() == default_unit_dir().absolute():
        return True
    fragment = _unit_property("FragmentPath")
    return bool(fragment) and Path(fragment).resolve() == unit.expanduser().resolve()


def install(settings: Settings, unit_dir: Path, start: bool, say) -> Path:
    paths = settings.paths
    unit = unit_dir / UNIT_NAME
    text = render(settings)
    if unit_dir.exists() and not unit_dir.is_dir():   # said before any folder is made
        raise BadInput(f"{unit_dir} is a file, not a folder for the unit.",
                       "Give --unit-dir a folder (default: ~/.config/systemd/user).")
    try:
        for folder in (paths.data, paths.inbox, paths.runtime):
            # 0700 as the service makes them: photos and concepts are no one else's to read
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            say(f"folder {folder}")
        os.chmod(paths.runtime, 0o700)
        unit_dir.mkdir(parents=True, exist_ok=True)
        unit.write_text(text)
    except OSError as exc:   # a folder it may not make or write: said, not a traceback
        where = exc.filename or unit
        raise (Storage if storage_error(exc) else BadInput)(
            f"Cannot write {where}: {exc.strerror or exc}.",
            "Give folders you can write to (CONES_HOME, the *_dir settings, --unit-dir).") from None
    say(f"wrote {unit}")
    env = unit_environment(settings)
    carried = sorted(k for k in env if k in setting_variables())   # as read: CONES_Steps too
    if carried:   # they win over config.toml: said, so a later edit there is not a surprise
        say(f"carried from this shell (they override config.toml; unset them and install again to "
            f"let config.toml decide): {', '.join(carried)}")
    if "CONES_RUNTIME_DIR" in env and "CONES_RUNTIME_DIR" not in carried:
        say(f"the socket's folder is pinned to {env['CONES_RUNTIME_DIR']}: this shell has no "
            "XDG_RUNTIME_DIR, and the service would otherwise take the user manager's")
    folders = sorted(k for k in env if not k.startswith(("CONES_", "PYTHON")))
    if folders:
        say(f"carried from this shell, where the service finds its folders: {', '.join(folders)}")
    if not start:
        say("not starting it (--no-start)")
    elif not systemd_user_available():
        say("no systemd user manager here: the unit is written but not enabled; run "
            "`systemctl --user enable --now cones` where systemd runs, or `cones serve`")
    elif not _read_by_systemd(unit):
        say(f"not starting it: the user manager reads its units from {default_unit_dir()}, not "
            f"{unit_dir} (`systemctl --user link {unit}` makes it known there)")
    else:
        running = _running()
        _systemctl("daemon-reload", say=say)
        _systemctl("enable", "--now", UNIT_NAME, say=say)
        busy = _running_job(settings) if running else None
        if busy is not None:   # hours of a learn are not thrown away unasked
            say(f"not restarted: it runs job {busy.id} ({busy.summary}), which a restart would start "
                "over; once it ends, `systemctl --user restart cones` makes this unit and config.toml "
                "as they are now count")
        elif running:   # `enable --now` leaves a running service as it was started
            _systemctl("restart", UNIT_NAME, say=say)
            say("the service was running: restarted, so this unit and config.toml as they are now count")
        say("the service is enabled and started; `cones status` talks to it")
    return unit


def _left_behind(unit: Path, say) -> bool:
    """A unit file deleted by hand leaves the service running and its enable link dangling, so
    it would start again at the next log-in (systemd then says the unit is not found). Stops the
    one and removes the other; whether there was anything to do."""
    if unit.parent.expanduser().absolute() != default_unit_dir().absolute() or not systemd_user_available():
        return False
    # (a unit linked from elsewhere whose file is gone leaves a link of that name here too)
    links = [p for p in (default_unit_dir() / "default.target.wants" / UNIT_NAME, unit)
             if p.is_symlink() and not p.exists()]
    running = _running()
    if not (links or running):
        return False
    say(f"no unit at {unit}, but the user manager still has it: cleaning up")
    if running:
        _systemctl("stop", UNIT_NAME, say=say, check=False)
    for link in links:   # `disable` refuses a unit whose file is gone; the links are ours to remove
        link.unlink()
        say(f"removed the dangling link {link}")
    _systemctl("daemon-reload", say=say, check=False)
    return True


def uninstall(unit_dir: Path, say) -> None:
    unit = unit_dir / UNIT_NAME
    if not unit.exists():
        if not _left_behind(unit, say):
            say(f"no unit at {unit}: nothing to remove")
        return
    managed = systemd_user_available() and _read_by_systemd(unit)
    if managed:
        _systemctl("disable", "--now", UNIT_NAME, say=say)
    unit.unlink()
    say(f"removed {unit}")
    if managed:
        _systemctl("daemon-reload", say=say)
    say("your concepts, photos and inbox are kept")
