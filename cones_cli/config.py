"""The settings as the CLI reads them (defaults → config.toml → CONES_* → flags), with a bad
value or a config.toml that is not TOML reported as bad input naming where it is set, and the
`--json` option every reporting verb shares."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import typer

from cns_daemon.api.errors import BadInput
from cns_daemon.api.settings import setting_variables

JSON = typer.Option(False, "--json", help="Print one machine-readable JSON document.")
CONCEPT = typer.Argument(..., help="The concept's name, as `cones list` shows it.")


def settings(**flags):
    from pydantic import ValidationError

    from cns_daemon.api.settings import load_settings

    _tell_unknown_variables()
    cfg = config_file()
    if cfg.exists() and not cfg.is_file():   # it would be skipped without a word
        raise BadInput(f"{cfg} is not a file.", "config.toml is a TOML file; move the folder aside.")
    if cfg.is_symlink() and not cfg.exists():   # so would a link to nothing
        raise BadInput(f"{cfg} is a link to {os.readlink(cfg)}, which is not there.",
                       "Point the link at your config.toml, or remove it to use the defaults.")
    try:
        return load_settings(**flags)
    except ValidationError as exc:
        from cns_daemon.api.protocol import describe_validation_error

        raise BadInput(f"Invalid configuration: {_unknown_keys(exc) or describe_validation_error(exc)}.",
                       f"Fix it where it is set: {_where_set(exc, flags)}.") from None
    except OSError as exc:   # unreadable: no storage trouble, whatever errno says
        raise BadInput(f"{cfg} cannot be read: {exc.strerror or exc}.",
                       "Make it readable by you (chmod 600), or move it aside." if isinstance(
                           exc, PermissionError) else "Check the file and its disk, or move it aside.") from None
    except tomllib.TOMLDecodeError as exc:
        try:
            raw = config_file().read_bytes()
        except OSError:
            raw = b""
        if b"\x00" in raw:   # UTF-16 without a byte-order mark decodes as UTF-8 with NULs
            raise BadInput(f"{config_file()} is not UTF-8 text.",
                           "Save it as UTF-8 (the encoding TOML files use), or move it aside.") from None
        bom = raw.startswith(b"\xef\xbb\xbf")
        raise BadInput(f"{config_file()} is not valid TOML: {exc}"
                       + (" (it starts with a byte-order mark)." if bom else "."),
                       "Save it as UTF-8 without a byte-order mark." if bom else
                       "Fix the file (README, 'Where data lives'), or move it aside.") from None
    except UnicodeDecodeError:   # saved as UTF-16 ("Unicode" in Notepad) or Latin-1
        raise BadInput(f"{config_file()} is not UTF-8 text.",
                       "Save it as UTF-8 (the encoding TOML files use), or move it aside.") from None


def _unknown_keys(exc) -> str:
    """A key config.toml has that is no setting ("step"), with the one it is closest to, as
    an unknown CONES_* variable is told; "" when the errors are others."""
    from cns_daemon.api.settings import Settings

    unknown = [str(e["loc"][0]) for e in exc.errors() if e.get("type") == "extra_forbidden" and e.get("loc")]
    if not unknown or len(unknown) != len(exc.errors()):
        return ""
    return "; ".join(f"`{key}` is not a cones setting" + (f" (did you mean `{near}`?)" if (
        near := nearest(key, Settings.model_fields)) else "") for key in unknown)


def nearest(word: str, choices) -> str | None:
    """The choice `word` is most likely a typo of (CONES_STEP for CONES_STEPS), or None."""
    import difflib

    near = difflib.get_close_matches(word, sorted(choices), n=1)
    return near[0] if near else None


def _where_set(exc, flags: dict) -> str:
    """Where the refused settings came from: a flag, a CONES_* variable or config.toml."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    fields = [str(e["loc"][0]) if e.get("loc") else "" for e in errors] or [""]
    return "; ".join(dict.fromkeys(_place(field, flags) for field in fields))


def _place(field: str, flags: dict) -> str:
    if flags.get(field) is not None:
        return f"the command's {FLAGS.get(field, '--' + field.replace('_', '-'))} flag"
    if setting_variables().get(f"CONES_{field.upper()}"):
        return f"the environment variable CONES_{field.upper()}"
    cfg = config_file()
    try:
        if field in tomllib.loads(cfg.read_text(encoding="utf-8")):
            return f"{cfg}"
    except (OSError, ValueError):
        pass
    return f"the command's flags, the CONES_* environment variables or {cfg}"


# Settings whose flag is not named after them (`cones serve`)
FLAGS = {"settle_seconds": "--settle", "watch_inbox": "--no-inbox"}


def _tell_unknown_variables() -> None:
    """A CONES_* variable that is no setting (CONES_STEP for CONES_STEPS) would be ignored
    without a word: said on stderr, with the setting it is closest to. Once per process."""
    from cns_daemon.api.settings import Settings
    from cones_cli.views import err_console

    global _told
    if _told:
        return
    _told = True
    known = {f"CONES_{name.upper()}" for name in Settings.model_fields}
    for key in sorted(k for k in os.environ if k.upper().startswith("CONES_")
                      and not k.upper().startswith("CONES_TEST_")):
        if key.upper() in known:
            if key != key.upper():   # read all the same (the settings ignore case): said
                err_console.print(f"warning: {key} is read as {key.upper()}; spell it so.",
                                  highlight=False, markup=False)
            continue
        near = nearest(key.upper(), known)
        err_console.print(f"warning: {key} is not a cones setting and is ignored"
                          + (f" (did you mean {near}?)" if near else "") + ".", highlight=False,
                          markup=False)


_told = False


def config_file() -> Path:
    from cns_daemon.api.settings import default_paths

    return default_paths(os.environ.get("CONES_HOME")).config_file
