"""The Vault-KV facade as Kong's bundled ``hcv`` vault reads it, in real nginx + Lua.

Konnect-managed gateways have no custom vault, only Kong's bundled ones; the ``hcv``
vault pointed at the facade on loopback is how they read through the sidecar. Here
nginx resolves Kong references through the PDK stand-in (``tests/kong/lua/pdk_shim.lua``:
Kong's reference parsing and key extraction) and ``tests/kong/lua/kong/vaults/hcv``, a
stand-in for Kong's hcv vault that sends over a cosocket the requests that vault sends
(method, path, query, headers, the login body, keep-alive) and reads the answers as it
does (404 "not found", other non-2xx an error with the body, ``data.data`` for KV v2 and
``data`` for v1 encoded again as JSON, then Kong's key lookup); the last test pins
those bytes against a recording peer. What Kong's errors say is asserted word for
word: it is what a Konnect user sees in the gateway's log.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.canary import credential, value
from tests.integration.conftest import SECRETS, MakeDaemon
from tests.integration.harness import Daemon, free_port, wait_until
from tests.kong.conftest import MakeNginx
from tests.kong.nginx import Nginx

TOKEN = credential("facade-token")  # the kong token: the scans of every log look for it
OTHER = {"OTHER_DB/CREDS": json.dumps({"username": "ops", "password": value("other-db")})}
VAULTS = [{"prefix": "other", "name": "env", "config": {"prefix": "OTHER_"}}]
ALLOW = ["env/*", "gone/*"]  # the kong token's rule; the sidecar has no vault "gone"
NOT_FOUND = "no value found (unable to retrieve secret from vault: not found)"
REFUSED = "no value found (unable to retrieve secret from vault: "  # + the body, for non-404
STATS = """\
location = /hcv-stats {
    content_by_lua_block {
        ngx.header.content_type = "application/json"
        ngx.say(require("cjson").encode(require("kong.vaults.hcv").stats))
    }
}
"""


async def facade(
    make_daemon: MakeDaemon, kv: str = "v2", **facade_config: Any
) -> tuple[Daemon, int]:
    """A daemon whose facade listens on a free loopback port, with the ``kong`` token
    (``FACADE_TOKEN`` in its environment) allowed ``ALLOW``; the port once it accepts
    connections."""
    port = free_port()
    section = {
        "enabled": True,
        "address": f"127.0.0.1:{port}",
        "kv": kv,
        "tokens": [{"name": "kong", "token_env": "FACADE_TOKEN", "allow": ALLOW}],
        **facade_config,
    }
    daemon = make_daemon({"vaults": VAULTS, "facade": section},
                         {"FACADE_TOKEN": TOKEN, **OTHER})  # fmt: skip
    await daemon.started()

    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    await wait_until(listening, 10, "the facade to listen")
    return daemon, port


def gateway(make_nginx: MakeNginx, tmp_path: Path, port: int, **config: Any) -> Nginx:
    """nginx with a Kong vault entity ``kv`` of type hcv at the facade: token auth with
    the kong token unless ``config`` says otherwise (a field set to None is left unset,
    so Kong's default applies); ``/hcv-stats`` counts the vault's requests."""
    stats = tmp_path / "stats.conf"
    stats.write_text(STATS)
    fields = {"protocol": "http", "host": "127.0.0.1", "port": port, "mount": "secret",
              "kv": "v2", "auth_method": "token", "token": TOKEN, **config}  # fmt: skip
    entity = {"name": "hcv", "config": {k: v for k, v in fields.items() if v is not None}}
    return make_nginx(entities={"kv": entity}, include=stats)


async def stats(nginx: Nginx) -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(nginx.url + "/hcv-stats") as r:
        assert r.status == 200
        document: dict[str, int] = await r.json()
        return document


def reads(daemon: Daemon) -> list[tuple[str, Any, str]]:
    """(reference, client, outcome) of the daemon's audit events."""
    events = [e for e in daemon.log_events() if e.get("event") == "secret.read"]
    return [(e["ref"], e.get("client"), e["outcome"]) for e in events]


async def test_kv2_references_read_through_the_facade(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """``{vault://kv/<vault>/<id>/<key>}`` in Kong is ``GET /v1/secret/data/<vault>/<id>``
    and Kong's key lookup in the data object: a JSON secret's fields, a plain secret
    under ``value``, ``#2`` as ``?version=2``; a trailing ``/`` gives Kong the data object
    itself, as JSON. The hcv vault returns no ttl (the facade's lease_duration is not
    read: Kong caches for the vault's own ``ttl``). Each read is the sidecar's
    ``{vault://<vault>/<id>/}``, audited under the token's name."""
    daemon, port = await facade(make_daemon)
    nginx = gateway(make_nginx, tmp_path, port)
    password = await nginx.kong("{vault://kv/env/db-json/password}")
    assert password == {"value": "p4ss", "pid": password["pid"]}  # no err, no ttl
    assert (await nginx.kong("{vault://kv/env/db-json/username}"))["value"] == "app"
    assert (await nginx.kong("{vault://kv/env/db-password/value}"))["value"] == SECRETS[
        "DB_PASSWORD"
    ]
    previous = await nginx.kong("{vault://kv/env/db-password/value#2}")
    assert previous["value"] == SECRETS["DB_PASSWORD_PREVIOUS"]
    whole = await nginx.kong("{vault://kv/env/db-json/}")
    assert json.loads(whole["value"]) == json.loads(SECRETS["DB_JSON"])
    plain = await nginx.kong("{vault://kv/env/db-password/}")
    assert json.loads(plain["value"]) == {"value": SECRETS["DB_PASSWORD"]}
    assert {(ref, client) for ref, client, _ in reads(daemon)} == {
        ("{vault://env/db-json/}", "kong"),
        ("{vault://env/db-password/}", "kong"),
        ("{vault://env/db-password/#2}", "kong"),
    }


async def test_kv1_references_read_through_a_v1_facade(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """A facade with ``kv: v1`` and an hcv vault with kv v1 (Kong's default): the path
    has no ``data/`` and the answer's ``data`` is the secret itself."""
    _, port = await facade(make_daemon, kv="v1")
    nginx = gateway(make_nginx, tmp_path, port, kv="v1")
    assert (await nginx.kong("{vault://kv/env/db-json/password}"))["value"] == "p4ss"
    answer = await nginx.kong("{vault://kv/env/db-password/value}")
    assert answer["value"] == SECRETS["DB_PASSWORD"]


async def test_what_kong_reports_for_each_refusal(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """404 (a missing secret, a vault the rule allows but the sidecar does not have,
    and the KV v1 path a Kong vault left at its default kv sends to a v2 facade) is
    Kong's "not found"; a wrong token and a path outside the token's rule, whether its
    vault exists or not, are 403, which Kong reports with the facade's body; a key
    missing from the data object is Kong's own error."""
    _, port = await facade(make_daemon)
    nginx = gateway(make_nginx, tmp_path, port)
    for ref in ("{vault://kv/env/nope/value}", "{vault://kv/gone/db-password/value}"):
        assert (await nginx.kong(ref))["err"] == NOT_FOUND, ref
    default_kv = gateway(make_nginx, tmp_path, port, kv=None)
    assert (await default_kv.kong("{vault://kv/env/db-password/value}"))["err"] == NOT_FOUND

    for ref in ("{vault://kv/other/db/creds/password}", "{vault://kv/nosuch/x/value}"):
        outside = (await nginx.kong(ref))["err"]
        assert outside.startswith(REFUSED), ref
        assert json.loads(outside[len(REFUSED) : -1]) == {"errors": ["permission denied"]}, ref
    wrong = gateway(make_nginx, tmp_path, port, token=credential("not-the-facade-token"))
    refused = await wrong.kong("{vault://kv/env/db-password/value}")
    assert json.loads(refused["err"][len(REFUSED) : -1]) == {"errors": ["permission denied"]}

    missing_key = await nginx.kong("{vault://kv/env/db-json/nope}")
    assert missing_key["err"] == (
        "could not get subfield value: subfield nope not found in JSON secret"
    )


async def test_kong_keeps_its_connection_to_the_facade(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """The hcv vault's client pools its connection (HTTP/1.1 keep-alive): twenty reads
    from one worker are twenty requests on one connection, every answer right."""
    _, port = await facade(make_daemon)
    nginx = gateway(make_nginx, tmp_path, port)
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            answer = await nginx.kong("{vault://kv/env/db-json/username}", session)
            assert answer["value"] == "app"
    assert await stats(nginx) == {"requests": 20, "reused": 19, "logins": 0}


ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "secret-sidecar-facade"


def service_account_token(key: rsa.RSAPrivateKey, audience: str) -> str:
    """A projected service-account token of kong/kong, as the kubelet writes it."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": [audience],
        "sub": "system:serviceaccount:kong:kong",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "kubernetes.io": {
            "namespace": "kong",
            "serviceaccount": {"name": "kong", "uid": "5e0a1f52-7bd4-4f0e-9d3c-1b2a3c4d5e6f"},
            "pod": {"name": "kong-gateway-0", "uid": "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"},
        },
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "test-key"})


async def test_kubernetes_login_then_reads_with_the_handed_out_token(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """auth_method kubernetes: the hcv vault posts the pod's service-account token and
    its role to ``/v1/auth/kubernetes/login`` (no Content-Type, ``X-Vault-Namespace:
    root``), keeps ``auth.client_token`` for ``auth.lease_duration`` and reads with it:
    one login for three reads, so the lease is a positive number of seconds. A token
    for another audience is refused, and Kong's read fails without any request."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "test-key", "use": "sig",
                                          "alg": "RS256"}]}))  # fmt: skip
    kubernetes = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_file": str(jwks),
        "roles": [{"name": "kong", "service_accounts": ["kong/kong"], "allow": ["env/*"]}],
    }
    daemon, port = await facade(make_daemon, kubernetes=kubernetes)
    good, bad = tmp_path / "good-token", tmp_path / "bad-token"
    good.write_text(service_account_token(key, AUDIENCE))
    bad.write_text(service_account_token(key, "some-other-audience"))
    login = {"auth_method": "kubernetes", "token": None, "kube_role": "kong"}

    nginx = gateway(make_nginx, tmp_path, port, **login, kube_api_token_file=str(good))
    assert (await nginx.kong("{vault://kv/env/db-json/password}"))["value"] == "p4ss"
    assert (await nginx.kong("{vault://kv/env/db-json/username}"))["value"] == "app"
    answer = await nginx.kong("{vault://kv/env/db-password/value}")
    assert answer["value"] == SECRETS["DB_PASSWORD"]
    assert await stats(nginx) == {"requests": 4, "reused": 3, "logins": 1}
    assert {client for _, client, _ in reads(daemon)} == {"kubernetes:kong"}

    refused = gateway(make_nginx, tmp_path, port, **login, kube_api_token_file=str(bad))
    failed = await refused.kong("{vault://kv/env/db-password/value}")
    assert failed["err"] == (
        "no value found (unable to retrieve secret from vault: "
        "no authentication mechanism worked for vault)"
    )
    assert (await stats(refused))["logins"] == 1


ISSUED = "issued-0123456789abcdef"  # the client token the recording peer hands out


class RecordingVault:
    """A loopback TCP peer that keeps each request's bytes and answers as Vault would:
    the login with a client token, a read with ``{"data": {"data": ...}}``."""

    def __init__(self) -> None:
        self.requests: list[tuple[list[str], bytes]] = []  # head lines, body
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:  # requests on the kept-alive connection, until Kong closes it
                head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")[:-2]
                fields = {k.lower(): v for k, _, v in (h.partition(": ") for h in head[1:])}
                body = await reader.readexactly(int(fields.get("content-length", "0")))
                self.requests.append((head, body))
                if head[0].startswith("POST"):
                    answer: Any = {"auth": {"client_token": ISSUED, "lease_duration": 60}}
                else:
                    answer = {"data": {"data": {"password": "p4ss"}, "metadata": {}}}
                payload = json.dumps(answer).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_the_stand_in_sends_what_kongs_hcv_vault_sends(
    make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """What every test above relies on: the requests on the wire are the hcv vault's
    (lua-resty-http's bytes): a token read is GET with X-Vault-Token, Host and
    User-Agent only, ``?version=n`` for ``#n``; a Kubernetes login is POST with
    ``X-Vault-Namespace: root``, Content-Length, no Content-Type and ``{jwt, role}``,
    and the read after it carries the handed-out token."""
    vault = RecordingVault()
    port = await vault.start()
    try:
        nginx = gateway(make_nginx, tmp_path, port)
        assert (await nginx.kong("{vault://kv/aws-prod/db/creds/password#3}"))["value"] == "p4ss"
        token_file = tmp_path / "sa-token"
        token_file.write_text("header.payload.signature")
        login = gateway(make_nginx, tmp_path, port, auth_method="kubernetes", token=None,
                        kube_role="kong", kube_api_token_file=str(token_file))  # fmt: skip
        assert (await login.kong("{vault://kv/env/db-json/password}"))["value"] == "p4ss"
    finally:
        await vault.stop()

    def headers(head: list[str]) -> dict[str, str]:
        return dict(line.split(": ", 1) for line in head[1:])

    (read_head, read_body), (login_head, login_body), (after_head, _) = vault.requests
    user_agent = headers(read_head)["User-Agent"]
    assert user_agent.startswith("lua-resty-http/0.17.2 (Lua) ngx_lua/")
    host = f"127.0.0.1:{port}"
    assert read_head[0] == "GET /v1/secret/data/aws-prod/db/creds?version=3 HTTP/1.1"
    assert headers(read_head) == {"X-Vault-Token": TOKEN, "Host": host, "User-Agent": user_agent}
    assert read_body == b""
    assert login_head[0] == "POST /v1/auth/kubernetes/login HTTP/1.1"
    assert headers(login_head) == {"X-Vault-Namespace": "root", "Host": host,
                                   "Content-Length": str(len(login_body)),
                                   "User-Agent": user_agent}  # fmt: skip
    assert json.loads(login_body) == {"jwt": "header.payload.signature", "role": "kong"}
    assert after_head[0] == "GET /v1/secret/data/env/db-json HTTP/1.1"
    assert headers(after_head)["X-Vault-Token"] == ISSUED
