"""The libp2p daemon (hivemind's bundled go-libp2p ``p2pd``) as a child this node fully owns.

hivemind's ``P2P.create`` spawns p2pd in the caller's process group with no parent-death signal, so
  - a Ctrl-C in the terminal reaches p2pd at the same instant as the node, killing the transport
    before the node can withdraw its record, and
  - a node killed with SIGKILL leaves an orphaned p2pd holding its port.
So we launch p2pd ourselves, in its own session and with PR_SET_PDEATHSIG=SIGKILL, then attach
hivemind's client to it with ``P2P.replicate`` (hivemind's supported way to use an external daemon).
The flags are the ones ``P2P.create`` passes for a DHT server node.

Two things would make hivemind print "Unhandled exception in client_connected_cb ... IncompleteReadError" in a
live node: hivemind's client listens on a unix socket (/tmp/hivemind-p2pclient-*.sock) and reads every
connection to it as a stream p2pd hands over (``ControlClient._handler`` reads a StreamInfo first, unguarded), so
  - any other process connecting to that socket and closing it (a liveness probe) costs the node a traceback:
    sweep_stale_sockets never connects to a client socket, it looks sockets up in every network namespace, and
  - p2pd dialing it for a stream while it goes away: stop() withdraws every stream handler from p2pd before
    closing the client, and closes the client before p2pd stops.
"""

from __future__ import annotations

import asyncio
import ctypes
import glob
import importlib.resources
import logging
import os
import secrets
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Sequence

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.utils.multiaddr import Multiaddr

from protocol.relay.routes import RelayRouter

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class P2PDaemonStartError(Exception):
    """p2pd exited or stayed silent at start-up; the message carries its last output line."""


class P2PBootstrapError(P2PDaemonStartError):
    """p2pd refused to start because none of its bootstrap peers could be reached."""


def _die_with_parent() -> None:  # runs in the forked child before exec: keep it to one syscall
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def p2pd_binary() -> str:
    return str(importlib.resources.files("hivemind.hivemind_cli") / "p2pd")


SOCKET_PATTERNS = ("/tmp/swarmnode-p2pd-*.sock", "/tmp/hivemind-p2pclient-*.sock")  # p2pd's, hivemind client's
P2PD_SOCKET_PREFIX = "swarmnode-p2pd-"  # only these may be probed: p2pd ignores a bare connection
STALE_AFTER_S = 60.0


def _bound_unix_paths() -> set[str] | None:
    """Paths of the unix sockets bound in every network namespace this process can see. /proc/net/unix lists
    only our own namespace's, and a node started with ``ip netns exec`` (the netns testbed) binds its sockets
    in another one, so read /proc/PID/net/unix once per namespace. None if not even our own can be read."""
    paths, own_read, seen = set(), False, set()
    try:
        pids = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        pids = []
    for pid in ["self", *pids]:
        try:
            ns = os.readlink(f"/proc/{pid}/ns/net")
            if ns in seen:
                continue
            with open(f"/proc/{pid}/net/unix") as f:
                paths |= {parts[7] for parts in (line.split() for line in f) if len(parts) >= 8}
            seen.add(ns)
            own_read = own_read or pid == "self"
        except OSError:  # gone, or not ours to look at
            continue
    return paths if own_read else None


def sweep_stale_sockets(patterns=SOCKET_PATTERNS, older_than: float = STALE_AFTER_S) -> int:
    """Remove the unix socket files a SIGKILLed node left behind (p2pd's and hivemind's client socket; nothing
    unlinks them when the process dies): this user's sockets matching ``patterns``, older than ``older_than``
    seconds and bound in no network namespace we can see. A p2pd socket must also refuse a connection (a
    process in a namespace we cannot see still accepts one); a hivemind client socket is never connected to,
    since hivemind logs a traceback for every connection that closes without a stream, and is left alone when
    the namespaces cannot be read. Returns how many were removed; every error is skipped."""
    bound, now, removed = _bound_unix_paths(), time.time(), 0
    for path in (p for pattern in patterns for p in glob.glob(pattern)):
        try:
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or now - st.st_mtime < older_than or \
                    path in (bound or ()):
                continue
            if os.path.basename(path).startswith(P2PD_SOCKET_PREFIX):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(0.5)
                    try:
                        probe.connect(path)
                        continue  # alive
                    except ConnectionRefusedError:
                        pass
            elif bound is None:
                continue
            os.unlink(path)
            removed += 1
        except OSError:
            continue
    return removed


class _HandlerTrackingP2P(P2P):
    """hivemind's P2P (``P2P.replicate`` builds ``cls()``) that remembers its registered stream handlers, so
    that OwnedP2PDaemon.stop can withdraw them from p2pd before it closes the client's unix socket; and puts
    ``admit`` (OwnedP2PDaemon.set_admission: a private swarm's node/runtime/admission.py) in front of every
    one of them: a stream from a peer it refuses is closed unread. (The DHT's own RPCs are unary handlers, not
    stream handlers: strangers' records are the validators' to refuse.)"""

    def __init__(self) -> None:
        super().__init__()
        self.stream_handlers: dict[str, Callable] = {}  # protocol -> the gated handler (relayed streams use it too)
        self.admit: Callable[[str], Awaitable[bool]] | None = None
        self.router: RelayRouter | None = None  # set: streams to private peers go through their relays

    async def add_binary_stream_handler(self, name: str, handler, balanced: bool = False) -> None:
        async def gated(info, reader, writer) -> None:
            if self.admit is not None and not await self.admit(info.peer_id.to_base58()):
                writer.close()
                return
            await handler(info, reader, writer)

        await super().add_binary_stream_handler(name, gated, balanced)
        self.stream_handlers[name] = gated

    async def remove_binary_stream_handler(self, name: str) -> None:
        await super().remove_binary_stream_handler(name)
        self.stream_handlers.pop(name, None)

    async def call_binary_stream_handler(self, peer_id: PeerID, handler_name: str):
        """A stream to ``peer_id``: through the router (a private peer: over a relay) when one is set."""
        if self.router is None:
            return await self.raw_stream(peer_id.to_base58(), handler_name)
        return await self.router.dial(peer_id.to_base58(), handler_name)

    async def raw_stream(self, peer: str, handler_name: str):
        """A stream over libp2p itself, never relayed by swarmnode."""
        return await super().call_binary_stream_handler(PeerID.from_base58(peer), handler_name)

    async def connected_peers(self) -> set[str]:
        return {info.peer_id.to_base58() for info in await self.list_peers()}


class OwnedP2PDaemon:
    def __init__(self) -> None:
        self.child: asyncio.subprocess.Process | None = None
        self.p2p: _HandlerTrackingP2P | None = None
        self._reader: asyncio.Task | None = None
        self._socket = f"/tmp/swarmnode-p2pd-{secrets.token_urlsafe(8)}.sock"

    async def start(
        self,
        *,
        identity_path: str | None,
        host_maddrs: Sequence[str],
        announce_maddrs: Sequence[str] = (),
        bootstrap: Sequence[str] = (),
        startup_timeout: float = 15.0,
    ) -> P2P:
        removed = await asyncio.to_thread(sweep_stale_sockets)
        if removed:
            logger.info("removed %d stale p2pd/client sockets left in /tmp by killed nodes", removed)
        args = [
            p2pd_binary(),
            f"-listen=/unix{self._socket}",
            f"-hostAddrs={','.join(host_maddrs)}",
            "-dhtServer=1", "-autoRelay=0", "-autonat=1", "-connManager=1", "-natPortMap=1", "-relay=1",
            "-relayHopLimit=0", "-tls=1", "-idleTimeout=30s", "-persistentConnMaxMsgSize=4194304",
            f"-b={int(bool(bootstrap))}",
        ]
        if identity_path is not None:  # else p2pd makes a throwaway key
            args.append(f"-id={identity_path}")
        if bootstrap:
            args.append(f"-bootstrapPeers={','.join(bootstrap)}")
        if announce_maddrs:
            args.append(f"-announceAddrs={','.join(announce_maddrs)}")
        env = dict(os.environ, GOLOG_LOG_FMT="json")
        env.setdefault("GOLOG_LOG_LEVEL", "error")
        self.child = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            env=env, start_new_session=True, preexec_fn=_die_with_parent,
        )
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_output(ready), name="p2pd-output")
        try:
            await asyncio.wait_for(ready, startup_timeout)
            self.p2p = await _HandlerTrackingP2P.replicate(Multiaddr(f"/unix{self._socket}"))
        except BaseException as e:
            await self.stop()
            if isinstance(e, asyncio.TimeoutError):
                raise P2PDaemonStartError(f"p2pd did not start within {startup_timeout:.0f} s") from None
            raise
        return self.p2p

    def set_admission(self, admit: Callable[[str], Awaitable[bool]] | None) -> None:
        """Serve streams only to peers ``admit`` accepts (None: everyone), the handlers already there included."""
        if self.p2p is None:
            raise RuntimeError("p2pd has not started")
        self.p2p.admit = admit

    async def _read_output(self, ready: asyncio.Future) -> None:
        stdout = self.child.stdout if self.child is not None else None
        if stdout is None:  # start() spawns the child, with stdout a pipe, before it starts this reader
            raise RuntimeError("p2pd's output is not readable")
        last = ""
        while True:
            line = await stdout.readline()
            if not line:
                break
            last = line.decode(errors="replace").strip()
            if last.startswith("Peer ID:") and not ready.done():
                ready.set_result(None)
            logger.debug("p2pd: %s", last)
        if not ready.done():
            error = P2PBootstrapError if "failed to connect to bootstrap peers" in last else P2PDaemonStartError
            ready.set_exception(error(f"p2pd exited at start-up: {last or 'no output'}"))

    async def stop(self, timeout: float = 2.0, handlers_timeout: float = 0.5) -> None:
        """Withdraw the stream handlers still registered (p2pd then refuses new streams instead of dialing our
        client socket), close hivemind's client, then stop p2pd (SIGTERM, SIGKILL after ``timeout``)."""
        if self.p2p is not None:
            if self.child is not None and self.child.returncode is None and self.p2p.stream_handlers:
                names = sorted(self.p2p.stream_handlers)
                try:  # bounded: a frozen p2pd must not eat the shutdown budget
                    results = await asyncio.wait_for(asyncio.gather(
                        *(self.p2p.remove_binary_stream_handler(n) for n in names), return_exceptions=True),
                        handlers_timeout)
                    failed = [n for n, r in zip(names, results) if isinstance(r, Exception)]
                except TimeoutError:
                    failed = names
                if failed:
                    logger.debug("could not withdraw stream handlers %s from p2pd", failed)
            await self.p2p.shutdown()  # closes the client side (our child is not hivemind's to kill)
            await asyncio.sleep(0)  # let hivemind's cancelled listen task close its unix server
        if self.child is not None and self.child.returncode is None:
            self.child.terminate()
            try:
                await asyncio.wait_for(self.child.wait(), timeout)
            except TimeoutError:
                self.child.kill()
                await self.child.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        try:
            os.unlink(self._socket)
        except FileNotFoundError:
            pass
