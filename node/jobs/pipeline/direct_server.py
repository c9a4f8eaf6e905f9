"""The host's side of the direct data path: forward and backward frames over a plain TCP listener beside p2pd.

    direct = DirectServer(config, serve, bound, "stage 1")   # serve(kind, peer, frame) -> reply frame
    await direct.start(p2p)                                   # listens at config.direct_host or the libp2p IP
    offer = direct.offer(peer)                                # a session for a peer libp2p authenticated
    direct.stop()

p2pd relays every libp2p byte through a unix socket (~8 ms per 1 MiB hop); a trainer that asked for a session
over the authenticated libp2p control stream (DirectOpen -> DirectOffer, node/jobs/pipeline/stage_host.py) sends
its hops here instead, sealed (protocol/pipeline/direct.py: AES-256-GCM under the session's key).

Why it is built this way -- what a stranger on the listener could do:
  * Connect and send anything: a connection serves nothing until its first frame names a session this host
    offered over libp2p (to the peer that asked: its frames act as that peer's) and opens under that
    session's key; any refused frame (unknown or reused session, wrong session id, replayed or reordered
    sequence number, bad tag, a declared length over the bound) closes the connection with a log line, and a
    session is bound to the first connection that uses it.
  * Hoard sessions or connections: offers not yet used are bounded (``direct_sessions``, oldest dropped) and
    expire after ``direct_session_ttl``; open connections are bounded (``direct_connections``) and an idle one
    is closed after ``direct_idle``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from hivemind.p2p import P2P

from node.jobs.pipeline.stage_config import StageConfig
from node.jobs.pipeline.stage_state import Refused
from protocol import rejections
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.control import DirectOffer
from protocol.pipeline.direct import (
    FORWARD,
    REPLY,
    REQUESTS,
    TAG_SIZE,
    DirectChannel,
    maddr_ips,
    new_session,
    read_header,
    send_sealed,
)
from protocol.streams import close_quietly
from protocol.wire import WireError

logger = logging.getLogger(__name__)


class DirectServer:
    def __init__(self, config: StageConfig, serve: Callable[[str, str, bytes], Awaitable[bytes]],
                 bound: Callable[[str], int], label: str, clock: Clock = SYSTEM_CLOCK):
        self.config, self._serve, self._bound, self.label, self.clock = config, serve, bound, label, clock
        self._server: asyncio.Server | None = None
        self.endpoint: tuple[str, int] | None = None  # (IP, port) of the listener, once started
        self._sessions: collections.OrderedDict[bytes, tuple[bytes, str, float]] = collections.OrderedDict()
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self, p2p: P2P) -> None:
        host = self.config.direct_host
        if host is None:
            try:
                ips = maddr_ips(await p2p.get_visible_maddrs())
            except ValueError:
                ips = []
            host = ips[0] if ips else "127.0.0.1"
        try:
            self._server = await asyncio.start_server(self._on_connection, host, 0)
        except OSError as e:
            logger.warning("%s: no direct path (cannot listen on %s: %s); hops use libp2p", self.label, host, e)
            return
        self.endpoint = (host, self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Close the listener and every connection (hops go on over libp2p)."""
        if self._server is not None:
            self._server.close()
            self._server, self.endpoint = None, None
        for writer in list(self._conns):
            close_quietly(writer)
        self._conns.clear()
        self._sessions.clear()

    def offer(self, peer: str) -> DirectOffer:
        """A fresh session for ``peer`` (authenticated by libp2p) on this listener."""
        if self.endpoint is None:
            raise Refused("no direct path on this replica")
        now = self.clock.monotonic()
        for sid in [s for s, (_, _, expires) in self._sessions.items() if expires < now]:
            del self._sessions[sid]
        while len(self._sessions) >= self.config.direct_sessions:
            self._sessions.popitem(last=False)
        key, sid = new_session()
        self._sessions[sid] = (key, peer, now + self.config.direct_session_ttl)
        return DirectOffer(self.endpoint[0], self.endpoint[1], sid, key)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direct connection: sealed requests in, sealed replies out, one at a time, until the peer hangs up
        or sends a frame that is refused (then the connection is closed: the trainer falls back to libp2p)."""
        host, port = tuple(writer.get_extra_info("peername") or ("?", "?"))[:2]
        addr = f"{host}:{port}"
        if len(self._conns) >= self.config.direct_connections:
            logger.warning("%s: refused a direct connection from %s: %d open", self.label, addr,
                           len(self._conns))
            close_quietly(writer)
            return
        self._conns.add(writer)
        channel, peer = None, None
        try:
            while True:
                try:
                    header, head = await asyncio.wait_for(
                        read_header(reader, REQUESTS, max(self._bound("forward"), self._bound("backward"))),
                        self.config.direct_idle if channel is not None else self.config.io_timeout)
                    kind = "forward" if head.kind == FORWARD else "backward"
                    if head.length > self._bound(kind) + TAG_SIZE:
                        raise WireError(f"direct header: peer announced a {head.length}-byte {kind} body; at most "
                                        f"{self._bound(kind) + TAG_SIZE} expected here")
                    if channel is None:  # the first frame binds the connection to an offered session, once
                        key, peer, expires = self._sessions.pop(head.session, (None, None, 0.0))
                        if key is None or expires < self.clock.monotonic():
                            raise WireError("direct frame: unknown, used or expired session id")
                        channel = DirectChannel(key, head.session, "host")
                    channel.check(head)
                    body = await asyncio.wait_for(reader.readexactly(head.length), self.config.io_timeout)
                    data = channel.open(header, head, body)
                except WireError as e:
                    rejections.count("pipeline direct frame", e)
                    logger.warning("%s: refused a direct frame from %s (%s); connection closed", self.label,
                                   addr if peer is None else f"{addr}, peer {peer[-8:]}", e)
                    return
                if peer is None:  # the first frame bound it, with the channel
                    raise RuntimeError("direct connection: no peer bound to the channel")
                await send_sealed(writer, channel, REPLY, await self._serve(kind, peer, data))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            logger.debug("direct connection from %s ended: %s", addr, e or type(e).__name__)
        except asyncio.CancelledError:  # the host shutting down
            pass
        except Exception:
            logger.exception("%s: direct connection handler failed", self.label)
        finally:
            self._conns.discard(writer)
            close_quietly(writer)
