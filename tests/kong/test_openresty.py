"""``require("secret_sidecar").get(ref)`` for gateways on plain OpenResty, in real nginx
against the real daemon, and the example configuration."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import aiohttp

from tests.canary import value
from tests.integration.conftest import SECRETS, MakeDaemon
from tests.integration.harness import free_port
from tests.kong.conftest import MakeNginx

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "openresty" / "example.conf"
DEFAULT_SOCKET = "/var/run/secret-sidecar/sidecar.sock"


async def test_get_returns_the_value(make_daemon: MakeDaemon, make_nginx: MakeNginx) -> None:
    """A reference is read whole: the value, as a string."""
    daemon = await make_daemon().started()
    nginx = make_nginx()
    answer = await nginx.openresty("{vault://env/db-password}", socket=str(daemon.socket))
    assert answer["value"] == SECRETS["DB_PASSWORD"]
    assert "err" not in answer


async def test_get_with_a_key_reads_one_field(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """A reference with a key gives that field of a JSON secret (the sidecar extracts it)."""
    daemon = await make_daemon().started()
    nginx = make_nginx()
    answer = await nginx.openresty("{vault://env/db-json/username}", socket=str(daemon.socket))
    assert answer["value"] == "app"


async def test_get_errors_carry_the_sidecars_code(
    make_daemon: MakeDaemon, make_nginx: MakeNginx
) -> None:
    """A missing secret and a bad reference: nil and ``secret-sidecar: <code>: <message>``."""
    daemon = await make_daemon().started()
    nginx = make_nginx()
    missing = await nginx.openresty("{vault://env/missing}", socket=str(daemon.socket))
    assert missing == {"err": "secret-sidecar: not_found: environment variable MISSING is not set",
                       "pid": missing["pid"]}  # fmt: skip
    invalid = await nginx.openresty("{vault://env}", socket=str(daemon.socket))
    assert invalid["err"] == (
        "secret-sidecar: invalid_reference: reference url is missing path [{vault://env}]"
    )


async def test_the_example_configuration_works(
    make_daemon: MakeDaemon, make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """deploy/openresty/example.conf, included in a server as its comments say (its
    socket path pointed at the test daemon): the access_by_lua location sends the
    secret to the upstream as a bearer token, the content_by_lua one signs with the
    key; with the sidecar gone, both answer 503 and log the error without a value."""
    token, key = value("example-token"), value("example-key")
    env = {"PROD_UPSTREAM": json.dumps({"api-token": token}), "PROD_SIGNING_KEY": key}
    vaults = [{"prefix": "aws-prod", "name": "env", "config": {"prefix": "PROD_"}}]
    daemon = await make_daemon({"vaults": vaults}, env).started()
    example = tmp_path / "example.conf"
    example.write_text(EXAMPLE.read_text().replace(DEFAULT_SOCKET, str(daemon.socket)))
    upstream = free_port()
    extra = f"""
        upstream backend {{ server 127.0.0.1:{upstream}; }}
        server {{
            listen 127.0.0.1:{upstream};
            location / {{ return 200 "upstream saw $http_authorization"; }}
        }}
    """
    nginx = make_nginx(http=extra, include=example)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{nginx.url}/api/x") as r:
            assert (r.status, await r.text()) == (200, f"upstream saw Bearer {token}")
        async with session.get(f"{nginx.url}/sign", params={"payload": "hello"}) as r:
            signature = hmac.new(key.encode(), b"hello", hashlib.sha1).digest()
            assert (r.status, await r.text()) == (200, base64.b64encode(signature).decode() + "\n")
        daemon.stop()
        for path in ("/api/x", "/sign"):
            async with session.get(nginx.url + path) as r:
                assert r.status == 503
    assert "upstream credential: secret-sidecar: daemon_unreachable: " in nginx.logs()
    assert "signing key: secret-sidecar: daemon_unreachable: " in nginx.logs()
