"""Length-prefixed frames on libp2p byte streams, and the one way streams are opened, served and closed.

A frame is a 4-byte big-endian length followed by that many bytes. The reader checks the length against the
caller's bound *before* reading the body, so a peer cannot make us buffer more than we expect from it.

    async with open_stream(p2p, peer, protocol) as stream:       # the caller's side: closed when the block ends
        await stream.send(request)
        reply = await stream.receive(bound, timeout)
    reply = await request(p2p, peer, protocol, data, bound)       # the same, for one frame each way
    await serve_on(p2p, {protocol: handler}, logger)              # the served side: handler(stream) per stream
    await stop_serving(p2p, [protocol], logger)

Why one helper, one rule: the caller ends every conversation. A caller closes its stream as soon as it is done
with it (it has read the last reply it wants, or written a last frame nobody answers). A served stream whose
handler finished after sending something is closed only after the caller has hung up (bounded in time and
bytes): closing our end right after writing a reply lets p2pd's stream relay reset the stream with the reply's
tail still unsent, and under load the caller then reads a truncated frame (seen on stage hosts' 1 MiB
replies). A served stream that sent nothing, or whose handler was broken off (a bad frame, a timeout, an
error), is closed at once, so a caller waiting for more learns it without waiting for its own timeout. The one
conversation a caller ends by writing (a leader's group plan, sent on each invite stream) closes at once, as
it always did: it is small, and a member that misses it only sits the round out (NoGroup, its update kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from protocol.wire import WireError

HEADER = 4
MAX_FRAME = 2**31 - 1
LINGER_S = 5.0  # a served stream waits at most this long for the caller to hang up
LINGER_BYTES = 65536  # ... and reads (and drops) at most this much more from it meanwhile
# what ends a stream without being anyone's bug: a peer that hangs up, stalls or sends a bad frame
STREAM_ENDINGS = (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, WireError)


async def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    if len(data) > MAX_FRAME:
        raise ValueError(f"frame of {len(data)} bytes is larger than {MAX_FRAME}")
    writer.write(len(data).to_bytes(HEADER, "big"))
    writer.write(data)
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    """Read one frame of at most ``max_bytes``; WireError if the peer announces more, EOF if it hangs up."""
    header = await reader.readexactly(HEADER)
    length = int.from_bytes(header, "big")
    if length > max_bytes:
        raise WireError(f"peer announced a {length}-byte frame; at most {max_bytes} expected here")
    return await reader.readexactly(length)


def close_quietly(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        try:
            writer.close()
        except (OSError, RuntimeError):
            pass


async def close_after_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float = LINGER_S,
                           max_bytes: int = LINGER_BYTES) -> None:
    """Close a stream once the other side has hung up (or after ``timeout``, or ``max_bytes`` of anything more
    from it, which is dropped)."""
    loop = asyncio.get_running_loop()
    try:
        left, deadline = max_bytes, loop.time() + timeout
        while left > 0:
            chunk = await asyncio.wait_for(reader.read(min(left, 4096)), max(0.0, deadline - loop.time()))
            if not chunk:  # EOF: the other side has everything and closed
                break
            left -= len(chunk)
    except (TimeoutError, ConnectionError, OSError, EOFError, WireError):  # the last two: a relayed stream's
        pass  # truncated or forged record (protocol/relay/seal.py), ending it like a hang-up
    finally:
        close_quietly(writer)


class Stream:
    """One libp2p stream, on either side: ``peer`` is the remote peer id libp2p authenticated."""

    def __init__(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, addr: str = ""):
        self.peer, self.reader, self.writer = peer, reader, writer
        self.addr = addr  # the remote address libp2p reports (a served stream's; "/p2p/R/p2p-circuit/..." relayed)
        self.frames_sent = 0
        self.closed = False

    async def send(self, data: bytes) -> None:
        await write_frame(self.writer, data)
        self.frames_sent += 1

    async def receive(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """One frame of at most ``max_bytes`` (WireError if announced larger), within ``timeout`` seconds."""
        if timeout is None:
            return await read_frame(self.reader, max_bytes)
        return await asyncio.wait_for(read_frame(self.reader, max_bytes), timeout)

    def close(self) -> None:
        """Close at once (a served stream's handler hanging up on purpose: nothing lingers after it)."""
        self.closed = True
        close_quietly(self.writer)


def peer_id(peer: PeerID | str) -> PeerID:
    """``peer`` as hivemind's PeerID; ValueError naming it when it is not a base58 peer id."""
    if isinstance(peer, PeerID):
        return peer
    try:
        return PeerID.from_base58(peer)
    except Exception:  # base58 and multihash decoding raise several unrelated types
        raise ValueError(f"not a peer id: {peer!r:.60}") from None


@contextlib.asynccontextmanager
async def open_stream(p2p: P2P, peer: PeerID | str, protocol: str,
                      dial_timeout: float | None = None) -> AsyncIterator[Stream]:
    """A new stream to ``peer`` speaking ``protocol`` (opened within ``dial_timeout`` seconds if given: a peer
    that died since it was last seen), closed when the block ends, however it ends."""
    remote = peer_id(peer)
    dial = p2p.call_binary_stream_handler(remote, protocol)
    _, reader, writer = await (dial if dial_timeout is None else asyncio.wait_for(dial, dial_timeout))
    try:
        yield Stream(remote.to_base58(), reader, writer)
    finally:
        close_quietly(writer)


async def request(p2p: P2P, peer: PeerID | str, protocol: str, data: bytes, max_reply: int) -> bytes:
    """One frame to ``peer`` and its one reply frame of at most ``max_reply`` bytes, on a stream of its own.
    Bound the whole exchange with the caller's own timeout (``asyncio.timeout``)."""
    async with open_stream(p2p, peer, protocol) as stream:
        await stream.send(data)
        return await stream.receive(max_reply)


Handler = Callable[[Stream], Awaitable[None]]


def serve(handler: Handler, log: logging.Logger, what: str = "stream handler") -> Callable:
    """``handler`` as a hivemind binary stream handler that keeps the module docstring's rule: the handler gets
    a Stream from the authenticated remote peer; a peer hanging up, stalling or sending a bad frame ends it with
    a debug line, a cancellation (this node shutting down) quietly, any other failure with a traceback. A
    handler that returned after sending something has its stream closed once the caller hung up; a stream
    that sent nothing, or whose handler was broken off, is closed at once."""

    async def run(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = Stream(info.peer_id.to_base58(), reader, writer, str(info.addr))
        finished = False  # the handler returned: the conversation is over and its last word was ours
        try:
            await handler(stream)
            finished = True
        except STREAM_ENDINGS as e:
            log.debug("stream from %s ended: %s", stream.peer[-8:], e or type(e).__name__)
        except asyncio.CancelledError:  # this node shutting down mid-request: end quietly
            pass
        except Exception:
            log.exception("%s failed", what)
        finally:
            if finished and stream.frames_sent and not stream.closed:
                await close_after_peer(reader, writer)
            else:  # broken off (or nothing sent): a caller waiting for more learns it at once
                close_quietly(writer)

    return run


async def serve_on(p2p: P2P, handlers: Mapping[str, Handler], log: logging.Logger,
                   what: str = "stream handler") -> None:
    """Register each handler (serve) under its protocol name."""
    for name, handler in handlers.items():
        await p2p.add_binary_stream_handler(name, serve(handler, log, what))


async def stop_serving(p2p: P2P, names: Iterable[str], log: logging.Logger) -> None:
    """Withdraw the handlers of ``names``; a p2pd already gone at shutdown is only logged."""
    for name in names:
        try:
            await p2p.remove_binary_stream_handler(name)
        except Exception as e:  # p2pd may already be gone; hivemind raises several types here
            log.debug("could not remove handler %s: %s", name, e)
