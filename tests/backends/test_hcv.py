"""HashiCorp Vault backend: real hvac over real HTTP to a Vault-API-compatible server.

Tokens (the fake Vault makes them), secret ids, JWTs and the stored passwords hold the
canaries (tests.canary); expected errors are checked for them with ``raises_clean``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from sidecar.backends.hcv import HcvBackend, HcvSettings
from sidecar.config import VaultEntity
from sidecar.errors import (
    AccessDenied,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    InvalidReference,
    SecretNotFound,
    SidecarError,
    UnknownVault,
    Unrecognised,
)
from sidecar.resolver import Resolver
from tests.backends.contract import raises_clean
from tests.backends.vault_server import FakeVault, Timeline
from tests.canary import credential, value
from tests.support import make_resolver

Build = Callable[..., Resolver]
_VAULT_ENV = ("VAULT_TOKEN", "VAULT_ADDR", "VAULT_NAMESPACE", "VAULT_CACERT", "VAULT_CAPATH",
              "VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY")  # fmt: skip
LOGIN = "auth/approle/login"
LOOKUP = "auth/token/lookup-self"
RENEW = "auth/token/renew-self"
PASSWORD = value("p")
SECRET_ID = credential("sid-1")  # an AppRole secret id
JWT_1, JWT_2 = credential("jwt-1"), credential("jwt-2")  # Kubernetes service-account tokens
WARM = "?ttl=300"  # the same read under another cache entry, so the next plain one still asks


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll until ``check`` holds; background work runs on its own schedule."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No VAULT_* variables or ~/.vault-token leak in from the machine running the tests."""
    for name in _VAULT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture
def timeline() -> Timeline:
    return Timeline()


@pytest.fixture
def vault(timeline: Timeline) -> Iterator[FakeVault]:
    """Mounts ``secret`` (KV v1) and ``kv`` (KV v2) in the root namespace."""
    server = FakeVault(clock=timeline)
    server.enable_kv("secret", "v1")
    server.enable_kv("kv", "v2")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def root(vault: FakeVault) -> str:
    return vault.create_token()


@pytest.fixture
async def build(vault: FakeVault, timeline: Timeline, root: str) -> AsyncIterator[Build]:
    """Resolvers with an ``hv`` hcv vault on the server (root token); closed after the test."""
    made: list[Resolver] = []

    def factory(config: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None,
                **cache: Any) -> Resolver:  # fmt: skip
        base = {"port": vault.port, "token": root}
        entity = VaultEntity(prefix="hv", name="hcv", config={**base, **(config or {})})
        resolver = make_resolver((entity,), environ=environ, clock=timeline, **cache)
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        await resolver.vaults.close()


@pytest.fixture
async def backend(timeline: Timeline) -> AsyncIterator[HcvBackend]:
    """A backend whose renewal runs on the timeline (for renewal timing)."""
    made = HcvBackend("hv", clock=timeline, sleep=timeline.sleep)
    await made.start()
    yield made
    await made.close()


def paths(vault: FakeVault) -> list[str]:
    return [seen.path for seen in vault.seen]


async def test_kv_v1_whole_map_and_keys_share_one_read(vault: FakeVault, build: Build) -> None:
    """KV v1: no key gives the data map as JSON; keys come from one GET /v1/secret/<path>."""
    vault.put("secret", "app/db", {"username": "u", "password": value("pässwörd")})
    resolver = build()
    whole = await resolver.resolve("{vault://hv/app/db/}")
    user = await resolver.resolve("{vault://hv/app/db/username}")
    password = await resolver.resolve("{vault://hv/app/db/password}")
    assert json.loads(whole.value) == {"username": "u", "password": value("pässwörd")}
    assert (user.value, password.value, whole.version) == ("u", value("pässwörd"), None)
    assert paths(vault) == [LOOKUP, "secret/app/db"]
    assert all(seen.vault_request for seen in vault.seen)


async def test_kv_v2_latest_and_numbered_versions(vault: FakeVault, build: Build) -> None:
    """KV v2 reads /data/<path>; #n is ?version=n; the answer carries the version number."""
    vault.put("kv", "db", {"password": "one"})
    vault.put("kv", "db", {"password": "two"})
    resolver = build({"mount": "kv", "kv": "v2"})
    latest = await resolver.resolve("{vault://hv/db/password}")
    first = await resolver.resolve("{vault://hv/db/password#1}")
    assert (latest.value, latest.version) == ("two", "2")
    assert (first.value, first.version) == ("one", "1")
    reads = vault.calls("kv/data/db")
    assert [seen.query for seen in reads] == ["", "version=1"]


async def test_kv_v1_version_is_invalid_reference_at_bind(vault: FakeVault, build: Build) -> None:
    """KV v1 has one version per path: #n is a 400 when bound (Kong would silently read
    the only version), with no request to Vault and no cache entry."""
    vault.put("secret", "db", {"password": PASSWORD})
    resolver = build()
    for ref in ("{vault://hv/db/password#1}", "{vault://hv/db#2}", "{vault://hv/db/?ttl=60#3}"):
        with raises_clean(InvalidReference, match="KV v1, which has no versions") as caught:
            resolver.target(ref)
        assert (caught.value.code, caught.value.status) == ("invalid_reference", 400)
        with pytest.raises(InvalidReference, match=r"remove it, or set kv: v2"):
            await resolver.resolve(ref)
    assert vault.seen == []
    assert len(resolver.cache) == 0
    assert (await resolver.resolve("{vault://hv/db/password}")).value == PASSWORD


@pytest.mark.parametrize("destroy", [False, True])
async def test_kv_v2_deleted_or_destroyed_version_is_not_found(
    vault: FakeVault, build: Build, destroy: bool
) -> None:
    """A soft-deleted or destroyed version is not_found; other versions still read."""
    vault.put("kv", "db", {"password": "one"})
    vault.put("kv", "db", {"password": "two"})
    vault.delete_version("kv", "db", 2, destroy=destroy)
    resolver = build({"mount": "kv", "kv": "v2"})
    with pytest.raises(SecretNotFound):
        await resolver.resolve("{vault://hv/db/password}")
    assert (await resolver.resolve("{vault://hv/db/password#1}")).value == "one"


async def test_missing_secret_key_or_mount_is_not_found(vault: FakeVault, build: Build) -> None:
    """404s (secret, mount) and a key absent from the data map are all not_found."""
    vault.put("secret", "db", {"username": "u"})
    resolver = build()
    with pytest.raises(SecretNotFound, match="secret secret/nope: not found"):
        await resolver.resolve("{vault://hv/nope}")
    with pytest.raises(SecretNotFound, match="subfield password"):
        await resolver.resolve("{vault://hv/db/password}")
    with pytest.raises(SecretNotFound):
        await build({"mount": "other"}).resolve("{vault://hv/db/username}")


async def test_namespaces_are_isolated(vault: FakeVault, build: Build) -> None:
    """X-Vault-Namespace picks the namespace; a child's token cannot read the root."""
    vault.enable_kv("secret", "v1", namespace="team-a")
    vault.put("secret", "db", {"password": "root"})
    vault.put("secret", "db", {"password": "team-a"}, namespace="team-a")
    resolver = build({"query_overrides": ["namespace"]})
    assert (await resolver.resolve("{vault://hv/db/password}")).value == "root"
    child = await resolver.resolve("{vault://hv/db/password?namespace=team-a}")
    assert child.value == "team-a"
    assert vault.calls("secret/db")[-1].namespace == "team-a"
    team_token = vault.create_token(namespace="team-a")
    with pytest.raises(AccessDenied):
        await build({"token": team_token}).resolve("{vault://hv/db/password}")
    scoped = build({"token": team_token, "namespace": "team-a"})
    assert (await scoped.resolve("{vault://hv/db/password}")).value == "team-a"


async def test_token_auth_looks_up_once_then_only_reads(
    vault: FakeVault, build: Build, root: str
) -> None:
    """Token auth: one lookup-self when the client is made, then one GET per secret."""
    for name in ("a", "b", "c"):
        vault.put("secret", name, {"k": name})
    resolver = build()
    for name in ("a", "b", "c"):
        assert (await resolver.resolve(f"{{vault://hv/{name}/k}}")).value == name
    assert paths(vault) == [LOOKUP, "secret/a", "secret/b", "secret/c"]
    assert {seen.token for seen in vault.seen} == {vault.name_of(root)}


async def test_approle_login_with_secret_id_or_file(
    vault: FakeVault, build: Build, tmp_path: Path
) -> None:
    """AppRole logs in at its auth path with role id and secret id (inline or from a file)."""
    vault.put("secret", "db", {"password": PASSWORD})
    vault.add_approle("role-1", SECRET_ID, path="sidecar-approle")
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(SECRET_ID + "\n")
    for source in ({"approle_secret_id": SECRET_ID},
                   {"approle_secret_id_file": str(secret_file)}):  # fmt: skip
        config = {"auth_method": "approle", "approle_role_id": "role-1",
                  "approle_auth_path": "sidecar-approle", "token": None, **source}  # fmt: skip
        assert (await build(config).resolve("{vault://hv/db/password}")).value == PASSWORD
    logins = vault.calls("auth/sidecar-approle/login")
    assert [seen.body for seen in logins] == [{"role_id": "role-1", "secret_id": SECRET_ID}] * 2
    assert all(seen.token is None for seen in logins)  # no token sent to a login
    reads = vault.calls("secret/db")
    assert reads[0].token != reads[1].token  # each client uses the token its login gave


async def test_approle_rejected_credentials_are_forbidden(vault: FakeVault, build: Build) -> None:
    """A wrong secret id is forbidden (Vault's 400 on login), not retried."""
    vault.add_approle("role-1", SECRET_ID)
    config = {"auth_method": "approle", "approle_role_id": "role-1",
              "approle_secret_id": credential("wrong")}  # fmt: skip
    with raises_clean(AccessDenied, match="login: credentials rejected"):
        await build(config).resolve("{vault://hv/db}")
    assert len(vault.calls(LOGIN)) == 1


async def test_wrapped_secret_id_unwrapped_once_and_reused_for_relogin(
    vault: FakeVault, build: Build, timeline: Timeline, tmp_path: Path
) -> None:
    """With response wrapping the file holds a wrapping token: unwrapped once, then reused."""
    vault.put("secret", "db", {"password": PASSWORD})
    vault.add_approle("role-1", SECRET_ID, ttl=60)
    wrapped = tmp_path / "wrapped-secret-id"
    wrapped.write_text(vault.wrap({"secret_id": SECRET_ID, "secret_id_accessor": "acc"}))
    config = {
        "auth_method": "approle",
        "approle_role_id": "role-1",
        "approle_secret_id_file": str(wrapped),
        "approle_response_wrapping": True,
    }
    resolver = build(config)
    assert (await resolver.resolve("{vault://hv/db/password}")).value == PASSWORD
    timeline.advance(61)  # the token expires on the server: the next read re-logs in
    assert (await resolver.resolve("{vault://hv/db/password}", force=True)).value == PASSWORD
    assert paths(vault) == ["sys/wrapping/unwrap", LOGIN, "secret/db", "secret/db", LOOKUP,
                            LOGIN, "secret/db"]  # fmt: skip
    assert [seen.body for seen in vault.calls(LOGIN)] == [
        {"role_id": "role-1", "secret_id": SECRET_ID}
    ] * 2


async def test_kubernetes_login_reads_the_jwt_file_at_each_login(
    vault: FakeVault, build: Build, timeline: Timeline, tmp_path: Path
) -> None:
    """Kubernetes auth sends role and the projected JWT; a rotated JWT is used on re-login."""
    vault.put("secret", "db", {"password": PASSWORD})
    vault.add_kube_role("sidecar", JWT_1, ttl=60, path="k8s")
    jwt = tmp_path / "token"
    jwt.write_text(JWT_1)
    config = {"auth_method": "kubernetes", "kube_role": "sidecar", "kube_auth_path": "k8s",
              "kube_api_token_file": str(jwt), "token": None}  # fmt: skip
    resolver = build(config)
    assert (await resolver.resolve("{vault://hv/db/password}")).value == PASSWORD
    jwt.write_text(JWT_2)
    vault.kube_roles[("", "k8s", "sidecar")].jwts = {JWT_2}
    timeline.advance(61)
    assert (await resolver.resolve("{vault://hv/db/password}", force=True)).value == PASSWORD
    bodies = [seen.body for seen in vault.calls("auth/k8s/login")]
    assert bodies == [{"role": "sidecar", "jwt": JWT_1}, {"role": "sidecar", "jwt": JWT_2}]


async def test_expired_token_relogs_in_once_per_403_and_logs_no_credentials(
    vault: FakeVault, build: Build, timeline: Timeline
) -> None:
    """A 403 with a dead token: lookup-self fails, one login, the read is tried again."""
    vault.put("secret", "db", {"password": PASSWORD})
    vault.add_approle("role-1", SECRET_ID, ttl=60)
    config = {"auth_method": "approle", "approle_role_id": "role-1",
              "approle_secret_id": SECRET_ID}  # fmt: skip
    resolver = build(config)
    with capture_logs() as logs:
        await resolver.resolve("{vault://hv/db/password}")
        timeline.advance(61)
        assert (await resolver.resolve("{vault://hv/db/password}", force=True)).value == PASSWORD
    assert paths(vault) == [LOGIN, "secret/db", "secret/db", LOOKUP, LOGIN, "secret/db"]
    reads = vault.calls("secret/db")
    assert reads[1].token == reads[0].token != reads[2].token
    tokens = set(vault.tokens)
    assert not any(token in repr(logs) for token in tokens)
    assert SECRET_ID not in repr(logs)
    assert [e["event"] for e in logs].count("hcv.auth.login") == 2


async def test_policy_denial_is_forbidden_without_relogin(
    vault: FakeVault, build: Build, timeline: Timeline
) -> None:
    """A live token denied by policy: forbidden after one lookup-self, then negative-cached."""
    vault.put("secret", "app/db", {"password": PASSWORD})
    vault.put("secret", "other", {"password": "x"})
    limited = vault.create_token(policies=("secret/app/*",))
    resolver = build({"token": limited, "neg_ttl": 30})
    assert (await resolver.resolve("{vault://hv/app/db/password}")).value == PASSWORD
    with pytest.raises(AccessDenied, match="permission denied by Vault policy") as caught:
        await resolver.resolve("{vault://hv/other/password}")
    assert caught.value.code == "forbidden"
    with pytest.raises(AccessDenied):
        await resolver.resolve("{vault://hv/other/password}")
    assert paths(vault) == [LOOKUP, "secret/app/db", "secret/other", LOOKUP]


async def test_sealed_vault_served_stale_then_unavailable(
    vault: FakeVault, build: Build, timeline: Timeline
) -> None:
    """503 sealed is transient: retried, stale within resurrect_ttl, then backend_unavailable."""
    vault.put("secret", "db", {"password": value("good")})
    resolver = build({"ttl": 60, "resurrect_ttl": 120})
    assert (await resolver.resolve("{vault://hv/db/password}")).value == value("good")
    vault.sealed = True
    timeline.advance(61)
    stale = await resolver.resolve("{vault://hv/db/password}")
    assert (stale.value, stale.lookup.stale) == (value("good"), True)
    assert len(vault.calls("secret/db")) == 1 + 3  # one good read, then three attempts
    timeline.advance(121)
    with raises_clean(BackendUnavailable, match="sealed"):
        await resolver.resolve("{vault://hv/db/password}")


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_transient_status_recovered_by_resolver_retry(
    vault: FakeVault, build: Build, status: int
) -> None:
    """429 and 5xx once: the resolver retries and serves the value; hvac did not retry."""
    vault.put("secret", "db", {"password": PASSWORD})
    resolver = build()
    await resolver.resolve(f"{{vault://hv/db/password{WARM}}}")  # client made, token looked up
    vault.fail(status)
    assert (await resolver.resolve("{vault://hv/db/password}")).value == PASSWORD
    assert len(vault.calls("secret/db")) == 3


async def test_bad_request_is_permanent_backend_error(vault: FakeVault, build: Build) -> None:
    """A 400 on a read is backend_error, not retried."""
    resolver = build()
    vault.put("secret", "db", {"password": PASSWORD})
    await resolver.resolve(f"{{vault://hv/db/password{WARM}}}")
    vault.fail(400)
    with pytest.raises(BackendError, match=r"request refused \(400\)"):
        await resolver.resolve("{vault://hv/db/password}")
    assert len(vault.calls("secret/db")) == 2


async def test_unrecognised_answer_is_transient_and_logged_once(
    vault: FakeVault, build: Build
) -> None:
    """A status no mapping knows (418) is transient: retried, then backend_unavailable, with
    one warning naming its kind for the vault, not one per call."""
    resolver = build(backend_retries=1)
    vault.put("secret", "db", {"password": PASSWORD})
    await resolver.resolve(f"{{vault://hv/db/password{WARM}}}")
    vault.fail(418, 418, 418, 418)
    with capture_logs() as logs:
        for ref in ("{vault://hv/db/password}", "{vault://hv/db/password?ttl=60}"):
            with pytest.raises(Unrecognised, match=r"unrecognised error \(UnexpectedError\)"):
                await resolver.resolve(ref)
    assert len(vault.calls("secret/db")) == 1 + 4  # each tried twice
    warnings = [e for e in logs if e["event"] == "backend.unrecognised_error"]
    assert [(e["vault"], e["kind"]) for e in warnings] == [
        ("hv", "hvac.exceptions.UnexpectedError")
    ]


async def test_connection_refused_is_unavailable(build: Build) -> None:
    """Nothing listening: backend_unavailable after the resolver's retries."""
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    resolver = build({"port": port})
    with pytest.raises(BackendUnavailable, match="cannot connect"):
        await resolver.resolve("{vault://hv/db}")


async def test_request_timeout_from_settings(vault: FakeVault, build: Build) -> None:
    """The per-request timeout applies to hvac's requests: a hung Vault is backend_timeout."""
    vault.hang = True
    resolver = build({"timeout": 0.2}, backend_retries=0)
    with pytest.raises(BackendTimeout, match="request timeout"):
        await resolver.resolve("{vault://hv/db}")


async def test_token_file_rotation_is_picked_up(
    vault: FakeVault, build: Build, root: str, tmp_path: Path
) -> None:
    """token_file: a changed file is read again before the next read, with lookup-self."""
    vault.put("secret", "db", {"password": PASSWORD})
    token_file = tmp_path / "vault-token"
    token_file.write_text(root + "\n")
    resolver = build({"token": None, "token_file": str(token_file)})
    assert (await resolver.resolve("{vault://hv/db/password}")).value == PASSWORD
    new = vault.create_token()
    token_file.write_text(new + "\n")
    vault.revoke(root)
    assert (await resolver.resolve("{vault://hv/db/password}", force=True)).value == PASSWORD
    assert paths(vault) == [LOOKUP, "secret/db", LOOKUP, "secret/db"]
    assert vault.calls("secret/db")[-1].token == vault.name_of(new)


async def test_kong_env_base_config_for_direct_use(vault: FakeVault, root: str) -> None:
    """{vault://hcv/...} takes KONG_VAULT_HCV_* fields as Kong does."""
    vault.put("kv", "db", {"password": "from env"})
    environ = {"KONG_VAULT_HCV_PORT": str(vault.port), "KONG_VAULT_HCV_TOKEN": root,
               "KONG_VAULT_HCV_MOUNT": "kv", "KONG_VAULT_HCV_KV": "v2"}  # fmt: skip
    resolver = make_resolver(environ=environ)
    try:
        assert (await resolver.resolve("{vault://hcv/db/password}")).value == "from env"
    finally:
        await resolver.vaults.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "token auth needs token or token_file"),
        ({"auth_method": "approle", "approle_secret_id": "s"}, "needs approle_role_id"),
        ({"auth_method": "approle", "approle_role_id": "r"}, "approle_secret_id or"),
        ({"auth_method": "kubernetes"}, "needs kube_role"),
        ({"token": credential("hvs.SECRET"), "kv": "v3"}, "kv"),
        ({"token": credential("hvs.SECRET"), "tokne": "x"}, "tokne"),
    ],
)
def test_config_validation_names_the_problem_without_credentials(
    config: dict[str, Any], message: str
) -> None:
    """Kong's auth rules and unknown keys are config errors that never echo a credential."""
    with raises_clean(ConfigError, match=message):
        make_resolver((VaultEntity(prefix="hv", name="hcv", config=config),))


def test_direct_use_without_config_is_unknown_vault_with_reason() -> None:
    """{vault://hcv/...} with no token anywhere explains what is missing."""
    with pytest.raises(UnknownVault, match="token auth needs token"):
        make_resolver().vaults.get("hcv")


async def test_renewal_at_two_thirds_of_ttl_keeps_the_token(
    vault: FakeVault, backend: HcvBackend, timeline: Timeline
) -> None:
    """A renewable token is renewed at 2/3 of its TTL and stays usable past the first TTL."""
    vault.put("secret", "db", {"password": PASSWORD})
    token = vault.create_token(ttl=30)
    settings = HcvSettings(port=vault.port, token=token)
    await backend.fetch("db", None, settings)
    assert timeline.naps == [pytest.approx(20)]
    timeline.advance(20)
    await eventually(lambda: len(vault.calls(RENEW)) == 1 and len(timeline.naps) == 2)
    assert timeline.naps[-1] == pytest.approx(20)
    timeline.advance(15)  # past the first TTL
    await backend.fetch("db", 1, settings)
    assert paths(vault) == [LOOKUP, "secret/db", RENEW, "secret/db"]
    assert backend.auth_events[("renew", "ok")] == 1


async def test_relogin_when_max_ttl_caps_renewal(
    vault: FakeVault, backend: HcvBackend, timeline: Timeline
) -> None:
    """A renewal capped by max TTL is the last: the next refresh is a new login."""
    vault.add_approle("role-1", SECRET_ID, ttl=30, max_ttl=40)
    settings = HcvSettings(port=vault.port, auth_method="approle", approle_role_id="role-1",
                           approle_secret_id=SECRET_ID)  # fmt: skip
    session = await backend.session(settings)
    await eventually(lambda: len(timeline.naps) == 1)  # the renewal task is waiting
    timeline.advance(20)  # renewal asks for 30 s more, gets the 20 s left
    await eventually(lambda: len(timeline.naps) == 2)
    assert session.token is not None
    assert session.token.capped
    timeline.advance(14)
    await eventually(lambda: len(vault.calls(LOGIN)) == 2)
    assert paths(vault) == [LOGIN, RENEW, LOGIN]
    await eventually(lambda: session.token is not None and not session.token.capped)


@pytest.mark.parametrize("case", ["revoked", "not renewable"])
async def test_relogin_when_renewal_fails_or_is_impossible(
    vault: FakeVault, backend: HcvBackend, timeline: Timeline, case: str
) -> None:
    """A failed renewal (revoked token) or a non-renewable token leads to a new login."""
    vault.add_approle("role-1", SECRET_ID, ttl=30, renewable=case != "not renewable")
    settings = HcvSettings(port=vault.port, auth_method="approle", approle_role_id="role-1",
                           approle_secret_id=SECRET_ID)  # fmt: skip
    await backend.session(settings)
    await eventually(lambda: len(timeline.naps) == 1)  # the renewal task is waiting
    if case == "revoked":
        vault.tokens.clear()
    timeline.advance(20)
    await eventually(lambda: len(vault.calls(LOGIN)) == 2)
    expected = [LOGIN, RENEW, LOGIN] if case == "revoked" else [LOGIN, LOGIN]
    assert paths(vault) == expected


async def test_failed_relogin_backs_off_and_recovers(
    vault: FakeVault, backend: HcvBackend, timeline: Timeline
) -> None:
    """While Vault is sealed the renewal task retries with backoff, then logs in again."""
    vault.add_approle("role-1", SECRET_ID, ttl=30, renewable=False)
    settings = HcvSettings(port=vault.port, auth_method="approle", approle_role_id="role-1",
                           approle_secret_id=SECRET_ID)  # fmt: skip
    await backend.session(settings)
    await eventually(lambda: len(timeline.naps) == 1)  # the renewal task is waiting
    vault.sealed = True
    timeline.advance(20)
    await eventually(lambda: len(timeline.naps) == 2)
    assert timeline.naps[-1] == 2.0
    assert backend.auth_events[("login", "failed")] == 1
    vault.sealed = False
    timeline.advance(2)
    await eventually(lambda: backend.auth_events[("login", "ok")] == 2)


async def test_dedicated_threads_and_close_stops_renewal(
    vault: FakeVault, timeline: Timeline
) -> None:
    """hvac runs on the backend's named threads; close() cancels the renewal task."""
    vault.put("secret", "db", {"password": PASSWORD})
    backend = HcvBackend("hv", clock=timeline, sleep=timeline.sleep)
    await backend.start()
    await backend.fetch("db", None, HcvSettings(port=vault.port, token=vault.create_token(ttl=30)))
    names = [thread.name for thread in threading.enumerate()]
    assert any(name.startswith("hcv-hv") for name in names)
    assert [t for t in asyncio.all_tasks() if t.get_name() == "hcv-renew-hv"]
    await backend.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "hcv-renew-hv"]


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test vault CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return paths


async def test_https_with_ca_cert_and_client_cert(timeline: Timeline, tmp_path: Path) -> None:
    """https verifies Vault against ca_cert and presents client_cert (mTLS); unknown CA fails."""
    ca, cert, key = _tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED  # the server demands a client certificate
    context.load_verify_locations(ca)
    server = FakeVault(clock=timeline, tls=context)
    server.enable_kv("secret", "v1")
    server.put("secret", "db", {"password": "over tls"})
    server.start()
    base = {"protocol": "https", "port": server.port, "token": server.create_token()}
    mtls = {"ca_cert": str(ca), "client_cert": str(cert), "client_key": str(key)}
    trusted = VaultEntity(prefix="hv", name="hcv", config={**base, **mtls})
    untrusted = VaultEntity(prefix="hx", name="hcv", config={**base, "ca_cert": None})
    resolver = make_resolver((trusted, untrusted), clock=timeline)
    try:
        assert (await resolver.resolve("{vault://hv/db/password}")).value == "over tls"
        with pytest.raises(BackendError, match="TLS handshake failed"):
            await resolver.resolve("{vault://hx/db/password}")
    finally:
        await resolver.vaults.close()
        server.stop()


async def test_vault_start_authenticates_so_readiness_means_usable(
    vault: FakeVault, build: Build
) -> None:
    """Starting the vault looks the token up: a bad token fails start (not ready), a good
    one succeeds before any secret is read."""
    bad = build({"token": credential("not-a-token")})
    with raises_clean(SidecarError) as caught:
        await bad.vaults.start()
    assert caught.value.code in ("forbidden", "backend_error")
    good = build()
    await good.vaults.start()
    assert "auth/token/lookup-self" in paths(vault)
    assert not [p for p in paths(vault) if p.startswith("secret/")]
