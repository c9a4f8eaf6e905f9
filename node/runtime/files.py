"""Crash-safe file writes: temporary file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
import pathlib
import tempfile


def atomic_write(path: pathlib.Path, data: bytes | memoryview, mode: int = 0o600) -> None:
    """``data`` may be a memoryview (of a numpy array: written without a copy, the GIL released meanwhile)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: pathlib.Path) -> None:
    """Make a folder's entries (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
