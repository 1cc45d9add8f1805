"""Whether the socket's folder is this user's alone, all the way up.

The CLI sends photos to whatever listens on the socket and writes the files it is told of, so
another local user who could make the socket's folder first (the /tmp fallback when there is no
XDG_RUNTIME_DIR), or swap it later, could stand in for the service. The rule is the one ssh
applies to its keys: the folder is no link, is ours, and no one else may write to it; each
folder above it is ours or root's, and one that others may write to is sticky (as /tmp is), so
only an entry's owner can rename it. Both sides check it: the service before it listens there,
the CLI before it connects.
"""
from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path


RUNTIME_HINT = ("Point runtime_dir (config.toml or CONES_RUNTIME_DIR) at a folder only you can write to, "
                "in folders only you or root own (a log-in session has one: XDG_RUNTIME_DIR; for root "
                "in a container, a volume owned by the host's user is not one).")


def _own_group(st: os.stat_result) -> bool:
    """A group-writable folder is still ours alone when its group is our private one (a group
    named after us, as Debian gives every user), which no one else is in."""
    try:
        group, me = grp.getgrgid(st.st_gid), pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return False
    return st.st_gid == os.getgid() and group.gr_name == me and set(group.gr_mem) <= {me}


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not _own_group(st)))


def folder_problem(path: Path) -> str | None:
    """What makes `path` a folder another user could take over, or None (also when it is not
    there: the CLI then connects nowhere, `Client.check_socket`)."""
    uid = os.getuid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a link (to {os.readlink(path)})"
    if st.st_uid != uid:
        return f"{path} belongs to another user (uid {st.st_uid})"
    if _writable_by_others(st):
        return f"others may write to {path}"
    # Above it, both ways there: as written (a link of another user's could be pointed elsewhere
    # later) and as the links lead now (the folders the socket's folder really sits in).
    written = Path(path).absolute().parents
    led = Path(os.path.realpath(Path(path).absolute().parent)).joinpath("x").parents
    for folder, look in [(f, os.lstat) for f in written] + [(f, os.stat) for f in led]:
        try:
            st = look(folder)
        except OSError as exc:
            return f"{folder}, above it, cannot be looked at ({exc.strerror})"
        link = " is a link that" if stat.S_ISLNK(st.st_mode) else ""
        if st.st_uid not in (0, uid):
            return f"{folder}, above it,{link} belongs to another user (uid {st.st_uid})"
        if not link and _writable_by_others(st) and not st.st_mode & stat.S_ISVTX:
            return f"others may write to {folder}, above it (and so replace what is in it)"
    return None


def socket_problem(path: Path) -> str | None:
    """`folder_problem` of the socket's folder, then the socket itself: a socket there is ours."""
    problem = folder_problem(path.parent)
    if problem is not None:
        return problem
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISSOCK(st.st_mode) and st.st_uid != os.getuid():
        return f"the socket {path} belongs to another user (uid {st.st_uid})"
    return None
