"""The real daemon as a subprocess on a real socket, and clients that talk to it.

Every daemon is checked for the canaries of ``tests.canary``, so each integration
test checks the no-leak promise without code of its own:

- every answer read through ``Daemon.session()`` (so ``request``/``get`` too): no
  canary credential anywhere; no canary value except the ``value`` of a successful
  read (``GET /v1/secrets`` 200, the results of a ``POST /v1/secrets:batch`` 200);
- every event of ``Daemon.watch``: the same, a value allowed only with ``include_values``;
- every scrape through ``Daemon.metrics()``, and one last scrape when ``stop`` runs:
  no canary at all;
- the whole log file after the process ends (``stop``): no canary at all.

What the request itself carried (the reference in the query or batch body) may come
back as an echo; it is not counted. The log has no such exemption: references are
logged by design, so tests keep the canaries in values and credentials, not in refs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.payload import BytesPayload

from tests.canary import assert_all_clean, assert_clean, leaks

START_TIMEOUT = 20.0
SECRET_READS = {("GET", "/v1/secrets"), ("POST", "/v1/secrets:batch")}  # value allowed at 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def require_program(name: str) -> str:
    """The path of an external program; under CI its absence fails the test."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required under CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


async def wait_until(predicate: Any, within: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


def _strings(item: Any) -> Iterable[str]:
    """The strings in a decoded JSON document, keys included."""
    if isinstance(item, str):
        yield item
    elif isinstance(item, Mapping):
        for key, child in item.items():
            yield from _strings(key)
            yield from _strings(child)
    elif isinstance(item, list | tuple):
        for child in item:
            yield from _strings(child)


def _without_echoes(text: str, sent: Iterable[str]) -> str:
    """``text`` without the sent strings that hold a canary (raw or JSON-escaped): an
    answer may quote the caller's own reference. Clean sent strings stay, so a short
    one cannot cut a canary apart."""
    for piece in sorted(set(sent), key=len, reverse=True):
        if leaks(piece):
            text = text.replace(json.dumps(piece)[1:-1], "").replace(piece, "")
    return text


def _split_values(method: str, path: str, status: int, document: Any) -> tuple[Any, list[Any]]:
    """The answer without the values it may carry (a successful read's ``value``, each
    ``value`` of a successful batch), and those values; other answers are all rest."""
    if status != 200 or (method, path) not in SECRET_READS or not isinstance(document, dict):
        return document, []
    if path == "/v1/secrets":
        rest = {k: v for k, v in document.items() if k != "value"}
        return rest, [document.get("value")]
    results = document.get("results")
    if not isinstance(results, list):
        return document, []
    values = [r.get("value") for r in results if isinstance(r, dict)]
    stripped = [
        {k: v for k, v in r.items() if k != "value"} if isinstance(r, dict) else r for r in results
    ]
    return {**document, "results": stripped}, values


def _assert_parts_clean(where: str, rest: Any, values: list[Any], sent: Iterable[str]) -> None:
    """No canary at all in ``rest``, no canary credential in ``values`` (JSON-encoded, the
    caller's own sent strings left out); every leak of both reported at once."""
    __tracebackhide__ = True
    sent = list(sent)
    found = [
        *leaks(_without_echoes(json.dumps(rest), sent)),
        *leaks(_without_echoes(json.dumps(values), sent), allow_values=True),
    ]
    if found:
        details = "\n  ".join(found)
        raise AssertionError(f"a canary leaked into {where}:\n  {details}")


def check_answer(
    method: str, path: str, status: int, body: bytes | str, sent: Iterable[str] = ()
) -> None:
    """No canary credential in an answer, and no canary value outside the values a
    successful secret read returns (see the module docstring)."""
    __tracebackhide__ = True
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        document = json.loads(text)
    except ValueError:
        document = text
    rest, values = _split_values(method, path, status, document)
    _assert_parts_clean(f"the answer to {method} {path} ({status})", rest, values, sent)


def check_event(kind: str, data: Any, *, include_values: bool, sent: Iterable[str] = ()) -> None:
    """A watch event: no canary credential; a canary value only as the ``value`` of an
    event on a stream that asked for values."""
    __tracebackhide__ = True
    values: list[Any] = []
    if include_values and isinstance(data, dict) and "value" in data:
        values = [data["value"]]
        data = {k: v for k, v in data.items() if k != "value"}
    _assert_parts_clean(f"a {kind!r} watch event", data, values, sent)


async def _scan_answers(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: read each (non-streaming) answer and ``check_answer`` it."""
    response = await handler(request)
    if response.content_type == "text/event-stream":
        return response  # read event by event (Daemon.watch)
    body = await response.read()  # cached: the caller's .json()/.text() read it again
    sent = [request.url.path, *request.url.query.values()]
    if isinstance(request.body, BytesPayload):
        raw = request.body.decode(errors="replace")
        with contextlib.suppress(ValueError):
            sent += list(_strings(json.loads(raw)))
    try:
        check_answer(request.method, request.url.path, response.status, body, sent)
    except AssertionError:
        response.release()
        raise
    return response


class Daemon:
    """``python -m sidecar run -c <file>`` in a temp dir; stderr (the logs) kept in a file."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.socket = Path(config.get("listen", {}).get("socket", workdir / "sidecar.sock"))
        self.metrics_port = free_port()
        config.setdefault("listen", {}).setdefault("socket", str(self.socket))
        config.setdefault("metrics", {"address": f"127.0.0.1:{self.metrics_port}"})
        self.config_path = workdir / "config.yaml"
        self.write_config(config)
        self.log_path = workdir / "daemon.log"
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen[bytes] | None = None
        self._log_checked = True  # nothing to check before the first start

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config))
        metrics = config.get("metrics")
        # scraped at stop only where this config says: the default port may be another's
        self.metrics_address = metrics.get("address") if isinstance(metrics, dict) else None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        self._log_checked = False
        return self.process

    async def started(self) -> Daemon:
        self.start()
        await wait_until(self._answers, START_TIMEOUT, "the daemon to answer /healthz")
        return self

    async def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.logs()}")
        if not self.socket.exists():
            return False
        try:
            status, _ = await self.request("GET", "/healthz")
        except aiohttp.ClientError:
            return False
        return status == 200

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM and wait; then the last scrape and the whole log are checked for
        canaries (once per start: a second ``stop`` does not report them again)."""
        __tracebackhide__ = True
        scrape = self._last_scrape()
        try:
            return self._terminate()
        finally:
            if not self._log_checked:
                self._log_checked = True
                texts = [(f"the daemon log {self.log_path}", self.logs())]
                if scrape is not None:
                    texts.append(("the metrics scraped at stop", scrape))
                assert_all_clean(texts)

    def _terminate(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def _last_scrape(self) -> str | None:
        """The metrics of a running daemon with a metrics address, else None."""
        if self.process is None or self.process.poll() is not None or not self.metrics_address:
            return None
        url = f"http://{self.metrics_address}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text: str = response.read().decode(errors="replace")
                return text
        except (OSError, urllib.error.URLError):
            return None  # not listening (yet, or any more): nothing to scan

    async def metrics(self) -> str:
        """A scrape of ``/metrics`` (200, text format), checked for canaries."""
        __tracebackhide__ = True
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response,
        ):
            assert response.status == 200
            text = await response.text()
        assert_clean(text, where="a metrics scrape")
        return text

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def session(self) -> aiohttp.ClientSession:
        """A client on the socket whose every answer is checked for canaries."""
        return aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket)),
            timeout=aiohttp.ClientTimeout(total=15),
            middlewares=(_scan_answers,),
        )

    async def request(
        self, method: str, path: str, *, params: Any = None, json_body: Any = None
    ) -> tuple[int, Any]:
        async with (
            self.session() as session,
            session.request(method, f"http://sidecar{path}", params=params, json=json_body) as r,
        ):
            return r.status, await r.json(content_type=None)

    async def get(self, ref: str) -> tuple[int, Any]:
        return await self.request("GET", "/v1/secrets", params={"ref": ref})

    @contextlib.asynccontextmanager
    async def watch(
        self, *refs: str, include_values: bool = False
    ) -> AsyncIterator[AsyncIterator[tuple[str, Any]]]:
        """``GET /v1/watch`` for ``refs``: yields the stream of (event, data) pairs, a
        ``: comment`` as ("comment", {"comment": text}); each is ``check_event``-ed."""
        params = [("ref", ref) for ref in refs]
        if include_values:
            params.append(("include_values", "true"))
        async with (
            self.session() as session,
            session.get("http://sidecar/v1/watch", params=params) as response,
        ):
            assert response.status == 200, await response.text()
            yield self._events(response, include_values, refs)

    @staticmethod
    async def _events(
        response: aiohttp.ClientResponse, include_values: bool, refs: Iterable[str]
    ) -> AsyncIterator[tuple[str, Any]]:
        async for kind, document in events(response):
            if kind != "comment":
                check_event(kind, document, include_values=include_values, sent=refs)
            yield kind, document


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """Parse a text/event-stream: yield (event, data) and ("comment", {"comment": text})."""
    kind, data = "message", ""
    while line := (await response.content.readline()).decode():
        line = line.rstrip("\n")
        if line.startswith(":"):
            yield "comment", {"comment": line[1:].strip()}
        elif line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line:
            yield kind, json.loads(data)
            kind, data = "message", ""
