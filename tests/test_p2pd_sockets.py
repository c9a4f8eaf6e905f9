"""node/runtime/p2pd.py sweep_stale_sockets: the unix socket files a SIGKILLed node leaves in /tmp are removed when the
next node starts, and nothing else is: real sockets bound in a temporary directory."""

from __future__ import annotations

import os
import socket

from node.runtime.p2pd import sweep_stale_sockets


def bound(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


def age(path, seconds: float) -> None:
    st = os.lstat(path)
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds), follow_symlinks=False)


def test_only_old_sockets_nobody_listens_on_are_removed(tmp_path):
    pattern = str(tmp_path / "swarmnode-p2pd-*.sock")
    dead = tmp_path / "swarmnode-p2pd-dead.sock"
    bound(dead).close()  # its process died: the file stays, a connection is refused
    live = bound(tmp_path / "swarmnode-p2pd-live.sock")
    live.listen()
    young = tmp_path / "swarmnode-p2pd-young.sock"
    bound(young).close()
    plain = tmp_path / "swarmnode-p2pd-file.sock"
    plain.write_text("not a socket")
    other = tmp_path / "other-dead.sock"
    bound(other).close()
    try:
        for path in (dead, tmp_path / "swarmnode-p2pd-live.sock", plain, other):
            age(path, 120)
        assert sweep_stale_sockets([pattern], older_than=60) == 1
        assert not dead.exists()
        assert all(p.exists() for p in (tmp_path / "swarmnode-p2pd-live.sock", young, plain, other))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:  # the live one still accepts
            c.connect(str(tmp_path / "swarmnode-p2pd-live.sock"))
        assert sweep_stale_sockets([pattern], older_than=0) == 1  # the young dead one, once old enough
    finally:
        live.close()
