"""Unix-socket peers the tests put between nginx and the daemon, on the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path


class CountingProxy:
    """Forwards every connection on ``path`` to the daemon's socket and counts them: the
    connections a client opened to the daemon, as the daemon accepted them."""

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CountingProxy]:
        server = await asyncio.start_unix_server(self._serve, path=self.path)
        try:
            yield self
        finally:
            server.close()
            for writer in self._writers:
                writer.close()
            await server.wait_closed()


@contextlib.asynccontextmanager
async def silent_server(path: Path) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """A socket that accepts connections, reads nothing and never answers (a hung daemon);
    yields the accepted connections."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_unix_server(hold, path=path)
    try:
        yield accepted
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


class Connection:
    """One accepted connection of a ``scripted_server``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lines: list[str]
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._lines = lines

    async def request(self) -> str:
        """Read one request's head (these clients send no body); record and return its
        request line."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode()
        self._lines.append(line)
        return line

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Script = Callable[[int, Connection], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_server(path: Path, script: Script) -> AsyncIterator[list[str]]:
    """A socket whose n-th connection (from 0) is handled by ``script(n, connection)``,
    for answers the daemon never sends; yields the request lines read, in order."""
    lines: list[str] = []
    writers: list[asyncio.StreamWriter] = []
    count = iter(range(1000))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await script(next(count), Connection(reader, writer, lines))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=path)
    try:
        yield lines
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
