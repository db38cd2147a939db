"""The Kong vault ``kong.vaults.sidecar`` in real nginx + Lua against the real daemon.

Each test starts the daemon and nginx; nginx resolves Kong references through Kong's
vault call sequence (``tests/kong/lua/pdk_shim.lua``) and the vault asks the daemon over
its Unix socket with cosockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.backends.vault_server import FakeVault
from tests.canary import value
from tests.integration.conftest import SECRETS, MakeDaemon
from tests.integration.harness import Daemon, wait_until
from tests.kong.conftest import MakeNginx, missing
from tests.kong.sockets import CountingProxy, silent_server

PROD_CREDS = {"username": "app", "password": value("prod-db")}
ENV = {
    "PROD_DB/CREDS": json.dumps(PROD_CREDS),  # the aws-prod vault's db/creds (env, prefix PROD_)
    "A+B C": "plus-and-space",
    "X%41": "percent",
}
VAULTS = [
    {"prefix": "aws-prod", "name": "env", "config": {"prefix": "PROD_"}},
    {"prefix": "still", "name": "env", "config": {"ttl": 0}},
]


def reads(daemon: Daemon) -> list[str]:
    """The references the daemon was asked for, from its audit log."""
    return [e["ref"] for e in daemon.log_events() if e.get("event") == "secret.read"]


async def sidecar(make_daemon: MakeDaemon, **config: Any) -> Daemon:
    return await make_daemon({"vaults": VAULTS, **config}, ENV).started()


async def test_value_with_the_sidecars_remaining_ttl(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """A reference without key comes back as the value, with the sidecar's remaining
    freshness as Kong's ttl (whole seconds); a vault the sidecar never rotates (ttl 0)
    gives no ttl, so Kong falls back to its own."""
    daemon = await sidecar(make_daemon)
    nginx = make_nginx(base={"socket_path": str(daemon.socket)})
    answer = await nginx.kong("{vault://sidecar/env/db-password/}")
    assert answer["value"] == SECRETS["DB_PASSWORD"]
    assert "err" not in answer
    assert answer["ttl"] in (299, 300)  # cache.ttl 300, floored
    assert "ttl" not in await nginx.kong("{vault://sidecar/still/db-password/}")


async def test_ttl_shrinks_as_the_sidecars_value_ages(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """Kong's ttl follows the sidecar's clock: each read returns what is left, not the
    configured ttl, so Kong rotates when the sidecar's value is due."""
    daemon = await sidecar(make_daemon, cache={"ttl": 3})
    nginx = make_nginx(base={"socket_path": str(daemon.socket)})
    ref = "{vault://sidecar/env/db-password/}"
    first: int = (await nginx.kong(ref))["ttl"]
    assert first in (2, 3)
    seen = [first]

    async def shrunk() -> bool:
        ttl: int = (await nginx.kong(ref))["ttl"]
        seen.append(ttl)
        return ttl < first

    await wait_until(shrunk, 3, "the ttl to shrink")
    assert seen[-1] >= 1
    assert seen == sorted(seen, reverse=True)


async def test_json_key_is_extracted_by_kong_from_the_whole_secret(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """The vault asks for the whole secret (trailing /) and Kong takes the key from the
    JSON, with Kong's own message for a missing key; both keys come from one secret."""
    daemon = await sidecar(make_daemon)
    nginx = make_nginx(base={"socket_path": str(daemon.socket)})
    assert (await nginx.kong("{vault://sidecar/env/db-json/password}"))["value"] == "p4ss"
    assert (await nginx.kong("{vault://sidecar/env/db-json/username}"))["value"] == "app"
    missing = await nginx.kong("{vault://sidecar/env/db-json/nope}")
    assert missing == {"err": "could not get subfield value: subfield nope not found in JSON "
                              "secret", "pid": missing["pid"]}  # fmt: skip
    assert set(reads(daemon)) == {"{vault://env/db-json/}"}


async def test_version_is_sent_as_a_fragment(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """``#2`` reaches the sidecar as ``#2``: the env backend's previous value."""
    daemon = await sidecar(make_daemon)
    nginx = make_nginx(base={"socket_path": str(daemon.socket)})
    answer = await nginx.kong("{vault://sidecar/env/db-password/#2}")
    assert answer["value"] == SECRETS["DB_PASSWORD_PREVIOUS"]
    assert reads(daemon) == ["{vault://env/db-password/#2}"]


async def test_a_vault_entity_keeps_existing_references(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """A Kong vault entity ``{prefix: aws-prod, name: sidecar, config: {vault: aws-prod}}``
    resolves ``{vault://aws-prod/db/creds/password}`` unchanged, by asking the sidecar for
    ``{vault://aws-prod/db/creds/}``; without ``vault``, the first segment names the
    sidecar vault and gives the same secret."""
    daemon = await sidecar(make_daemon)
    entity = {"name": "sidecar", "config": {"vault": "aws-prod", "socket_path": str(daemon.socket)}}
    nginx = make_nginx(entities={"aws-prod": entity}, base={"socket_path": str(daemon.socket)})
    by_entity = await nginx.kong("{vault://aws-prod/db/creds/password}")
    assert by_entity["value"] == PROD_CREDS["password"]
    assert (await nginx.kong("{vault://aws-prod/db/creds/username}"))["value"] == "app"
    by_name = await nginx.kong("{vault://sidecar/aws-prod/db/creds/password}")
    assert by_name["value"] == PROD_CREDS["password"]
    assert set(reads(daemon)) == {"{vault://aws-prod/db/creds/}"}
    unnamed = await nginx.kong("{vault://sidecar/db-password}")  # Kong: resource "db-password"
    assert "names no sidecar vault" in unnamed["err"]
    assert "trailing /" in unnamed["err"]


async def test_decoded_characters_reach_the_sidecar_as_kong_decoded_them(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """Kong hands the vault a percent-decoded secret id; the vault encodes it again so the
    sidecar, which decodes as Kong does, reads the same id: ``+``, a space and a literal
    ``%41`` survive, and no id can add a query or a version to the reference."""
    daemon = await sidecar(make_daemon)
    nginx = make_nginx(base={"socket_path": str(daemon.socket)})
    plus = await nginx.kong("{vault://sidecar/env/a%252Bb%2520c/}")  # Kong: "env/a+b c"
    assert plus["value"] == "plus-and-space"
    percent = await nginx.kong("{vault://sidecar/env/x%252541/}")  # Kong: "env/x%41"
    assert percent["value"] == "percent"
    injected = await nginx.kong("{vault://sidecar/env/db-password%253Fttl=1/}")
    assert "not_found" in injected["err"]  # the id "db-password?ttl=1", not a query


INIT = """
    local value, err, ttl = require("pdk_shim").resolve("{vault://sidecar/env/db-password/}")
    INIT_RESULT = { value = value, err = err, ttl = ttl, phase = ngx.get_phase() }
"""


async def test_references_resolved_in_init_use_luasocket(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """Kong warms a DB-less config's references up in init, where cosockets do not
    work: there the vault reads through LuaSocket (Kong ships it); without LuaSocket it
    fails with an error saying so, instead of raising out of Kong's init."""
    daemon = await sidecar(make_daemon)
    base = {"socket_path": str(daemon.socket)}
    nginx = make_nginx(base=base, init=INIT)
    async with aiohttp.ClientSession() as session, session.get(nginx.url + "/init") as r:
        warmed = await r.json()
    if "(socket.unix) is not installed" in warmed.get("err", ""):
        missing("LuaSocket (lua-socket)")
    assert warmed["phase"] == "init"
    assert warmed["value"] == SECRETS["DB_PASSWORD"]
    assert warmed["ttl"] in (299, 300)
    without = make_nginx(base=base, init='package.preload["socket.unix"] = error' + INIT)
    async with aiohttp.ClientSession() as session, session.get(without.url + "/init") as r:
        failed = await r.json()
    assert "value" not in failed
    assert failed["err"] == (
        "no value found (secret-sidecar: daemon_unreachable: cosockets are not available in"
        " the init phase and LuaSocket (socket.unix) is not installed)"
    )


async def test_not_found_is_nil_and_an_error_with_the_code(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """A secret the sidecar does not have: no value, Kong's "no value found" around the
    sidecar's code and message."""
    daemon = await sidecar(make_daemon)
    nginx = make_nginx(base={"socket_path": str(daemon.socket)})
    answer = await nginx.kong("{vault://sidecar/env/missing/}")
    assert "value" not in answer
    assert answer["err"] == (
        "no value found (secret-sidecar: not_found: environment variable MISSING is not set)"
    )


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    server = FakeVault()
    server.enable_kv("secret", "v1")
    server.put("secret", "api", {"token": value("api-token")})
    server.start()
    yield server
    server.stop()


def hcv_config(server: FakeVault, ttl: float) -> dict[str, Any]:
    token = server.create_token()
    hv = {
        "prefix": "hv",
        "name": "hcv",
        "config": {"port": server.port, "token": token, "ttl": ttl},
    }
    return {"vaults": [hv], "cache": {"backend_retries": 0, "backend_timeout": 2}}


async def test_backend_unavailable_is_nil_and_an_error_with_the_code(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, vault: FakeVault
) -> None:
    """A sealed Vault with nothing cached: the sidecar's 503 ``backend_unavailable``."""
    daemon = await make_daemon(hcv_config(vault, 60)).started()
    vault.sealed = True
    nginx = make_nginx(base={"socket_path": str(daemon.socket)})
    answer = await nginx.kong("{vault://sidecar/hv/api/token}")
    assert "value" not in answer
    assert answer["err"].startswith("no value found (secret-sidecar: backend_unavailable: ")


async def test_a_stale_value_is_served_and_noticed_without_the_value(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, vault: FakeVault
) -> None:
    """The backend goes down after the value was cached with a 1 s ttl: Kong keeps
    getting the value, with ttl 1 (asked again soon), and nginx logs a notice that names
    the reference and never the value."""
    daemon = await make_daemon(hcv_config(vault, 1)).started()
    nginx = make_nginx(base={"socket_path": str(daemon.socket)})
    ref = "{vault://sidecar/hv/api/token}"
    assert (await nginx.kong(ref))["value"] == value("api-token")
    vault.sealed = True
    answers: list[dict[str, Any]] = []

    async def noticed() -> bool:
        answers.append(await nginx.kong(ref))
        return "served a stale value" in nginx.logs()

    await wait_until(noticed, 5, "a stale notice in the nginx log")
    assert answers[-1]["value"] == value("api-token")
    assert answers[-1]["ttl"] == 1
    notice = next(line for line in nginx.logs().splitlines() if "stale value" in line)
    assert "[notice]" in notice
    assert "{vault://hv/api/}" in notice
    # the log is scanned for the value's canary when nginx stops (tests/kong/nginx.py)


async def test_missing_socket(make_nginx: MakeNginx, tmp_path: Path) -> None:
    """No daemon: an error naming the socket and the failure, within the timeout."""
    nginx = make_nginx(base={"socket_path": str(tmp_path / "absent.sock")})
    answer = await nginx.kong("{vault://sidecar/env/db-password/}")
    assert "value" not in answer
    assert "secret-sidecar: daemon_unreachable: " in answer["err"]
    assert f"{tmp_path / 'absent.sock'}: connect: no such file or directory" in answer["err"]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may traverse (the temp dirs are 0700): a denial below comes
    from the socket's own mode, not from its path."""
    path = Path(tempfile.mkdtemp(prefix="kong-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_permission_denied_on_a_root_socket(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, open_dir: Path
) -> None:
    """nginx workers run as nobody: a 0660 root socket refuses them (an error, no
    value); the same socket given nobody's group lets them in."""
    if os.geteuid() != 0:
        pytest.skip("needs root: workers switch to nobody only under a root master")
    closed = await make_daemon({"listen": {"socket": str(open_dir / "root.sock")}}).started()
    shared = await make_daemon(
        {"listen": {"socket": str(open_dir / "group.sock"), "group": "nogroup"}}
    ).started()
    assert closed.socket.stat().st_mode & 0o777 == 0o660
    nginx = make_nginx(base={"socket_path": str(closed.socket)}, as_root=False)
    denied = await nginx.kong("{vault://sidecar/env/db-password/}")
    assert "value" not in denied
    assert f"{closed.socket}: connect: permission denied" in denied["err"]
    allowed = await nginx.openresty("{vault://env/db-password}", socket=str(shared.socket))
    assert allowed["value"] == SECRETS["DB_PASSWORD"]


async def test_a_hung_sidecar_is_bounded_by_the_timeout(
    make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """A socket that accepts and never answers: the error comes after conf.timeout (a
    vault entity's 300 ms), not after nginx's or the test's own timeouts."""
    path = tmp_path / "hung.sock"
    async with silent_server(path) as accepted:
        entity = {"name": "sidecar", "config": {"vault": "env", "socket_path": str(path),
                                                "timeout": 300}}  # fmt: skip
        nginx = make_nginx(entities={"hung": entity})
        started = time.monotonic()
        answer = await nginx.kong("{vault://hung/db-password/}")
        elapsed = time.monotonic() - started
        assert len(accepted) == 1
    assert "value" not in answer
    assert "daemon_unreachable" in answer["err"]
    assert "timeout" in answer["err"]
    assert 0.29 <= elapsed < 1.5


async def test_connections_are_reused(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """Fifty gets in a row from one worker use one connection to the daemon, through
    the cosocket keep-alive pool; the daemon sees fifty requests on it."""
    daemon = await sidecar(make_daemon)
    proxy = CountingProxy(tmp_path / "proxy.sock", daemon.socket)
    async with proxy.running():
        nginx = make_nginx(base={"socket_path": str(proxy.path)})
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                answer = await nginx.kong("{vault://sidecar/env/db-password/}", session)
                assert answer["value"] == SECRETS["DB_PASSWORD"]
        assert proxy.accepted == 1
    assert await secret_reads(daemon) == 50


async def secret_reads(daemon: Daemon) -> float:
    """``GET /v1/secrets`` answered 200, as the daemon counts them."""
    for family in text_string_to_metric_families(await daemon.metrics()):
        for sample in family.samples:
            if sample.name == "secret_sidecar_requests_total" and sample.labels == {
                "endpoint": "/v1/secrets",
                "code": "200",
            }:
                return sample.value
    return 0.0


async def test_several_workers_at_once(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """Two nginx workers answer 60 parallel requests, each worker through its own pool:
    every answer is the right value, and no more connections than requests in flight."""
    daemon = await sidecar(make_daemon)
    proxy = CountingProxy(tmp_path / "proxy.sock", daemon.socket)
    refs = {"{vault://sidecar/env/db-password/}": SECRETS["DB_PASSWORD"],
            "{vault://sidecar/env/db-json/username}": "app",
            "{vault://sidecar/aws-prod/db/creds/password}": PROD_CREDS["password"]}  # fmt: skip
    async with proxy.running():
        nginx = make_nginx(base={"socket_path": str(proxy.path)}, workers=2)
        # a new TCP connection per request, so that both workers take some
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            jobs = [(ref, nginx.kong(ref, session)) for ref in list(refs) * 20]
            answers = await asyncio.gather(*(job for _, job in jobs))
        pairs = zip(jobs, answers, strict=True)
        wrong = [(ref, a) for (ref, _), a in pairs if a.get("value") != refs[ref]]
        assert wrong == []
        assert len({a["pid"] for a in answers}) == 2
        assert 2 <= proxy.accepted <= 60
