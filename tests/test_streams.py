"""protocol/streams.py: length-prefixed frames; the length is checked against the bound before the body."""

from __future__ import annotations

import asyncio
import socket

import pytest

from protocol.streams import HEADER, MAX_FRAME, close_quietly, read_frame, write_frame
from protocol.wire import WireError

GUARD = 5.0  # seconds: a safety net so a wrong implementation fails instead of hanging, never waited out


class FakeWriter:
    """The part of asyncio.StreamWriter that write_frame uses."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.drains = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.buffer += data

    async def drain(self) -> None:
        self.drains += 1

    def close(self) -> None:
        self.closed = True


def reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER, "big") + body


@pytest.mark.parametrize("body", [b"", b"x", b"hello frame", bytes(range(256)) * 40])
def test_round_trip_through_a_fake_writer(body):
    async def main():
        writer = FakeWriter()
        await write_frame(writer, body)
        assert bytes(writer.buffer) == frame(body)
        assert writer.drains == 1
        reader = reader_with(bytes(writer.buffer))
        assert await read_frame(reader, len(body)) == body  # exactly at the bound is fine
        assert reader.at_eof()

    asyncio.run(main())


def test_several_frames_back_to_back():
    bodies = [b"first", b"", b"third" * 100]

    async def main():
        writer = FakeWriter()
        for body in bodies:
            await write_frame(writer, body)
        reader = reader_with(bytes(writer.buffer))
        assert [await read_frame(reader, 1000) for _ in bodies] == bodies
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(reader, 1000)

    asyncio.run(main())


def test_round_trip_over_a_real_socketpair():
    bodies = [b"over a socket", b"", bytes(range(256)) * 1024]  # the last one is larger than socket buffers

    async def main():
        a, b = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=a)
        reader, other_writer = await asyncio.open_connection(sock=b)
        try:
            async def send():
                for body in bodies:
                    await write_frame(writer, body)

            async def receive():
                return [await read_frame(reader, 1 << 20) for _ in bodies]

            _, received = await asyncio.wait_for(asyncio.gather(send(), receive()), GUARD)
            assert received == bodies
        finally:
            for w in (writer, other_writer):
                w.close()
                await w.wait_closed()

    asyncio.run(main())


def test_announced_length_over_the_bound_is_refused_before_the_body():
    async def main():
        # header announces 1000 bytes; only 10 have arrived and the stream stays open: reading the body
        # would block, so a WireError here shows the bound was checked first
        reader = reader_with(frame(b"x" * 1000)[: HEADER + 10], eof=False)
        with pytest.raises(WireError, match="1000-byte frame"):
            await asyncio.wait_for(read_frame(reader, 999), GUARD)
        assert await reader.readexactly(10) == b"x" * 10  # the body was left unread

    asyncio.run(main())


def test_huge_announced_length_allocates_nothing():
    async def main():
        reader = reader_with(b"\xff\xff\xff\xff", eof=False)  # 4 GiB announced
        with pytest.raises(WireError, match="at most 65536"):
            await asyncio.wait_for(read_frame(reader, 65536), GUARD)

    asyncio.run(main())


def test_bound_of_zero_allows_only_empty_frames():
    async def main():
        assert await read_frame(reader_with(frame(b"")), 0) == b""
        with pytest.raises(WireError):
            await read_frame(reader_with(frame(b"a")), 0)

    asyncio.run(main())


@pytest.mark.parametrize(
    "data",
    [
        b"",  # hang-up before anything
        b"\x00\x00",  # inside the header
        frame(b"0123456789")[:-1],  # inside the body
        frame(b"0123456789")[: HEADER],  # header only
    ],
    ids=["empty", "half-header", "body-short-by-one", "header-only"],
)
def test_eof_mid_frame(data):
    async def main():
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(read_frame(reader_with(data), 100), GUARD)

    asyncio.run(main())


def test_write_frame_refuses_more_than_max_frame():
    class Huge(bytes):
        def __len__(self) -> int:
            return MAX_FRAME + 1

    async def main():
        writer = FakeWriter()
        with pytest.raises(ValueError):
            await write_frame(writer, Huge())
        assert writer.buffer == b""  # nothing half-written

    asyncio.run(main())


def test_close_quietly():
    writer = FakeWriter()
    close_quietly(writer)
    assert writer.closed
    close_quietly(None)

    class Failing:
        def close(self):
            raise OSError("already gone")

    close_quietly(Failing())


def test_close_after_peer_waits_for_the_callers_hang_up_and_is_bounded():
    from protocol.streams import close_after_peer

    async def scenario():
        served = asyncio.Event()

        async def handler(reader, writer):
            await write_frame(writer, b"x" * 100_000)
            await close_after_peer(reader, writer, timeout=5.0)
            served.set()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert len(await read_frame(reader, 200_000)) == 100_000
            assert not served.is_set()  # the server still holds the stream open for us
            writer.close()
            await asyncio.wait_for(served.wait(), 5)  # ...and lets go as soon as we hang up
            # a caller that never hangs up costs the server at most the timeout
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            served.clear()
            await read_frame(reader, 200_000)
            await asyncio.wait_for(served.wait(), 10)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
