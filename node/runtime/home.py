"""The node's home directory (keys, control socket, state, job exports): checked before anything uses it.

    check_home_writable(config.home_dir)   # `swarmnode run`: creates it (0700) and proves a write + fsync works
    check_home_readable(config.home_dir)   # the client commands: the home exists and can be listed
    check_data_dir(config.data)            # an explicit --data must be an existing, readable directory

Every problem is a NodeError with one line naming the path and what to do (exit code 2: it is the user's
choice of path), never a traceback: a home that is a regular file, under a virtual filesystem such as /proc,
unreadable or unwritable by this user, on a read-only or full disk.
"""

from __future__ import annotations

import errno
import os
import pathlib
import tempfile

from node.runtime.errors import EXIT_USAGE, NodeError

_WHY: dict[int | None, str] = {  # keyed by OSError.errno, which may be None
    errno.EACCES: "permission denied for this user",
    errno.EPERM: "permission denied for this user",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.ENAMETOOLONG: "the path is too long",
    errno.ELOOP: "the path has a symlink loop",
}


def _reason(e: OSError) -> str:
    return _WHY.get(e.errno, e.strerror or type(e).__name__)


def _error(home: pathlib.Path, what: str, e: OSError | None = None, hint: str = "") -> NodeError:
    detail = f": {_reason(e)}" if e is not None else ""
    return NodeError(f"home {home} {what}{detail}{hint or ''}", EXIT_USAGE)


def check_home_writable(home: pathlib.Path) -> None:
    """Create ``home`` (and its parents) if needed, then write, fsync and remove a probe file in it."""
    home = pathlib.Path(home)
    if home.exists() and not home.is_dir():
        raise _error(home, "is not a directory", hint="; pass --home a directory (it is created if missing)")
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise _error(home, "cannot be created", e, hint=_where_hint(home)) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=home)
    except OSError as e:
        raise _error(home, "cannot be written", e, hint=_where_hint(home)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"swarmnode")  # a node needs its key, state and exports here: prove a real write lands
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _error(home, "cannot be written", e, hint=_where_hint(home)) from None
    finally:
        pathlib.Path(probe).unlink(missing_ok=True)


def _where_hint(home: pathlib.Path) -> str:
    resolved = home.resolve()
    if resolved.parts[:2] in (("/", "proc"), ("/", "sys")):
        return f"; {resolved.parts[1]} is a virtual file system, choose a directory on disk"
    return ""


def check_home_readable(home: pathlib.Path) -> None:
    """``home`` exists, is a directory, and this user may list it (a client talks to its daemon there)."""
    home = pathlib.Path(home)
    try:
        if not home.is_dir():
            if home.exists():
                raise _error(home, "is not a directory")
            return  # no home: the client says no daemon runs there
        os.listdir(home)
    except OSError as e:
        raise _error(home, "cannot be read", e) from None


def check_data_dir(data: pathlib.Path | None) -> None:
    """An explicitly configured data directory must exist and be readable (a typo must not pass silently)."""
    if data is None:
        return
    data = pathlib.Path(data).expanduser()
    try:
        if not data.exists():
            raise NodeError(f"data directory {data} does not exist; create it, or add data with "
                            f"`swarmnode data add` (which creates it)", EXIT_USAGE)
        if not data.is_dir():
            raise NodeError(f"data directory {data} is not a directory", EXIT_USAGE)
        os.listdir(data)
    except OSError as e:
        raise NodeError(f"data directory {data} cannot be read: {_reason(e)}", EXIT_USAGE) from None


__all__ = ["check_data_dir", "check_home_readable", "check_home_writable"]
