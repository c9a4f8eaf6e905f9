"""The node's Ed25519 identity: created on first run (mode 0600), refused when others can read it.

The same key signs the node's DHT records and is its libp2p identity, so the peer id (12D3KooW...)
is stable across restarts and embeds the public key that verifies the node's records.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import stat

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from protocol.records.peer_keys import libp2p_private_key


def load_or_create_key(path: pathlib.Path) -> tuple[Ed25519PrivateKey, bool]:
    """Return (key, created). Creates the key and its directory (0700) if the file does not exist."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(path, pem, mode=0o600)
        return key, True
    if not path.is_file():
        raise NodeError(f"identity key {path} is not a regular file", EXIT_USAGE)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise NodeError(
            f"identity key {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`", EXIT_USAGE
        )
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except PermissionError:
        raise NodeError(f"identity key {path} cannot be read by this user", EXIT_USAGE) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise NodeError(
            f"identity key {path} is corrupt (not a PEM Ed25519 private key); restore it from a backup, "
            "or move it away to start as a new peer", EXIT_USAGE
        ) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise NodeError(f"identity key {path} is not an Ed25519 key ({type(loaded).__name__})", EXIT_USAGE)
    return loaded, False


def write_p2p_identity(key: Ed25519PrivateKey, path: pathlib.Path) -> None:
    """The same key in the marshalled libp2p form that p2pd reads (rewritten on each start)."""
    atomic_write(path, libp2p_private_key(key), mode=0o600)


class HomeLock:
    """An exclusive flock on <home>/node.lock: one daemon per home directory (and so per identity)."""

    def __init__(self, home: pathlib.Path):
        self.path = pathlib.Path(home) / "node.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NodeError(
                f"another swarmnode daemon (pid {holder}) is already running with home {self.path.parent}",
                EXIT_USAGE,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
