"""The settings as the CLI reads them (defaults → config.toml → CONES_* → flags), with a bad
value or a config.toml that is not TOML reported as bad input naming where it is set, and the
`--json` option every reporting verb shares."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import typer

from cns_daemon.api.errors import BadInput

JSON = typer.Option(False, "--json", help="Print one machine-readable JSON document.")


def settings(**flags):
    from pydantic import ValidationError

    from cns_daemon.api.settings import load_settings

    _tell_unknown_variables()
    cfg = config_file()
    if cfg.exists() and not cfg.is_file():   # it would be skipped without a word
        raise BadInput(f"{cfg} is not a file.", "config.toml is a TOML file; move the folder aside.")
    try:
        return load_settings(**flags)
    except ValidationError as exc:
        from cns_daemon.api.protocol import describe_validation_error

        raise BadInput(f"Invalid configuration: {describe_validation_error(exc)}.",
                       f"Fix it where it is set: {_where_set(exc, flags)}.") from None
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


def _where_set(exc, flags: dict) -> str:
    """Where the first refused setting came from: a flag, a CONES_* variable or config.toml."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    field = str(errors[0]["loc"][0]) if errors and errors[0].get("loc") else ""
    if flags.get(field) is not None:
        return f"the command's --{field.replace('_', '-')} flag"
    if os.environ.get(f"CONES_{field.upper()}", "").strip():
        return f"the environment variable CONES_{field.upper()}"
    cfg = config_file()
    try:
        if field in {k.lower() for k in tomllib.loads(cfg.read_text(encoding="utf-8"))}:
            return f"{cfg}"
    except (OSError, ValueError):
        pass
    return f"the command's flags, the CONES_* environment variables or {cfg}"


def _tell_unknown_variables() -> None:
    """A CONES_* variable that is no setting (CONES_STEP for CONES_STEPS) would be ignored
    without a word: said on stderr, with the setting it is closest to. Once per process."""
    import difflib

    from cns_daemon.api.settings import Settings
    from cli.views import err_console

    global _told
    if _told:
        return
    _told = True
    known = {f"CONES_{name.upper()}" for name in Settings.model_fields}
    for key in sorted(k for k in os.environ if k.startswith("CONES_") and k not in known
                      and not k.startswith("CONES_TEST_")):
        near = difflib.get_close_matches(key, sorted(known), n=1)
        err_console.print(f"warning: {key} is not a cones setting and is ignored"
                          + (f" (did you mean {near[0]}?)" if near else "") + ".", highlight=False,
                          markup=False)


_told = False


def config_file() -> Path:
    from cns_daemon.api.settings import default_paths

    return default_paths(os.environ.get("CONES_HOME")).config_file
