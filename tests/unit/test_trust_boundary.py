"""The trust boundary in-process: what a reference may steer, what the env backend
serves, and what reprs and config errors may show.

The socket-level half (real daemon, peers as another uid) is in
tests/integration/test_trust_boundary.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar import server
from sidecar.access import Peer
from sidecar.backends.base import Fetched
from sidecar.backends.hcv import HcvSettings
from sidecar.cache import Lookup, LookupResult, SecretKey
from sidecar.config import VaultEntity, load_config, parse_config
from sidecar.errors import ConfigError, Forbidden, InvalidReference
from sidecar.lifecycle import Daemon
from sidecar.metrics import Metrics
from sidecar.resolver import Answer
from sidecar.vaults import MAX_QUERY_VARIANTS, VaultRegistry
from tests.support import Listener, make_resolver

CREDENTIAL = "cred-4f1d9b2e-canary"


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    async with Listener() as made:
        yield made


# Base config from the environment, as a Kong data plane has it: each backend usable directly.
ENVIRON = {
    "KONG_VAULT_HCV_TOKEN": CREDENTIAL,
    "KONG_VAULT_HCV_PORT": "1",
    "KONG_VAULT_AWS_REGION": "us-east-1",
    "KONG_VAULT_GCP_PROJECT_ID": "p1",
}

# (backend, query) pairs that would move the request or its credentials, {port} = listener.
STEERING = [
    ("hcv", "host=127.0.0.1&port={port}"),
    ("hcv", "port={port}"),
    ("hcv", "protocol=https"),
    ("hcv", "token_file=/etc/hostname"),
    ("hcv", "token=other"),
    ("hcv", "namespace=other"),
    ("hcv", "mount=other"),
    ("hcv", "kv=v2"),
    ("hcv", "auth_method=approle"),
    ("hcv", "approle_role_id=r"),
    ("hcv", "kube_api_token_file=/etc/shadow"),
    ("aws", "endpoint_url=http://127.0.0.1:{port}"),
    ("aws", "sts_endpoint_url=http://127.0.0.1:{port}"),
    ("aws", "assume_role_arn=arn:aws:iam::123456789012:role/x"),
    ("aws", "region=eu-west-1"),
    ("gcp", "endpoint=127.0.0.1:{port}"),
    ("gcp", "emulator_host=127.0.0.1:{port}"),
    ("gcp", "credentials_file=/etc/hostname"),
    ("gcp", "project_id=other"),
    ("env", "prefix=AWS_"),
]


@pytest.mark.parametrize(("backend", "query"), STEERING)
async def test_query_cannot_steer_where_a_request_goes_or_whose_credentials(
    backend: str, query: str, listener: Listener
) -> None:
    """Fields beyond cache timing, decoding and versions are refused, naming the field,
    before any backend work: the port the query names sees no connection at all."""
    resolver = make_resolver(environ=ENVIRON)
    field = query.partition("=")[0]
    ref = f"{{vault://{backend}/app/x?{query.format(port=listener.port)}}}"
    with pytest.raises(InvalidReference, match=f"query field '{field}' may not be set") as caught:
        await resolver.resolve(ref)
    assert caught.value.code == "invalid_reference"
    assert CREDENTIAL not in caught.value.message
    await asyncio.sleep(0.05)  # a connection attempt, had one been made, would have landed
    assert listener.connections == 0
    assert len(resolver.cache) == 0
    await resolver.vaults.close()


@pytest.mark.parametrize(
    ("backend", "query"),
    [
        ("env", "ttl=5&neg_ttl=1&resurrect_ttl=9&base64_decode"),
        ("aws", "version_stage=AWSPENDING"),
        ("aws", "version_id=abc"),
        ("hcv", "ttl=60"),
        ("gcp", "resurrect_ttl=0"),
    ],
)
def test_cache_timing_decoding_and_version_selectors_stay_allowed(backend: str, query: str) -> None:
    """What Kong users put in queries for timing and versions keeps working."""
    target = make_resolver(environ=ENVIRON).target(f"{{vault://{backend}/app?{query}}}")
    assert target.key.settings != target.vault.settings


def test_vault_entity_may_widen_the_allowlist_but_never_to_credentials_or_files() -> None:
    """query_overrides opens named fields on one vault; credentials, auth and files stay shut."""
    widened = VaultEntity(
        prefix="kv", name="hcv", config={"token": CREDENTIAL, "query_overrides": ["mount"]}
    )
    resolver = make_resolver((widened,))
    assert resolver.target("{vault://kv/app?mount=other}").key.settings.mount == "other"  # type: ignore[attr-defined]
    with pytest.raises(InvalidReference, match="query field 'namespace'"):
        resolver.target("{vault://kv/app?namespace=other}")
    for field in ("token", "token_file", "auth_method", "ca_cert", "approle_secret_id"):
        entity = VaultEntity(
            prefix="kv", name="hcv", config={"token": CREDENTIAL, "query_overrides": [field]}
        )
        with pytest.raises(ConfigError, match="credential, auth or file field") as caught:
            make_resolver((entity,))
        assert CREDENTIAL not in caught.value.message
    bogus = VaultEntity(prefix="kv", name="env", config={"query_overrides": ["nope"]})
    with pytest.raises(ConfigError, match="'nope' is not a field of this backend"):
        make_resolver((bogus,))
    from_env = make_resolver(environ={"KONG_VAULT_ENV_QUERY_OVERRIDES": "prefix"})
    with pytest.raises(InvalidReference, match="query field 'prefix'"):
        from_env.target("{vault://env/app?prefix=X_}")  # widening is never read from the env


def test_distinct_query_settings_per_vault_are_bounded() -> None:
    """Each distinct query is a settings object (and may be a client): at most a fixed number."""
    resolver = make_resolver()
    for ttl in range(1, MAX_QUERY_VARIANTS + 1):
        resolver.target(f"{{vault://env/app?ttl={ttl}}}")
    resolver.target("{vault://env/other?ttl=1}")  # a known variant still binds
    with pytest.raises(InvalidReference, match=f"already has {MAX_QUERY_VARIANTS} distinct"):
        resolver.target(f"{{vault://env/app?ttl={MAX_QUERY_VARIANTS + 1}}}")


@pytest.mark.parametrize(
    "ref",
    [
        "{vault://env/aws-secret-access-key}",
        "{vault://env/aws_session_token}",
        "{vault://env/kong-vault-hcv-token}",
        "{vault://env/vault-token}",
        "{vault://env/google-application-credentials}",
        "{vault://env/gcp-project-id}",
        "{vault://env/aws-secret-access-key#2}",
        "{vault://creds/secret-access-key}",  # a vault whose prefix lands on AWS_
    ],
)
async def test_env_backend_never_serves_the_sidecars_own_credentials(ref: str) -> None:
    """Variables read as credentials are refused (403), not looked up and not cached."""
    environ = {
        "AWS_SECRET_ACCESS_KEY": CREDENTIAL,
        "AWS_SECRET_ACCESS_KEY_PREVIOUS": CREDENTIAL,
        "AWS_SESSION_TOKEN": CREDENTIAL,
        "KONG_VAULT_HCV_TOKEN": CREDENTIAL,
        "VAULT_TOKEN": CREDENTIAL,
        "GOOGLE_APPLICATION_CREDENTIALS": CREDENTIAL,
        "GCP_PROJECT_ID": CREDENTIAL,
    }
    creds = VaultEntity(prefix="creds", name="env", config={"prefix": "AWS_"})
    resolver = make_resolver((creds,), environ=environ)
    with pytest.raises(Forbidden, match="reserved for the sidecar's own credentials") as caught:
        await resolver.resolve(ref)
    assert caught.value.status == 403
    assert CREDENTIAL not in caught.value.message
    assert len(resolver.cache) == 0


async def test_env_naming_is_otherwise_kongs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names that merely contain a reserved word are served as Kong serves them."""
    monkeypatch.setenv("MY_AWS_KEY", "v1")
    monkeypatch.setenv("VAULTED", "v2")
    resolver = make_resolver()
    assert (await resolver.resolve("{vault://env/my-aws-key}")).value == "v1"
    assert (await resolver.resolve("{vault://env/vaulted}")).value == "v2"


@pytest.mark.parametrize(
    "ref", ["{vault://env/a%00b}", "{vault://env/db/k%0a}", "{vault://env/%1b}"]
)
def test_control_characters_in_ids_are_invalid_references(ref: str) -> None:
    """A decoded NUL or control character names no secret anywhere: 400, not a lookup."""
    with pytest.raises(InvalidReference, match="control character"):
        make_resolver().target(ref)


def test_reprs_never_show_credentials_or_values() -> None:
    """Settings, vaults, cache keys, fetched values and answers print without secrets."""
    entity = VaultEntity(
        prefix="kv",
        name="hcv",
        config={"token": CREDENTIAL, "approle_secret_id": CREDENTIAL, "approle_role_id": "r"},
    )
    config = parse_config({"vaults": [entity.model_dump()]})
    resolver = make_resolver(config.vaults)
    vault = resolver.vaults.get("kv")
    settings = vault.settings
    assert isinstance(settings, HcvSettings)
    key = SecretKey("kv", "db", None, settings)
    fetched = Fetched(CREDENTIAL, "1")
    answer = Answer("{vault://kv/db}", CREDENTIAL, "1", Lookup(fetched, LookupResult.HIT, 0, 1))
    for shown in (settings, key, vault, config, entity, fetched, answer, resolver.vaults):
        assert CREDENTIAL not in repr(shown), type(shown).__name__
        assert CREDENTIAL not in str(shown), type(shown).__name__
    assert settings.token is not None
    assert settings.token.get_secret_value() == CREDENTIAL


@pytest.mark.parametrize(
    "raw",
    [
        {
            "vaults": [
                {"prefix": "a1", "name": "aws", "config": {"aws_secret_access_key": CREDENTIAL}}
            ]
        },
        {"vaults": [{"prefix": "a1", "name": "hcv", "config": {"token": CREDENTIAL, "port": "x"}}]},
        {"vaults": [{"prefix": "a1", "name": "hcv", "config": {"token": [CREDENTIAL]}}]},
        {"vaults": [{"prefix": "a1", "name": "env", "secret": CREDENTIAL}]},
        {"vaults": [{"prefix": CREDENTIAL + "_", "name": "env"}]},
        {"password": CREDENTIAL},
        {"listen": {"token": CREDENTIAL}},
        {"clients": [{"uid": 1, "allow": ["*"], "token": CREDENTIAL}]},
    ],
)
def test_config_errors_never_echo_credentials(raw: dict[str, Any]) -> None:
    """Unknown keys, vault settings and objects holding credentials are named, not quoted."""
    with pytest.raises(ConfigError) as caught:
        make_resolver(parse_config(raw).vaults, environ={})
    assert CREDENTIAL not in caught.value.message
    assert CREDENTIAL not in repr(caught.value)
    assert caught.value.__cause__ is None  # pydantic's own error (which quotes input) is dropped


def test_yaml_errors_name_the_place_not_the_line(tmp_path: Path) -> None:
    """PyYAML quotes the offending line; we give line and column only."""
    path = tmp_path / "c.yaml"
    path.write_text(f'vaults:\n  - prefix: a1\n    config: {{token: "{CREDENTIAL}\n')
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+") as caught:
        load_config(path)
    assert CREDENTIAL not in caught.value.message


def test_unknown_vault_config_error_keeps_registry_and_error_clean() -> None:
    """An entity failing validation inside the registry reports without its config."""
    with pytest.raises(ConfigError) as caught:
        VaultRegistry((VaultEntity(prefix="a1", name="hcv", config={"tokn": CREDENTIAL}),))
    assert "unknown key (allowed: " in caught.value.message
    assert CREDENTIAL not in caught.value.message


def test_socket_path_length_is_checked_at_load() -> None:
    """A path the kernel cannot bind is a config error, not a runtime surprise."""
    with pytest.raises(ConfigError, match="a Unix socket path has at most 107"):
        parse_config({"listen": {"socket": "/tmp/" + "x" * 120}})
    assert parse_config({"listen": {"socket": "/" + "x" * 106}}).listen.socket


async def test_a_memoized_binding_still_checks_each_peers_access(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resolver remembers a reference's binding after the first read; a second peer
    outside the globs still gets 403 for the same text, served from the memo or not."""
    monkeypatch.setenv("DB_PASSWORD", "pw")
    config = parse_config({"metrics": {"address": ""},
                           "clients": [{"uid": 1000, "allow": ["env/*"]}]})  # fmt: skip
    daemon = Daemon(config, Metrics(), time.monotonic)
    ref = "{vault://env/db-password}"
    allowed, other = Peer(1, 1000, 1000), Peer(2, 2000, 2000)
    assert (await server.read(daemon.state, allowed, ref)).value == "pw"
    assert daemon.state.resolver.bound(ref) is not None  # memoized
    for _ in range(2):
        with pytest.raises(Forbidden):
            await server.read(daemon.state, other, ref)
        with pytest.raises(Forbidden):
            server._read_now(daemon.state, other, ref)
    assert (await server.read(daemon.state, allowed, ref)).value == "pw"


async def test_a_body_whose_connection_is_already_gone_is_a_client_gone() -> None:
    """aiohttp raises a bare RuntimeError("Connection closed.") when a handler starts
    reading the body of a connection already closed (a pipelined request behind one the
    client stopped waiting for, as the socket fuzzer found): that is the client gone
    (ConnectionResetError, a 499), not an internal error (a 500 and request.failed)."""
    from aiohttp import streams  # noqa: PLC0415
    from aiohttp.test_utils import make_mocked_request  # noqa: PLC0415

    class Closed:  # the protocol of a connection that is gone, as StreamReader sees it
        connected = False

    daemon = Daemon(parse_config({"metrics": {"address": ""}}), Metrics(), time.monotonic)
    payload = streams.StreamReader(Closed(), 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    request = make_mocked_request("POST", "/v1/secrets:batch", payload=payload)
    with pytest.raises(ConnectionResetError):
        await server.batch(daemon.state, request)
