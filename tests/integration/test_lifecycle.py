"""Start, readiness, reload, drain and stop of a real daemon process."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
from pathlib import Path
from typing import Any

from tests.backends.vault_server import FakeVault
from tests.canary import value
from tests.integration.conftest import SECRETS, MakeDaemon
from tests.integration.harness import Daemon, free_port, wait_until


async def _ready(daemon: Daemon) -> tuple[int, Any]:
    return await daemon.request("GET", "/readyz")


async def test_readiness_waits_for_prefetch_and_reload_fixes_it(make_daemon: MakeDaemon) -> None:
    """/readyz is 503 naming the missing prefetch ref; a SIGHUP with a fixed config makes it 200."""
    config: dict[str, Any] = {"prefetch": ["{vault://env/not-there-yet}"]}
    daemon = await make_daemon(config).started()

    async def prefetch_tried() -> bool:
        return "startup" not in (await _ready(daemon))[1].get("missing", {})

    await wait_until(prefetch_tried, what="the first prefetch attempt")
    status, body = await _ready(daemon)
    assert status == 503
    assert body["missing"] == {
        "ref:{vault://env/not-there-yet}": "environment variable NOT_THERE_YET is not set"
    }
    daemon.write_config({**config, "prefetch": ["{vault://env/db-password}"]} | _keep(daemon))
    daemon.signal(signal.SIGHUP)

    async def is_ready() -> bool:
        return (await _ready(daemon))[0] == 200

    await wait_until(is_ready, what="readiness after reload")
    _, answer = await daemon.get("{vault://env/db-password}")
    assert answer["cached"] is True  # prefetched


def _keep(daemon: Daemon) -> dict[str, Any]:
    """The listen/metrics part of the config the daemon was started with."""
    return {
        "listen": {"socket": str(daemon.socket)},
        "metrics": {"address": f"127.0.0.1:{daemon.metrics_port}"},
    }


async def test_reload_keeps_entries_of_unchanged_vaults(make_daemon: MakeDaemon) -> None:
    """After SIGHUP, an unchanged vault's entries are still cached; a changed vault's are not."""
    vaults = [
        {"prefix": "keep", "name": "env", "config": {"prefix": "db_"}},
        {"prefix": "change", "name": "env", "config": {"prefix": "db_"}},
    ]
    daemon = await make_daemon({"vaults": vaults}).started()
    await daemon.get("{vault://keep/password}")
    await daemon.get("{vault://change/password}")
    vaults[1]["config"] = {"prefix": "db_", "ttl": 60}
    daemon.write_config({"vaults": vaults} | _keep(daemon))
    daemon.signal(signal.SIGHUP)
    await wait_until(lambda: _logged(daemon, "config.reloaded"), what="the reload to be logged")
    assert (await daemon.get("{vault://keep/password}"))[1]["cached"] is True
    changed = (await daemon.get("{vault://change/password}"))[1]
    assert (changed["cached"], changed["expires_in_seconds"]) == (False, 60.0)


async def _logged(daemon: Daemon, event: str) -> bool:
    return any(e.get("event") == event for e in daemon.log_events())


async def test_invalid_reload_keeps_old_config(make_daemon: MakeDaemon) -> None:
    """A SIGHUP with a broken file logs the error and keeps serving the old config."""
    vaults = [{"prefix": "app", "name": "env", "config": {"prefix": "db_"}}]
    daemon = await make_daemon({"vaults": vaults}).started()
    daemon.config_path.write_text("vaults: [{prefix: app, name: nope}]")
    daemon.signal(signal.SIGHUP)
    await wait_until(lambda: _logged(daemon, "config.reload_failed"), what="the failed reload")
    status, answer = await daemon.get("{vault://app/password}")
    assert (status, answer["value"]) == (200, SECRETS["DB_PASSWORD"])


async def test_sigterm_answers_in_flight_request_and_removes_socket(
    make_daemon: MakeDaemon,
) -> None:
    """A request in flight when SIGTERM arrives is answered; then the socket file is gone."""
    daemon = await make_daemon().started()
    reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
    body = b'{"refs": ["{vault://env/db-password}"]}'
    writer.write(
        b"POST /v1/secrets:batch HTTP/1.1\r\nHost: s\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:10]
    )
    await writer.drain()
    await wait_until(lambda: _in_flight(daemon), what="the request to be in flight")
    daemon.signal(signal.SIGTERM)
    await wait_until(lambda: _logged(daemon, "draining"), what="drain to start")
    writer.write(body[10:])
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert response.startswith(b"HTTP/1.1 200")
    assert b"hunter2-integration" in response
    assert daemon.process is not None
    assert await asyncio.to_thread(daemon.process.wait, 10) == 0
    assert not daemon.socket.exists()


async def _in_flight(daemon: Daemon) -> bool:
    return bool((await daemon.request("GET", "/v1/status"))[1]["requests_in_flight"] == 1)


async def test_socket_mode_defaults_to_0660_and_follows_config(make_daemon: MakeDaemon) -> None:
    """The socket is 0660 by default and takes the configured mode and group."""
    default = await make_daemon().started()
    assert stat.S_IMODE(default.socket.stat().st_mode) == 0o660
    tight = await make_daemon({"listen": {"mode": "0600", "group": 0}}).started()
    info = tight.socket.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o600, 0)


async def test_stale_socket_file_is_replaced(make_daemon: MakeDaemon) -> None:
    """A socket file with nothing behind it (a crashed daemon's) is removed and rebound."""
    daemon = make_daemon()
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(daemon.socket))
    leftover.close()
    await daemon.started()
    assert (await daemon.get("{vault://env/db-password}"))[0] == 200


async def test_live_socket_makes_second_daemon_fail(make_daemon: MakeDaemon) -> None:
    """A second daemon on a socket a live one serves exits 1 with a clear message."""
    first = await make_daemon().started()
    second = make_daemon({"listen": {"socket": str(first.socket)}})
    process = second.start()
    assert await asyncio.to_thread(process.wait, 20) == 1
    assert "another process is serving on" in second.logs()
    assert (await first.get("{vault://env/db-password}"))[0] == 200


async def test_path_that_is_not_a_socket_is_not_replaced(make_daemon: MakeDaemon) -> None:
    """A regular file at the socket path is left alone and start fails."""
    daemon = make_daemon()
    daemon.socket.write_text("precious")
    process = daemon.start()
    assert await asyncio.to_thread(process.wait, 20) == 1
    assert "exists and is not a socket" in daemon.logs()
    assert daemon.socket.read_text() == "precious"


async def test_sighup_moves_the_metrics_listener_and_applies_watch_limits(
    make_daemon: MakeDaemon,
) -> None:
    """Metrics address and watch settings follow a reload (only listen needs a restart)."""
    daemon = await make_daemon({"watch": {"max_watchers": 4}}).started()
    old_port = daemon.metrics_port
    assert "secret_sidecar_ready" in await daemon.metrics()
    daemon.metrics_port = free_port()
    config = {"listen": {"socket": str(daemon.socket)},
              "metrics": {"address": f"127.0.0.1:{daemon.metrics_port}"},
              "watch": {"max_watchers": 1}}  # fmt: skip
    daemon.write_config(config)
    daemon.signal(signal.SIGHUP)
    await wait_until(lambda: _logged(daemon, "metrics.moved"), what="the metrics listener move")
    assert "secret_sidecar_ready" in await daemon.metrics()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", old_port)) != 0  # the old port is closed
    async with daemon.watch("{vault://env/db-password}"):
        status, body = await daemon.request(
            "GET", "/v1/watch", params={"ref": "{vault://env/db-password}"}
        )
    assert (status, body["error"]["code"]) == (429, "too_many_requests")
    assert not any(e.get("event") == "config.restart_needed" for e in daemon.log_events())


async def test_reads_stay_right_while_the_config_is_reloaded_over_and_over(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """Eight readers for 4 s against an hcv vault (replaced by every reload: its limits
    change) and an env vault, while the config is reloaded every 0.15 s with ttl, limits
    and refresh changing: every answer is 200 with the right value, never an error of a
    closing client, never a 500."""
    server = FakeVault()
    server.enable_kv("kv", "v2")
    server.put("kv", "db", {"password": value("hcv-db")})
    server.start()
    token = server.create_token()
    try:
        configs = [_reloading_config(server.port, token, i) for i in range(4)]
        daemon = await make_daemon(
            configs[0], env={"VAULT_TOKEN": "", "HOME": str(tmp_path)}
        ).started()
        expected = {"{vault://kv/db/password}": value("hcv-db"),
                    "{vault://env/db-password}": SECRETS["DB_PASSWORD"]}  # fmt: skip
        answers: list[tuple[str, int, Any]] = []
        stop = asyncio.Event()

        async def reader() -> None:
            async with daemon.session() as session:
                while not stop.is_set():
                    for ref in expected:
                        params = {"ref": ref}
                        async with session.get("http://s/v1/secrets", params=params) as r:
                            answers.append((ref, r.status, await r.json()))

        readers = [asyncio.ensure_future(reader()) for _ in range(8)]
        for i in range(1, 27):
            daemon.write_config({**configs[i % 4], **_keep(daemon)})
            daemon.signal(signal.SIGHUP)
            await asyncio.sleep(0.15)
        stop.set()
        await asyncio.gather(*readers)
    finally:
        server.stop()
    reloaded = sum(1 for e in daemon.log_events() if e.get("event") == "config.reloaded")
    assert reloaded >= 10
    wrong = [(ref, status, body.get("error")) for ref, status, body in answers
             if status != 200 or body.get("value") != expected[ref]]  # fmt: skip
    assert len(answers) > 200
    assert wrong == [], wrong[:5]


def _reloading_config(port: int, token: str, i: int) -> dict[str, Any]:
    """Four configs a reload cycles through: hcv's limits (so its vault is replaced),
    ttl and refresh on/off differ."""
    hcv = {"prefix": "kv", "name": "hcv", "limits": {"concurrency": 1 + i % 2},
           "config": {"port": port, "token": token, "mount": "kv", "kv": "v2"}}  # fmt: skip
    return {"vaults": [hcv], "cache": {"ttl": 0.2 + 0.1 * i},
            "refresh": {"enabled": i % 4 != 3}}  # fmt: skip
