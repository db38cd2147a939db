"""The Vault-KV facade, read by hvac (an independent Vault client) over real HTTP.

What Kong's bundled ``hcv`` vault relies on: KV v2 and v1 read answers in Vault's
shape, versions, Vault's 404 and 403, a token's rule as the ACL, and nothing but reads.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from tests.backends.vault_server import FakeVault
from tests.canary import value
from tests.integration.conftest import SECRETS, MakeDaemon
from tests.integration.harness import Daemon, free_port, wait_until
from tests.support_jwt import ISSUER, Issuer, claims, rsa_key

TOKEN = value("facade-token-kong-0123456789")
OTHER = "facade-token-other-0123456789"


def facade_config(port: int, kv: str = "v2", **extra: Any) -> dict[str, Any]:
    return {
        "facade": {
            "enabled": True,
            "address": f"127.0.0.1:{port}",
            "kv": kv,
            "tokens": [
                {"name": "kong", "token_env": "FACADE_TOKEN", "allow": ["env/db-*"]},
                {"name": "other", "token_env": "OTHER_TOKEN", "allow": ["env/app-*"]},
            ],
            **extra,
        }
    }


async def facade_daemon(make_daemon: MakeDaemon, kv: str = "v2") -> tuple[Daemon, int]:
    port = free_port()
    env = {"FACADE_TOKEN": TOKEN, "OTHER_TOKEN": OTHER}
    daemon = await make_daemon(facade_config(port, kv), env).started()
    await wait_until(lambda: _listening(port), 10, "the facade to listen")
    return daemon, port


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def client(port: int, token: str | None = TOKEN) -> hvac.Client:
    return hvac.Client(url=f"http://127.0.0.1:{port}", token=token, timeout=10)


def read_v2(port: int, path: str, token: str | None = TOKEN, **options: Any) -> Any:
    v2 = client(port, token).secrets.kv.v2
    return v2.read_secret_version(path, mount_point="secret", raise_on_deleted_version=True,
                                  **options)  # fmt: skip


async def call(fn: Callable[[], Any]) -> Any:
    """hvac is blocking: run it off the test's event loop."""
    return await asyncio.to_thread(fn)


async def test_kv_v2_reads_in_vaults_shape(make_daemon: MakeDaemon) -> None:
    daemon, port = await facade_daemon(make_daemon)
    kv = client(port).secrets.kv.v2
    answer = await call(
        lambda: kv.read_secret_version(
            "env/db-json", mount_point="secret", raise_on_deleted_version=True
        )
    )
    assert answer["data"]["data"] == json.loads(SECRETS["DB_JSON"])
    assert set(answer["data"]["metadata"]) >= {"created_time", "version", "destroyed"}
    assert answer["lease_duration"] > 0
    # a plain-string secret is {"value": ...}, so Kong's key `value` reads it
    plain = await call(
        lambda: kv.read_secret_version(
            "env/db-password", mount_point="secret", raise_on_deleted_version=True
        )
    )
    assert plain["data"]["data"] == {"value": SECRETS["DB_PASSWORD"]}
    # ?version=2 is #2: the env backend's NAME_PREVIOUS
    old = await call(
        lambda: kv.read_secret_version(
            "env/db-password", version=2, mount_point="secret", raise_on_deleted_version=True
        )
    )
    assert old["data"]["data"] == {"value": SECRETS["DB_PASSWORD_PREVIOUS"]}
    # the reads went through the resolver and the audit trail, under the token's name
    reads = [e for e in daemon.log_events() if e.get("event") == "secret.read"]
    assert {e["ref"] for e in reads} >= {
        "{vault://env/db-json/}",
        "{vault://env/db-password/}",
        "{vault://env/db-password/#2}",
    }
    assert {e["client"] for e in reads} == {"kong"}
    metrics = await daemon.metrics()
    assert 'secret_sidecar_requests_total{code="200",endpoint="facade"} 3.0' in metrics


async def test_kv_v1_reads(make_daemon: MakeDaemon) -> None:
    _, port = await facade_daemon(make_daemon, kv="v1")
    kv = client(port).secrets.kv.v1
    answer = await call(lambda: kv.read_secret("env/db-json", mount_point="secret"))
    assert answer["data"] == json.loads(SECRETS["DB_JSON"])
    url = f"http://127.0.0.1:{port}/v1/secret/env/db-json?version=1"
    response = await call(lambda: requests.get(url, headers={"X-Vault-Token": TOKEN}, timeout=10))
    assert response.status_code == 400  # KV v1 has no versions


async def test_vault_errors_as_vault_clients_expect(make_daemon: MakeDaemon) -> None:
    _, port = await facade_daemon(make_daemon)
    kv = client(port).secrets.kv.v2

    def read(path: str, token: str | None = TOKEN) -> Any:
        return client(port, token).secrets.kv.v2.read_secret_version(
            path, mount_point="secret", raise_on_deleted_version=True
        )

    with pytest.raises(hvac.exceptions.InvalidPath):  # 404
        await call(
            lambda: kv.read_secret_version(
                "env/db-absent", mount_point="secret", raise_on_deleted_version=True
            )
        )
    for token in ("wrong-token-0123456789", None):
        with pytest.raises(hvac.exceptions.Forbidden):  # 403, the same whatever exists
            await call(lambda t=token: read_v2(port, "env/db-password", t))  # type: ignore[misc]
    for path in ("env/app-token", "env/absent", "nowhere/x"):  # outside the token's rule
        with pytest.raises(hvac.exceptions.Forbidden):
            await call(lambda p=path: read_v2(port, p))  # type: ignore[misc]
    # another token, another rule
    other = client(port, OTHER).secrets.kv.v2
    answer = await call(
        lambda: other.read_secret_version(
            "env/app-token", mount_point="secret", raise_on_deleted_version=True
        )
    )
    assert answer["data"]["data"] == {"value": SECRETS["APP_TOKEN"]}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/secret/data/env/db-password", 405),  # write
        ("PUT", "/v1/secret/data/env/db-password", 405),
        ("DELETE", "/v1/secret/data/env/db-password", 405),
        ("LIST", "/v1/secret/metadata/env", 400),  # not even parsed: no such HTTP method
        ("GET", "/v1/secret/metadata/env/db-password", 404),
        ("GET", "/v1/sys/health", 404),
        ("GET", "/v1/sys/mounts", 404),
        ("GET", "/v1/auth/token/lookup-self", 404),
        ("POST", "/v1/auth/kubernetes/login", 404),  # not configured
        ("GET", "/v1/other/data/env/db-password", 404),
        ("GET", "/ui/", 404),
        ("GET", "/v1/secret/data/env/db-password?ttl=1", 400),  # the facade has no queries
        ("GET", "/v1/secret/data/env/db-password?version=x", 400),
        ("GET", "/v1/secret/data/env", 400),  # a vault but no secret id
    ],
)
async def test_only_reads_are_served(
    make_daemon: MakeDaemon, method: str, path: str, status: int
) -> None:
    _, port = await facade_daemon(make_daemon)
    response = await call(
        lambda: requests.request(
            method, f"http://127.0.0.1:{port}{path}", headers={"X-Vault-Token": TOKEN}, timeout=10
        )
    )
    assert response.status_code == status
    if method != "LIST":
        assert isinstance(response.json()["errors"], list)


async def test_a_path_cannot_add_a_query_or_version_to_the_reference(
    make_daemon: MakeDaemon,
) -> None:
    """Percent-encoded '?' and '#' in a path stay inside the secret id: they name
    another secret, never a query or a version of this one."""
    daemon, port = await facade_daemon(make_daemon)

    def get(path: str) -> requests.Response:
        return requests.get(
            f"http://127.0.0.1:{port}/v1/secret/data/{path}",
            headers={"X-Vault-Token": TOKEN}, timeout=10,
        )  # fmt: skip

    for path in ("env/db-password%3Fttl=1", "env/db-password%232"):
        response = await call(lambda p=path: get(p))  # type: ignore[misc]
        assert (response.status_code, response.json()) == (404, {"errors": []}), path
    same = await call(lambda: get("env/db%2Dpassword"))  # '-' encoded is still '-'
    assert same.json()["data"]["data"] == {"value": SECRETS["DB_PASSWORD"]}
    refs = {e["ref"] for e in daemon.log_events() if e.get("event") == "secret.read"}
    assert refs == {
        "{vault://env/db-password%253Fttl%253D1/}",
        "{vault://env/db-password%25232/}",
        "{vault://env/db-password/}",
    }


def test_a_non_loopback_listener_is_refused_at_config_load(tmp_path: Path) -> None:
    from sidecar.config import load_config  # noqa: PLC0415
    from sidecar.errors import ConfigError  # noqa: PLC0415

    for address in ("0.0.0.0:8200", "10.0.0.5:8200", "vault.example:8200", "[::]:8200"):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps(facade_config(8200) | {}).replace("127.0.0.1:8200", address))
        with pytest.raises(ConfigError, match="not a loopback address"):
            load_config(path)
    for address in ("127.0.0.1:8200", "[::1]:8200", "localhost:8200"):
        path.write_text(json.dumps(facade_config(8200)).replace("127.0.0.1:8200", address))
        assert load_config(path).facade.address == address
    config = facade_config(8200, allow_non_loopback=True)
    path.write_text(json.dumps(config).replace("127.0.0.1:8200", "0.0.0.0:8200"))
    assert load_config(path).facade.allow_non_loopback


async def test_a_reload_reads_rotated_token_files(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token-0123456789\n")
    port = free_port()
    config = {"facade": {"enabled": True, "address": f"127.0.0.1:{port}", "tokens": [
        {"name": "kong", "token_file": str(token_file), "allow": ["env/*"]}]}}  # fmt: skip
    daemon = await make_daemon(config).started()
    await wait_until(lambda: _listening(port), 10, "the facade to listen")

    def status(token: str) -> int:
        return requests.get(
            f"http://127.0.0.1:{port}/v1/secret/data/env/db-password",
            headers={"X-Vault-Token": token}, timeout=10,
        ).status_code  # fmt: skip

    assert await call(lambda: status("first-token-0123456789")) == 200
    token_file.write_text("second-token-0123456789\n")
    daemon.signal(signal.SIGHUP)

    async def rotated() -> bool:
        code: int = await call(lambda: status("second-token-0123456789"))
        return code == 200

    await wait_until(rotated, 10, "the new token to be accepted")
    assert await call(lambda: status("first-token-0123456789")) == 403
    logs = daemon.logs()
    assert "first-token" not in logs
    assert "second-token" not in logs


async def test_kubernetes_login_hands_out_a_token_of_the_roles_rule(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """hvac's Kubernetes login with a service-account JWT the test signs: the right
    audience gets a short-lived token that reads what the role allows; a wrong audience,
    or a service account the role does not bind, gets 403 and no token."""
    issuer = Issuer({"k1": rsa_key()})
    port = free_port()
    config = {"facade": {"enabled": True, "address": f"127.0.0.1:{port}", "kubernetes": {
        "issuer": ISSUER, "audience": "secret-sidecar", "jwks_file": str(
            issuer.write_jwks(tmp_path / "jwks.json")), "token_ttl": 300,
        "roles": [{"name": "kong", "service_accounts": ["gateway/kong"], "allow": ["env/db-*"]}],
    }}}  # fmt: skip
    await make_daemon(config).started()
    await wait_until(lambda: _listening(port), 10, "the facade to listen")

    def login(jwt_text: str) -> Any:
        vault = client(port, None)
        return vault.auth.kubernetes.login(role="kong", jwt=jwt_text)

    good = issuer.sign(claims("gateway", "kong", audience="secret-sidecar"), "k1")
    auth = (await call(lambda: login(good)))["auth"]
    assert 0 < auth["lease_duration"] <= 300
    token = auth["client_token"]
    answer = await call(lambda: read_v2(port, "env/db-password", token))
    assert answer["data"]["data"] == {"value": SECRETS["DB_PASSWORD"]}
    with pytest.raises(hvac.exceptions.Forbidden):  # outside the role's rule
        await call(lambda: read_v2(port, "env/app-token", token))
    for refused in (
        issuer.sign(claims("gateway", "kong", audience="kubernetes"), "k1"),  # API server's
        issuer.sign(claims("gateway", "other", audience="secret-sidecar"), "k1"),  # not bound
    ):
        with pytest.raises(hvac.exceptions.Forbidden):
            await call(lambda t=refused: login(t))  # type: ignore[misc]


async def test_a_stale_value_is_served_with_the_stale_header(make_daemon: MakeDaemon) -> None:
    """With the backend down, the facade serves the last good value (resurrect_ttl) as
    Vault's answer and says so in ``X-Secret-Sidecar-Stale: true``; a fresh one has none."""
    vault = FakeVault()
    vault.enable_kv("secret", "v1")
    vault.put("secret", "db", {"password": "p"})
    vault.start()
    try:
        token = vault.create_token(ttl=3600)
        port = free_port()
        config = facade_config(port)
        config["facade"]["tokens"][0]["allow"] = ["hv/*"]
        config["vaults"] = [{"prefix": "hv", "name": "hcv",
                             "config": {"port": vault.port, "token": token, "ttl": 1,
                                        "resurrect_ttl": 600}}]  # fmt: skip
        await make_daemon(config, {"FACADE_TOKEN": TOKEN, "OTHER_TOKEN": OTHER}).started()
        await wait_until(lambda: _listening(port), 10, "the facade to listen")
        url = f"http://127.0.0.1:{port}/v1/secret/data/hv/db"

        def get() -> requests.Response:
            return requests.get(url, headers={"X-Vault-Token": TOKEN}, timeout=10)

        fresh = await call(get)
        assert fresh.status_code == 200
        assert "X-Secret-Sidecar-Stale" not in fresh.headers
        vault.sealed = True
        answers: list[requests.Response] = []

        async def served_stale() -> bool:  # once the 1 s ttl is over
            answers.append(await call(get))
            return "X-Secret-Sidecar-Stale" in answers[-1].headers

        await wait_until(served_stale, 10, "a stale answer with the backend sealed")
        stale = answers[-1]
        assert stale.status_code == 200, stale.text
        assert stale.headers["X-Secret-Sidecar-Stale"] == "true"
        assert stale.json()["data"]["data"] == {"password": "p"}
    finally:
        vault.stop()
