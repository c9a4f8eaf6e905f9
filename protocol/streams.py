"""Length-prefixed frames on libp2p byte streams (hivemind P2P binary stream handlers).

A frame is a 4-byte big-endian length followed by that many bytes. The reader checks the length
against the caller's bound *before* reading the body, so a peer cannot make us buffer more than we
expect from it.
"""

from __future__ import annotations

import asyncio

from protocol.wire import WireError

HEADER = 4
MAX_FRAME = 2**31 - 1


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


async def close_after_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float = 2.0,
                           max_bytes: int = 65536) -> None:
    """Close a served stream once the caller has hung up (or after ``timeout``, or ``max_bytes`` of anything
    more from it). Closing our end right after writing a reply lets p2pd's stream relay reset the stream with
    the reply's tail still unsent: under load the caller then reads a truncated frame."""
    try:
        left, deadline = max_bytes, asyncio.get_running_loop().time() + timeout
        while left > 0:
            chunk = await asyncio.wait_for(reader.read(min(left, 4096)), max(0.0, deadline - asyncio.get_running_loop().time()))
            if not chunk:  # EOF: the caller has everything and closed
                break
            left -= len(chunk)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass
    finally:
        close_quietly(writer)
