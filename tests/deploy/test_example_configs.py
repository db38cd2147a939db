"""The example configs in deploy/config/ work as shipped, against the real test peers.

Each example is run through ``secret-sidecar check`` in a subprocess, the way an operator
validates a file before installing it, with its backend served by the same peers the
backend tests use (moto's server, the Vault-API server, the gRPC Secret Manager). The
examples are not rewritten to reach them: each is pointed at its peer through the
environment it already documents (``AWS_ENDPOINT_URL_SECRETS_MANAGER``/``_STS``,
``KONG_VAULT_HCV_*``, ``SECRET_MANAGER_EMULATOR_HOST``). The one edit is the socket path,
since ``check`` refuses a socket directory that does not exist and
``/var/run/secret-sidecar`` is the deployment's, not this machine's: the copy differs from
the example in that single value, which ``test_examples_use_the_fixed_socket_path``
pins.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.reference import parse
from tests.backends.aws_peer import aws_client, isolate_environment, moto_server
from tests.backends.gcp_server import FakeSecretManager
from tests.backends.vault_server import FakeVault
from tests.canary import CANARY_VALUE, credential, value
from tests.deploy.tooling import ROOT, SOCKET

EXAMPLES = ROOT / "deploy" / "config"
BACKENDS = ("env", "aws", "hcv", "gcp")
# Variables a peer's environment sets; none may leak in from the machine running tests.
FOREIGN = ("AWS_", "KONG_VAULT_", "VAULT_", "GOOGLE_", "GCP_", "CLOUDSDK_", "SECRET_MANAGER_")
# Fields that hold a credential: an example sets none of them inline.
CREDENTIAL_FIELDS = frozenset({
    "token", "approle_role_id", "approle_secret_id", "client_key", "aws_access_key_id",
    "aws_secret_access_key", "aws_session_token", "credentials_json", "password", "secret",
})  # fmt: skip

Peer = Callable[[Path], AbstractAsyncContextManager[dict[str, str]]]


def example(backend: str) -> dict[str, Any]:
    loaded = yaml.safe_load((EXAMPLES / f"{backend}.yaml").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def vault_configs(config: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for vault in config.get("vaults", []):
        yield vault["prefix"], vault.get("config", {})


@asynccontextmanager
async def env_peer(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The env backend's peer is the daemon's environment itself."""
    creds = json.dumps({"username": "app", "password": value("env db-creds password")})
    yield {"APP_DB_PASSWORD": value("env db-password"), "APP_DB_CREDS": creds}


@asynccontextmanager
async def aws_peer(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """moto's server for Secrets Manager and STS (the example assumes a role)."""
    with moto_server() as url:
        async with aws_client(url, "secretsmanager") as client:
            creds = {"username": "app", "password": value("aws db-creds password")}
            await client.create_secret(Name="prod/db-creds", SecretString=json.dumps(creds))
            await client.create_secret(Name="prod/api-key", SecretString=value("aws api-key"))
        environ: dict[str, str] = {}
        isolate_environment(environ, str(tmp_path))
        environ["AWS_ENDPOINT_URL_SECRETS_MANAGER"] = url
        environ["AWS_ENDPOINT_URL_STS"] = url
        yield environ


@asynccontextmanager
async def hcv_peer(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The Vault-API server: KV v2 at secret/, an AppRole whose secret id is in a file."""
    server = FakeVault()
    server.enable_kv("secret", "v2")
    server.put("secret", "app/db", {"username": "app", "password": value("hcv db password")})
    role_id, secret_id = credential("role-id"), credential("secret-id")
    server.add_approle(role_id, secret_id)
    secret_id_file = tmp_path / "vault-secret-id"
    secret_id_file.write_text(secret_id + "\n")
    secret_id_file.chmod(0o400)
    server.start()
    try:
        yield {
            "KONG_VAULT_HCV_PROTOCOL": "http",  # the fake speaks plain HTTP; no CA file
            "KONG_VAULT_HCV_HOST": "127.0.0.1",
            "KONG_VAULT_HCV_PORT": str(server.port),
            "KONG_VAULT_HCV_APPROLE_ROLE_ID": role_id,
            "KONG_VAULT_HCV_APPROLE_SECRET_ID_FILE": str(secret_id_file),
        }
    finally:
        server.stop()


@asynccontextmanager
async def gcp_peer(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The gRPC Secret Manager, reached as an emulator (plaintext, no credentials)."""
    fake = FakeSecretManager()
    fake.add("my-prod-project", "db-password", value("gcp db-password"))
    creds = {"username": "app", "password": value("gcp db-creds password")}
    fake.add("my-prod-project", "db-creds", json.dumps(creds))
    target = await fake.start()
    try:
        yield {"SECRET_MANAGER_EMULATOR_HOST": target}
    finally:
        await fake.stop()


PEERS: dict[str, Peer] = {"env": env_peer, "aws": aws_peer, "hcv": hcv_peer, "gcp": gcp_peer}


def runnable_copy(backend: str, tmp_path: Path) -> Path:
    """The example with only its socket path moved to a directory that exists here."""
    text = (EXAMPLES / f"{backend}.yaml").read_text(encoding="utf-8")
    assert text.count(SOCKET) == 1, f"{backend}.yaml names the socket path once"
    copy = tmp_path / f"{backend}.yaml"
    copy.write_text(text.replace(SOCKET, str(tmp_path / "sidecar.sock")), encoding="utf-8")
    return copy


async def check(config: Path, environ: Mapping[str, str]) -> tuple[int, str, str]:
    """``secret-sidecar check -c config`` as a separate process, in a clean environment.

    Run without blocking the loop: the gRPC peer is served by this test's event loop.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "check", "-c", str(config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**clean, **environ},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 45)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_every_backend_has_an_example() -> None:
    """One example per backend, and nothing else in deploy/config/ but the README."""
    shipped = {p.name for p in EXAMPLES.iterdir()}
    assert shipped == {f"{b}.yaml" for b in BACKENDS} | {"README.md"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_examples_use_the_fixed_socket_path(backend: str) -> None:
    """The socket is where the unit, the compose file and the chart expect it, owner and
    group only; nothing else in the example is edited for the check run below."""
    listen = example(backend)["listen"]
    assert listen["socket"] == SOCKET
    assert int(listen["mode"], 8) & 0o007 == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_examples_hold_no_credential_and_prefetch_their_own_vaults(backend: str) -> None:
    """Credentials come from the environment, files or identity, never inline; every
    prefetch reference parses (Kong's grammar) and names a vault of the example."""
    config = example(backend)
    prefixes = set()
    for prefix, fields in vault_configs(config):
        prefixes.add(prefix)
        assert not CREDENTIAL_FIELDS & fields.keys(), f"{backend}.yaml: {prefix} inlines one"
    assert config.get("prefetch"), f"{backend}.yaml shows a prefetch list"
    for ref in config["prefetch"]:
        assert parse(ref).name in prefixes, ref


@pytest.mark.parametrize("backend", BACKENDS)
async def test_example_passes_check_against_its_peer(backend: str, tmp_path: Path) -> None:
    """``check`` exits 0 with every vault and prefetch reference "ok", and prints no value."""
    prefetch = example(backend)["prefetch"]
    async with PEERS[backend](tmp_path) as environ:
        code, out, err = await check(runnable_copy(backend, tmp_path), environ)
    assert code == 0, f"check exited {code}:\n{out}{err}"
    report = json.loads(out)
    assert report["socket"] == "ok"
    assert report["vaults"] == {prefix: "ok" for prefix, _ in vault_configs(example(backend))}
    assert report["prefetch"] == dict.fromkeys(prefetch, "ok")
    assert CANARY_VALUE not in out + err
