"""GCP Secret Manager backend: the real async client over gRPC to an in-process fake.

The main payloads and the key-file contents hold the canaries (tests.canary); expected
errors are checked for them with ``raises_clean``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import exceptions as auth_exc

from sidecar.backends.gcp import GcpBackend, GcpSettings, map_error
from sidecar.config import VaultEntity
from sidecar.errors import (
    AccessDenied,
    BackendError,
    BackendFailure,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    CredentialsExpired,
    InvalidReference,
    SecretNotFound,
)
from sidecar.resolver import Resolver
from tests.backends.contract import raises_clean
from tests.backends.gcp_server import Checksum, FakeSecretManager, State
from tests.canary import credential, plant_credential, value
from tests.support import ManualClock, make_resolver

Build = Callable[..., Resolver]
_GOOGLE_ENV = (
    "GCP_PROJECT_ID",
    "SECRET_MANAGER_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No Google settings leak in from the machine running the tests."""
    for name in _GOOGLE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
async def fake() -> AsyncIterator[FakeSecretManager]:
    server = FakeSecretManager()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def build(
    fake: FakeSecretManager, clock: ManualClock, clean_env: pytest.MonkeyPatch
) -> AsyncIterator[Build]:
    """Resolvers with an ``sm`` gcp vault on the fake (project p1); closed after the test."""
    made: list[Resolver] = []

    def factory(
        config: dict[str, Any] | None = None,
        *,
        environ: dict[str, str] | None = None,
        **cache: Any,
    ) -> Resolver:
        base = {"emulator_host": fake.target, "project_id": "p1"}
        entity = VaultEntity(prefix="sm", name="gcp", config={**base, **(config or {})})
        resolver = make_resolver((entity,), environ=environ, clock=clock, **cache)
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        await resolver.vaults.close()


async def test_latest_and_numbered_versions(fake: FakeSecretManager, build: Build) -> None:
    """No version reads latest and reports its number; #n reads versions/n."""
    fake.add("p1", "db", "one")
    fake.add("p1", "db", "two")
    resolver = build()
    latest = await resolver.resolve("{vault://sm/db}")
    first = await resolver.resolve("{vault://sm/db#1}")
    assert (latest.value, latest.version) == ("two", "2")
    assert (first.value, first.version) == ("one", "1")
    assert fake.names == [
        "projects/p1/secrets/db/versions/latest",
        "projects/p1/secrets/db/versions/1",
    ]


async def test_json_keys_share_one_call(fake: FakeSecretManager, build: Build) -> None:
    """username and password of one JSON secret come from one AccessSecretVersion."""
    fake.add("p1", "creds", json.dumps({"username": "u", "password": value("p")}))
    resolver = build()
    user = await resolver.resolve("{vault://sm/creds/username}")
    password = await resolver.resolve("{vault://sm/creds/password}")
    assert (user.value, password.value) == ("u", value("p"))
    assert len(fake.calls) == 1


async def test_payload_utf8_as_text_binary_as_base64(fake: FakeSecretManager, build: Build) -> None:
    """UTF-8 payloads come back as text; other bytes as their base64."""
    fake.add("p1", "text", value("pässwörd ✓"))
    blob = b"\xff\x00\xfe" + value("blob").encode()  # not UTF-8
    fake.add("p1", "blob", blob)
    resolver = build()
    assert (await resolver.resolve("{vault://sm/text}")).value == value("pässwörd ✓")
    assert (await resolver.resolve("{vault://sm/blob}")).value == base64.b64encode(blob).decode()


@pytest.mark.parametrize("state", [State.DISABLED, State.DESTROYED])
async def test_disabled_or_destroyed_version_is_not_found_and_negative_cached(
    fake: FakeSecretManager, build: Build, clock: ManualClock, state: State
) -> None:
    """FAILED_PRECONDITION is not_found with a clear message, remembered for neg_ttl."""
    fake.add("p1", "db", "old")
    fake.add("p1", "db", "new", state=state)
    resolver = build({"neg_ttl": 30})
    for ref in ("{vault://sm/db}", "{vault://sm/db#2}"):
        with pytest.raises(SecretNotFound, match="disabled or destroyed"):
            await resolver.resolve(ref)
    assert (await resolver.resolve("{vault://sm/db#1}")).value == "old"
    with pytest.raises(SecretNotFound):
        await resolver.resolve("{vault://sm/db}")
    assert len(fake.calls) == 3
    fake.set_state("p1", "db", 2, State.ENABLED)
    clock.advance(31)
    assert (await resolver.resolve("{vault://sm/db}")).value == "new"


async def test_missing_secret_or_version_is_not_found(
    fake: FakeSecretManager, build: Build
) -> None:
    """An unknown secret and an unknown version number are both not_found."""
    fake.add("p1", "db", "one")
    resolver = build()
    with pytest.raises(SecretNotFound, match="projects/p1/secrets/nope/versions/latest"):
        await resolver.resolve("{vault://sm/nope}")
    with pytest.raises(SecretNotFound) as caught:
        await resolver.resolve("{vault://sm/db#7}")
    assert caught.value.code == "not_found"


async def test_permission_denied_is_forbidden(fake: FakeSecretManager, build: Build) -> None:
    """PERMISSION_DENIED (IAM) is forbidden, not retried. UNAUTHENTICATED is our own
    credentials failing: a new connection (credentials loaded again) and one retry."""
    fake.add("p1", "db", "v")
    fake.denied.add(fake.parent("p1", "db"))
    resolver = build()
    with pytest.raises(AccessDenied) as caught:
        await resolver.resolve("{vault://sm/db}")
    assert caught.value.code == "forbidden"
    fake.denied.clear()
    fake.fail(grpc.StatusCode.UNAUTHENTICATED)
    assert (await resolver.resolve("{vault://sm/db#1}")).value == "v"
    assert len(fake.calls) == 3
    fake.fail_always(grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(CredentialsExpired, match="UNAUTHENTICATED") as expired:
        await resolver.resolve("{vault://sm/db#2}")
    assert expired.value.transient


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
async def test_transient_status_recovered_by_resolver_retry(
    fake: FakeSecretManager, build: Build, code: grpc.StatusCode
) -> None:
    """A transient status once is retried by the resolver and the value served."""
    fake.add("p1", "db", "v")
    fake.fail(code)
    answer = await build().resolve("{vault://sm/db}")
    assert answer.value == "v"
    assert len(fake.calls) == 2


async def test_library_retry_is_off(fake: FakeSecretManager, build: Build) -> None:
    """With resolver retries off, one UNAVAILABLE is one call: the client does not retry."""
    fake.add("p1", "db", "v")
    fake.fail(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(BackendUnavailable, match="UNAVAILABLE"):
        await build(backend_retries=0).resolve("{vault://sm/db}")
    assert len(fake.calls) == 1


async def test_persistent_unavailable_served_stale_then_unavailable(
    fake: FakeSecretManager, build: Build, clock: ManualClock
) -> None:
    """After ttl a failing backend serves the last value stale until resurrect_ttl ends."""
    fake.add("p1", "db", value("good"))
    resolver = build({"ttl": 60, "resurrect_ttl": 120})
    assert (await resolver.resolve("{vault://sm/db}")).value == value("good")
    fake.fail_always(grpc.StatusCode.UNAVAILABLE)
    clock.advance(61)
    stale = await resolver.resolve("{vault://sm/db}")
    assert (stale.value, stale.lookup.stale) == (value("good"), True)
    assert len(fake.calls) == 1 + 3  # one good read, then three attempts
    clock.advance(121)
    with raises_clean(BackendUnavailable) as caught:
        await resolver.resolve("{vault://sm/db}")
    assert caught.value.code == "backend_unavailable"


async def test_crc_mismatch_is_transient(fake: FakeSecretManager, build: Build) -> None:
    """A wrong data_crc32c is retried then backend_unavailable; an absent one is accepted."""
    fake.add("p1", "bad", value("bad"), checksum=Checksum.WRONG)
    fake.add("p1", "nocrc", "v", checksum=Checksum.ABSENT)
    resolver = build()
    with raises_clean(BackendUnavailable, match="checksum"):
        await resolver.resolve("{vault://sm/bad}")
    assert len(fake.calls) == 3
    assert (await resolver.resolve("{vault://sm/nocrc}")).value == "v"


async def test_invalid_argument_is_permanent_backend_error(
    fake: FakeSecretManager, build: Build
) -> None:
    """INVALID_ARGUMENT is a backend_error and not retried."""
    fake.fail(grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(BackendError, match="INVALID_ARGUMENT"):
        await build().resolve("{vault://sm/db}")
    assert len(fake.calls) == 1


async def test_request_timeout_is_sent_and_enforced(fake: FakeSecretManager, build: Build) -> None:
    """The configured timeout is the call's gRPC deadline; a hung server is backend_timeout."""
    fake.add("p1", "db", "v")
    resolver = build({"timeout": 2.5, "query_overrides": ["timeout"]}, backend_retries=0)
    await resolver.resolve("{vault://sm/db}")
    remaining = fake.calls[0].time_remaining
    assert remaining is not None
    assert 0 < remaining <= 2.6  # gRPC's timeout header rounds (seen: 2.509 s server-side)
    fake.hang = True
    with pytest.raises(BackendTimeout):
        await resolver.resolve("{vault://sm/db?timeout=0.05#1}")


async def test_project_from_entity_query_and_env(
    fake: FakeSecretManager, build: Build, clean_env: pytest.MonkeyPatch
) -> None:
    """project_id: the query (where the entity opens it) beats the entity; GCP_PROJECT_ID
    serves the backend used directly (a vault entity must name its project, as in Kong)."""
    for project in ("p1", "p2", "p3"):
        fake.add(project, "db", project)
    clean_env.setenv("GCP_PROJECT_ID", "p3")
    clean_env.setenv("SECRET_MANAGER_EMULATOR_HOST", fake.target)
    resolver = build({"query_overrides": ["project_id"]})
    assert (await resolver.resolve("{vault://sm/db}")).value == "p1"
    assert (await resolver.resolve("{vault://sm/db?project_id=p2}")).value == "p2"
    assert (await resolver.resolve("{vault://gcp/db}")).value == "p3"
    with pytest.raises(ValueError, match="project_id is required for a gcp vault"):
        build({"project_id": None})


async def test_missing_project_is_clear_backend_error(
    fake: FakeSecretManager, build: Build, clean_env: pytest.MonkeyPatch
) -> None:
    """Without project_id, GCP_PROJECT_ID or a credentials project: backend_error, no call."""
    clean_env.setenv("SECRET_MANAGER_EMULATOR_HOST", fake.target)
    with pytest.raises(BackendError, match="no GCP project"):
        await build().resolve("{vault://gcp/db}")
    assert fake.calls == []


async def test_backend_used_directly_with_kong_env_and_emulator_env(
    fake: FakeSecretManager, build: Build, clean_env: pytest.MonkeyPatch
) -> None:
    """{vault://gcp/...} takes KONG_VAULT_GCP_* base config and SECRET_MANAGER_EMULATOR_HOST."""
    fake.add("kong-proj", "db", "from kong env")
    clean_env.setenv("SECRET_MANAGER_EMULATOR_HOST", fake.target)
    resolver = build(environ={"KONG_VAULT_GCP_PROJECT_ID": "kong-proj"})
    assert (await resolver.resolve("{vault://gcp/db}")).value == "from kong env"


async def test_location_reads_regional_secret(fake: FakeSecretManager, build: Build) -> None:
    """location addresses projects/<p>/locations/<l>/secrets/<id>."""
    fake.add("p1", "db", "regional", location="europe-west1")
    answer = await build({"location": "europe-west1"}).resolve("{vault://sm/db}")
    assert answer.value == "regional"
    assert fake.names == ["projects/p1/locations/europe-west1/secrets/db/versions/latest"]


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("{vault://sm/a/b/key}", "not a GCP secret id"),  # the secret id is a/b
        ("{vault://sm/a/b/}", "not a GCP secret id"),
        ("{vault://sm/db.prod}", "not a GCP secret id"),
        ("{vault://sm/" + "x" * 256 + "}", "1 to 255"),
        ("{vault://sm/db#0}", "numbered from 1"),
    ],
)
async def test_invalid_secret_id_or_version_is_invalid_reference_at_bind(
    fake: FakeSecretManager, build: Build, ref: str, message: str
) -> None:
    """What GCP cannot name ([A-Za-z0-9_-]{1,255}, versions from 1) is a 400 when the
    reference is bound: no call, no cache entry, so nothing is negative-cached as a 502."""
    fake.add("p1", "db", "v")
    resolver = build()
    with pytest.raises(InvalidReference, match=message) as caught:
        resolver.target(ref)
    assert (caught.value.code, caught.value.status) == ("invalid_reference", 400)
    with pytest.raises(InvalidReference):
        await resolver.resolve(ref)
    assert fake.calls == []
    assert len(resolver.cache) == 0
    assert (await resolver.resolve("{vault://sm/db}")).value == "v"  # a valid id still reads


def test_config_rejects_unknown_keys_and_redacts_credentials_file() -> None:
    """A typo is a config error; a credentials_file value is never echoed."""
    with pytest.raises(ConfigError, match="projectid"):
        make_resolver(
            (VaultEntity(prefix="sm", name="gcp", config={"project_id": "p", "projectid": "x"}),)
        )
    pasted = {
        "project_id": "p",
        "credentials_file": {"private_key": credential("-----BEGIN PRIVATE KEY-----")},
    }
    with raises_clean(ConfigError) as caught:
        make_resolver((VaultEntity(prefix="sm", name="gcp", config=pasted),))
    assert "PRIVATE KEY" not in caught.value.message
    assert "credentials_file: Input should be a valid string" in caught.value.message


_EMULATOR_ENV = {"SECRET_MANAGER_EMULATOR_HOST": "h:1"}
_GLOBAL = "secretmanager.googleapis.com"
_REGIONAL = "secretmanager.us-east1.rep.googleapis.com"
_KEY = {"credentials_file": "/k.json"}


@pytest.mark.parametrize(
    ("fields", "env", "expected"),
    [
        ({}, {}, (_GLOBAL, False, None)),
        ({"location": "us-east1"}, {}, (_REGIONAL, False, None)),
        (
            {"endpoint": "sm.example:443", "location": "us-east1"},
            {},
            ("sm.example:443", False, None),
        ),
        ({"endpoint": "sm.x:443"}, _EMULATOR_ENV, ("h:1", True, None)),
        ({"emulator_host": "a:2", **_KEY}, _EMULATOR_ENV, ("a:2", True, None)),
        (_KEY, {}, (_GLOBAL, False, "/k.json")),
    ],
)
def test_connection_choice(
    fields: dict[str, str], env: dict[str, str], expected: tuple[str, bool, str | None]
) -> None:
    """Emulator (config, then env) beats endpoint, which beats the regional default."""
    backend = GcpBackend("sm", environ=env)
    assert backend.connection_key(GcpSettings(**fields)) == expected


def _service_account_file(tmp_path: Path, project: str) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    plant_credential(pem.splitlines()[1], "the service-account private key")  # a PEM line
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": f"sidecar@{project}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",  # never reached: no call is made
    }
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(info))
    return path


async def test_project_from_credentials_unless_anonymous(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """ADC or a key file supplies the project last; an emulator (anonymous) never does."""
    key_file = _service_account_file(tmp_path, "adc-proj")
    clean_env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    backend = GcpBackend("sm")
    try:
        assert (await backend.client_for(GcpSettings()))[1] == "adc-proj"
        from_file = GcpSettings(credentials_file=str(key_file), project_id="mine")
        assert (await backend.client_for(from_file))[1] == "mine"
        clean_env.setenv("GCP_PROJECT_ID", "env-proj")
        assert (await backend.client_for(GcpSettings()))[1] == "env-proj"
        clean_env.delenv("GCP_PROJECT_ID")
        with pytest.raises(BackendError, match="no GCP project"):
            await backend.client_for(GcpSettings(emulator_host="127.0.0.1:9"))
    finally:
        await backend.close()


async def test_unusable_credentials_file_is_backend_error(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """A missing or invalid key file is a clear backend_error without file contents."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "service_account", "private_key": credential("key")}))
    backend = GcpBackend("sm")
    try:
        for path in (tmp_path / "missing.json", bad):
            settings = GcpSettings(credentials_file=str(path), project_id="p1")
            with raises_clean(BackendError, match="credentials_file"):
                await backend.fetch("db", None, settings)
    finally:
        await backend.close()


# google.auth's exceptions are untyped; name them as plain exception factories.
_refresh_error: Callable[..., Exception] = auth_exc.RefreshError
_transport_error: Callable[..., Exception] = auth_exc.TransportError


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_refresh_error("invalid_grant", retryable=False), AccessDenied),
        (_refresh_error("metadata 503", retryable=True), BackendUnavailable),
        (_transport_error("connection refused"), BackendUnavailable),
    ],
)
def test_auth_errors_raised_by_the_library_are_mapped(
    exc: Exception, expected: type[BackendFailure]
) -> None:
    """Token failures: a rejected credential is forbidden, an unreachable issuer transient."""
    mapped = map_error(exc, "secret projects/p1/secrets/db/versions/latest")
    assert type(mapped) is expected
    assert str(exc) not in mapped.message
