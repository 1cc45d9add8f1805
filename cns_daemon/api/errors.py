"""The small fixed set of errors cones can report.

Every error has a stable code (used by the socket protocol and mapped to CLI exit codes), a
sentence saying what went wrong, and a hint saying what to do about it. Code that detects a
problem raises one of these; nothing else should reach a user.
"""
from __future__ import annotations

import errno
from enum import Enum


class ErrorCode(str, Enum):
    BAD_INPUT = "bad_input"            # malformed request, name, box, prompt …
    NOT_FOUND = "not_found"            # unknown concept, job, file
    CONFLICT = "conflict"              # name taken, service already running
    BAD_PHOTO = "bad_photo"            # not an image, truncated, too small
    MODEL_MISMATCH = "model_mismatch"  # store / record made on another base model
    CORRUPT = "corrupt"                # damaged bytes in the store
    MODEL_LOAD = "model_load"          # cannot load the configured model
    PROTOCOL = "protocol"              # client and service speak different versions
    CANCELLED = "cancelled"            # a job was cancelled
    UNAVAILABLE = "unavailable"        # service not running, optional extra missing
    STORAGE = "storage"                # a folder cannot be written: disk full, read-only, no permission
    INTERRUPTED = "interrupted"        # Ctrl-C in the CLI: it stopped following a job
    INTERNAL = "internal"              # a bug: report it


# CLI exit codes per error code; 1 stays the generic failure.
EXIT_CODES: dict[ErrorCode, int] = {
    ErrorCode.BAD_INPUT: 2,
    ErrorCode.NOT_FOUND: 3,
    ErrorCode.CONFLICT: 4,
    ErrorCode.BAD_PHOTO: 5,
    ErrorCode.MODEL_MISMATCH: 6,
    ErrorCode.CORRUPT: 7,
    ErrorCode.MODEL_LOAD: 8,
    ErrorCode.PROTOCOL: 9,
    ErrorCode.CANCELLED: 10,
    ErrorCode.UNAVAILABLE: 11,
    ErrorCode.STORAGE: 12,
    ErrorCode.INTERRUPTED: 130,
    ErrorCode.INTERNAL: 70,
}


class ConesError(Exception):
    """Base class. `code` is fixed per subclass; `hint` tells the user what to do."""

    code: ErrorCode = ErrorCode.INTERNAL
    default_hint: str = "This is a bug in cones; please report it with the service log."

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.code]


class BadInput(ConesError):
    code = ErrorCode.BAD_INPUT
    default_hint = "Check the value and try again (`cones COMMAND --help` shows what it takes)."


class NotFound(ConesError):
    code = ErrorCode.NOT_FOUND
    default_hint = "`cones list` shows the stored concepts, `cones jobs` the jobs."


class Conflict(ConesError):
    code = ErrorCode.CONFLICT
    default_hint = "Pick another name, or remove the existing one first."


class BadPhoto(ConesError):
    code = ErrorCode.BAD_PHOTO
    default_hint = ("Use PNG, JPEG, WebP, BMP, GIF or TIFF photos of at least 32x32 pixels that open in "
                    "an image viewer.")


class ModelMismatch(ConesError):
    code = ErrorCode.MODEL_MISMATCH
    default_hint = ("Load the base model the store was made with, or point CONES_HOME at "
                    "another data folder for this model.")


class Corrupt(ConesError):
    code = ErrorCode.CORRUPT
    default_hint = "Remove the damaged concept with `cones rm NAME` and learn it again; others are unaffected."


class ModelLoad(ConesError):
    code = ErrorCode.MODEL_LOAD
    default_hint = ("Point `model` (config.toml, CONES_MODEL or --model) at a diffusers folder or a "
                    ".safetensors/.ckpt file, or leave it unset for the shipped toy-world model.")


class ProtocolMismatch(ConesError):
    code = ErrorCode.PROTOCOL
    default_hint = "Restart the service so the CLI and the service come from the same install."


class Cancelled(ConesError):
    code = ErrorCode.CANCELLED
    default_hint = "Nothing of it was kept; run the command again to start it over."


class Unavailable(ConesError):
    code = ErrorCode.UNAVAILABLE
    default_hint = "Start the service with `cones serve` (or `cones service install`)."


class Interrupted(ConesError):
    """The CLI only: Ctrl-C while it followed a job, which goes on in the service."""
    code = ErrorCode.INTERRUPTED
    default_hint = "`cones jobs` shows the job; `cones cancel JOB` stops it."


class Storage(ConesError):
    code = ErrorCode.STORAGE
    default_hint = ("Free space on that disk, or check that the folder and its files are yours to "
                    "read and write, then try again.")


# What the operating system says when a folder cannot take a write: the person's disk, not a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.EFBIG})


def storage_error(exc: BaseException) -> Storage | None:
    """A Storage error for an OSError that says a folder cannot be written, else None."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return None
    where = exc.filename2 or exc.filename
    return Storage(f"Cannot use {where}: {exc.strerror}." if where else f"A file operation failed: "
                   f"{exc.strerror}.")


FILE_LIMIT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


def os_error(exc: BaseException) -> ConesError | None:
    """A typed error for an OSError a person can act on: a folder that cannot be written
    (Storage), or too many open files (Unavailable: a flood of connections, or a low limit),
    else None."""
    if isinstance(exc, OSError) and exc.errno in FILE_LIMIT_ERRNOS:
        return Unavailable(f"The service has too many files open: {exc.strerror}.",
                           "Wait for other cones commands to end and send this again; if it "
                           "persists, raise the open-files limit (`ulimit -n`, or LimitNOFILE= in "
                           "the service unit) and restart the service.")
    return storage_error(exc)


class Internal(ConesError):
    code = ErrorCode.INTERNAL


ERROR_TYPES: dict[ErrorCode, type[ConesError]] = {
    cls.code: cls for cls in (BadInput, NotFound, Conflict, BadPhoto, ModelMismatch, Corrupt,
                              ModelLoad, ProtocolMismatch, Cancelled, Unavailable, Storage,
                              Interrupted, Internal)
}


def from_code(code: str, message: str, hint: str | None = None) -> ConesError:
    """Rebuild a typed error from its wire form (the CLI side of the protocol)."""
    try:
        cls = ERROR_TYPES[ErrorCode(code)]
    except ValueError:
        cls = Internal
    return cls(message, hint)
