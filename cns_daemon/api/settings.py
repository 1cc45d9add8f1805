"""One typed settings object, layered: defaults → config.toml → CONES_* environment → flags.

Paths come from platformdirs unless CONES_HOME is set, in which case every path (data, config,
runtime, inbox) lives under that one folder: tests, benchmarks and the demo use it so they
never touch a person's real data.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import (BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from cns_daemon.api.names import DEFAULT_METHOD, MethodName
from cns_daemon.api.protocol import MAX_LEARN_STEPS

APP = "cones"


@dataclass(frozen=True)
class Paths:
    data: Path      # LMDB store, photo archive, class-image cache, outputs
    config: Path    # config.toml
    runtime: Path   # the socket's 0700 folder
    inbox: Path     # watched folder people drop photos into

    @property
    def config_file(self) -> Path:
        return self.config / "config.toml"

    @property
    def socket(self) -> Path:
        return self.runtime / "cones.sock"

    @property
    def store(self) -> Path:
        return self.data / "store"

    @property
    def data_lock(self) -> Path:
        """Held by the service that has the store open, whatever runtime folder it serves in
        (its own name: runtime_dir may be the data folder)."""
        return self.data / "store.lock"

    @property
    def runtime_lock(self) -> Path:
        """Held by a `cones serve` from before its model loads until it exits."""
        return self.runtime / "cones.lock"

    @property
    def archive(self) -> Path:
        return self.data / "archive"

    @property
    def outputs(self) -> Path:
        return self.data / "outputs"


def check_text_paths(paths: Paths, inbox: bool) -> None:
    """BadInput for a folder the service uses (the inbox only where it is watched) whose name is
    not UTF-8 text: LMDB, the lock file's text and the socket's address take text, and such a
    name (CONES_HOME=$'/tmp/h\\xff') failed `cones serve` with a traceback."""
    for field in ("data", "config", "runtime") + (("inbox",) if inbox else ()):
        path = str(getattr(paths, field))
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            from cns_daemon.api.errors import BadInput

            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise BadInput(f"The {field} folder {shown} has a name that is not UTF-8 text.",
                           "Give cones folders whose names are UTF-8 (CONES_HOME, CONES_DATA_DIR, "
                           "config.toml's folder settings).") from None


def blank(value) -> bool:
    """A value that means "not set" wherever a setting is given: "" or spaces."""
    return isinstance(value, str) and not value.strip()


def setting_variables() -> dict[str, str]:
    """The environment's variables as the settings read them, by setting name upper-cased
    (CONES_STEPS), whatever case they are spelled in; a blank one is unset."""
    return {key.upper(): value for key, value in os.environ.items()
            if key.upper().startswith("CONES_") and value.strip()}


def env_home() -> str | None:
    """CONES_HOME, a blank value counting as unset (as it does for the settings field)."""
    return setting_variables().get("CONES_HOME", "").strip() or None


def no_such_home(path: str | os.PathLike) -> str | None:
    """Why "~user/..." names no folder ("there is no user 'x' ..."), or None: pathlib raises
    RuntimeError for it wherever the path is first used (a traceback)."""
    if not str(path).startswith("~"):
        return None
    try:
        Path(path).expanduser()
    except RuntimeError:
        return f"there is no user {str(path)[1:].split('/')[0]!r} whose home folder '~' could name"
    return None


def expand(path: str | os.PathLike, what: str) -> Path:
    """`path` with "~" or "~user" made the home folder, as a shell does, and made absolute;
    BadInput naming `what` (the setting) for a user who does not exist."""
    why = no_such_home(path)
    if why is not None:
        from cns_daemon.api.errors import BadInput

        raise BadInput(f"{what} is {str(path)!r}, and {why}.", "Give the folder's full path.")
    return Path(path).expanduser().absolute()


def default_paths(home: str | os.PathLike | None = None) -> Paths:
    """Where things live. `home` (or CONES_HOME) overrides everything."""
    home = home if home is not None else env_home()
    if home and str(home).strip():
        root = expand(home, "CONES_HOME")
        return Paths(root / "data", root / "config", root / "run", root / "inbox")
    with warnings.catch_warnings():  # no XDG_RUNTIME_DIR (containers, CI): /tmp fallback is fine
        warnings.simplefilter("ignore")
        runtime = platformdirs.user_runtime_dir(APP, ensure_exists=False)
    return Paths(
        data=Path(platformdirs.user_data_dir(APP)),
        config=Path(platformdirs.user_config_dir(APP)),
        runtime=Path(runtime),
        inbox=Path(platformdirs.user_pictures_dir()) / "cones-inbox",
    )


class Settings(BaseSettings):
    """Everything a user can configure. Field names double as config.toml keys and, upper-cased
    with a CONES_ prefix, as environment variables (CONES_MODEL, CONES_DEVICE, …)."""

    # A blanked variable (CONES_STEPS=) means "not set", as one unsets it in a shell.
    # Variables are read whatever their case (cones_steps is CONES_STEPS): `setting_variables`
    # finds them so for the CLI's warning and `cones service install`.
    model_config = SettingsConfigDict(env_prefix="CONES_", extra="forbid", validate_default=True,
                                      env_ignore_empty=True)

    # Where: empty means "the platformdirs default" (or under CONES_HOME).
    home: str | None = Field(None, description="Put every path under this folder.")
    data_dir: Path | None = None
    runtime_dir: Path | None = None
    inbox_dir: Path | None = None

    # What model: empty means the shipped toy-world fixture (offline).
    model: str | None = Field(None, description="Diffusers folder or .safetensors/.ckpt file; None: the shipped toy-world model.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    # Learning defaults.
    method: MethodName = DEFAULT_METHOD
    steps: int | None = Field(None, ge=1, le=MAX_LEARN_STEPS, description="Training steps; None = method default.")

    # Memory options for full-size models (cns_daemon/memory.py); None = per-device default.
    gradient_checkpointing: bool | None = None
    sdpa: bool | None = None
    autocast: bool | None = None
    offload: bool | None = None
    vae_tiling: bool | None = None

    # Service.
    settle_seconds: float = Field(5.0, ge=0.0, le=3600.0)
    watch_inbox: bool = True
    # Photos travel base64-encoded (a third more than their files) and the whole request is held
    # while it is checked: 256 MiB holds some 45 phone photos of 4-5 MB, and the 64 a concept
    # may have where they are smaller.
    max_request_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # A request head (request line + headers) must arrive within this many seconds.
    header_timeout_seconds: float = Field(10.0, gt=0.0, le=600.0)
    # Finished jobs kept (newest first; `cones jobs` lists them): the queue reads every record
    # it holds, so 20,000 of them made an idle service use a third of a core (a walkthrough).
    # The newest finished learn of each stored concept is always kept (salvage reads it).
    keep_jobs: int = Field(1000, ge=10)

    @field_validator("home", "data_dir", "runtime_dir", "inbox_dir", "model", mode="before")
    @classmethod
    def _blank_is_unset(cls, value):
        """`CONES_MODEL=` (or model = "") means the default, as a blanked variable does in a
        shell, not the folder one happens to be in."""
        return None if blank(value) else value

    @field_validator("steps", "settle_seconds", "max_request_bytes", "header_timeout_seconds",
                     "keep_jobs", mode="before")
    @classmethod
    def _not_a_bool(cls, value):
        """`steps = true` in config.toml was taken as 1 step (TOML's booleans are Python's)."""
        if isinstance(value, bool):
            raise ValueError("a number is needed, not true or false")
        return value

    @field_validator("home", "data_dir", "runtime_dir", "inbox_dir", "model")
    @classmethod
    def _home_folder_exists(cls, value):
        """"~nosuchuser/x" failed later with a traceback, wherever the path was first used."""
        why = no_such_home(value) if value is not None else None
        if why is not None:
            raise ValueError(why)
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        # Earlier sources win: flags (init kwargs) > environment > config.toml > defaults.
        home = getattr(init_settings, "init_kwargs", {}).get("home") or env_home()
        toml_file = default_paths(home).config_file
        return (init_settings, _EnvBlankIsUnset(settings_cls), _TomlWithoutHome(settings_cls, toml_file=toml_file))

    def memory_overrides(self) -> dict[str, bool | None]:
        return {k: getattr(self, k) for k in
                ("gradient_checkpointing", "sdpa", "autocast", "offload", "vae_tiling")}

    @property
    def paths(self) -> Paths:
        base = default_paths(self.home)
        def given(p: Path | None, default: Path) -> Path:
            # "~/cones" in config.toml or an env var means the home folder, as in a shell; a
            # relative path is made absolute once, here, so every part sees the same folder.
            return expand(p, "a folder setting") if p else default

        return Paths(
            data=given(self.data_dir, base.data),
            config=base.config,
            runtime=given(self.runtime_dir, base.runtime),
            inbox=given(self.inbox_dir, base.inbox),
        )


class _EnvBlankIsUnset(EnvSettingsSource):
    """A variable of spaces is unset too, as `setting_variables` reads it (pydantic's
    env_ignore_empty drops only ""): `CONES_STEPS=' '` was refused as a bad value in config.toml,
    and `CONES_MODEL=' '` hid config.toml's model from this shell but not from the unit."""

    def __call__(self) -> dict:
        return {k: v for k, v in super().__call__().items() if not blank(v)}


class _TomlWithoutHome(TomlConfigSettingsSource):
    """config.toml lives in the home folder, so it cannot move it: `home` there was taken for
    the other settings but not for finding the file, and `cones service install` then pointed the
    service at another config.toml."""

    def __call__(self) -> dict:
        values = super().__call__()
        if "home" in values:
            from cns_daemon.api.errors import BadInput

            raise BadInput(f"`home` cannot be set in {self.toml_file_path}: the file is found through it.",
                           "Set CONES_HOME instead, or set data_dir, inbox_dir and "
                           "runtime_dir in the file.")
        return values


def load_settings(**flags) -> Settings:
    """Build settings; `flags` are the command-line overrides (None values are ignored so an
    unset flag never hides the config file or the environment, nor does a blank one, as a
    blank variable does not: `--model ""` is the model config.toml names)."""
    return Settings(**{k: v for k, v in flags.items()
                       if v is not None and not blank(v)})
