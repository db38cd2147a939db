"""The physical floor: the least a server can do to answer our API's cached reads.

A raw ``asyncio.Protocol`` on uvloop over a Unix socket, answering
``GET /v1/secrets?ref=...`` and ``POST /v1/secrets:batch`` from a dict, in the same
JSON shape as the daemon, with keep-alive and nothing else: no routing, no limits,
no access checks, no logs, no metrics. Whatever the daemon costs beyond this is ours.

    python -m bench.floor --socket /tmp/floor.sock --secrets 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import uvloop

from bench.workload import secrets_env

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "


class Floor(asyncio.Protocol):
    def __init__(self, values: dict[str, str], answers: dict[tuple[str, bytes], bytes]) -> None:
        self.values = values
        self.answers = answers  # (target, body) -> response: a cache hit costs a dict lookup
        self.buffer = b""
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            method, target, _ = head.split(" ", 2)
            self.answer(method, target, body)

    def answer(self, method: str, target: str, body: bytes) -> None:
        response = self.answers.get((target, body))
        if response is None:
            response = self.answers[(target, body)] = self.render(method, target, body)
        self.transport.write(response)

    def render(self, method: str, target: str, body: bytes) -> bytes:
        if method == "POST":
            refs = json.loads(body)["refs"]
            document: object = {"results": [self.one(ref) for ref in refs]}
        else:
            document = self.one(parse_qs(urlsplit(target).query)["ref"][0])
        payload = json.dumps(document).encode()
        return _OK + str(len(payload)).encode() + b"\r\n\r\n" + payload

    def one(self, ref: str) -> dict[str, object]:
        name = ref[len("{vault://env/") : -1]
        name, _, key = name.partition("/")
        value = self.values[name.upper().replace("-", "_")]
        if key:
            value = json.loads(value)[key]
        return {"ref": ref, "value": value, "version": None, "cached": True, "stale": False,
                "age_seconds": 1.0, "expires_in_seconds": 299.0}  # fmt: skip


async def serve(path: str, values: dict[str, str]) -> None:
    loop = asyncio.get_running_loop()
    answers: dict[tuple[str, bytes], bytes] = {}
    server = await loop.create_unix_server(lambda: Floor(values, answers), path, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--secrets", type=int, default=1000)
    args = parser.parse_args()
    values = secrets_env(args.secrets)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    uvloop.run(serve(args.socket, values))


if __name__ == "__main__":
    main()
