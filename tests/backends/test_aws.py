"""AWS Secrets Manager backend: aiobotocore over real HTTP to moto's server (via a proxy).

The client's keys and the values of the main secrets hold the canaries (tests.canary).
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sidecar.backends.aws import AwsBackend, AwsSettings
from sidecar.config import VaultEntity
from sidecar.errors import (
    AccessDenied,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    InvalidReference,
    SecretNotFound,
    UnknownVault,
)
from sidecar.resolver import Resolver
from tests.backends.aws_peer import (
    ACCESS_KEY,
    SECRET_KEY,
    MotoProxy,
    aws_client,
    isolate_process_environment,
    moto_auth,
    moto_reset,
    moto_server,
)
from tests.backends.contract import raises_clean
from tests.canary import value
from tests.support import ManualClock, make_resolver

Build = Callable[..., Resolver]
ROLE = "arn:aws:iam::123456789012:role/sidecar-reader"


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """The standard chain sees fake env credentials only: never a real profile or IMDS."""
    isolate_process_environment(monkeypatch, str(tmp_path))
    return monkeypatch


@pytest.fixture
async def proxy(moto_url: str, aws_env: pytest.MonkeyPatch) -> AsyncIterator[MotoProxy]:
    """A clean moto behind a fresh counting proxy."""
    await moto_reset(moto_url)
    started = await MotoProxy(moto_url).start()
    yield started
    await started.stop()


@pytest.fixture
async def sm(moto_url: str, proxy: MotoProxy) -> AsyncIterator[Any]:
    """A secretsmanager client straight to moto, to seed secrets (not counted)."""
    async with aws_client(moto_url, "secretsmanager") as client:
        yield client


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def build(proxy: MotoProxy, clock: ManualClock) -> AsyncIterator[Build]:
    """Resolvers with an ``sm`` aws vault on the proxy (us-east-1); closed after the test."""
    made: list[Resolver] = []

    def factory(config: dict[str, Any] | None = None, **cache: Any) -> Resolver:
        base = {"endpoint_url": proxy.url, "region": "us-east-1"}
        entity = VaultEntity(prefix="sm", name="aws", config={**base, **(config or {})})
        resolver = make_resolver((entity,), clock=clock, **cache)
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        await resolver.vaults.close()


async def test_string_secret_reports_its_version_id(
    sm: Any, proxy: MotoProxy, build: Build
) -> None:
    """SecretString comes back as is, with AWS's VersionId; AWSCURRENT is asked explicitly."""
    created = await sm.create_secret(Name="db/password", SecretString=value("s3cr3t ✓"))
    answer = await build().resolve("{vault://sm/db/password/}")
    assert (answer.value, answer.version) == (value("s3cr3t ✓"), created["VersionId"])
    assert [c.params for c in proxy.calls] == [
        {"SecretId": "db/password", "VersionStage": "AWSCURRENT"}
    ]


async def test_binary_secret_utf8_as_text_other_bytes_as_base64(sm: Any, build: Build) -> None:
    """SecretBinary that is UTF-8 reads as text; other bytes as their base64."""
    await sm.create_secret(Name="text", SecretBinary=value("pässwörd").encode())
    blob = b"\xff\x00\xfe" + value("blob").encode()  # not UTF-8
    await sm.create_secret(Name="blob", SecretBinary=blob)
    resolver = build()
    assert (await resolver.resolve("{vault://sm/text}")).value == value("pässwörd")
    assert (await resolver.resolve("{vault://sm/blob}")).value == base64.b64encode(blob).decode()


async def test_json_keys_share_one_call(sm: Any, proxy: MotoProxy, build: Build) -> None:
    """username and password of one JSON secret come from one GetSecretValue."""
    await sm.create_secret(
        Name="creds", SecretString=json.dumps({"username": "u", "password": value("p")})
    )
    resolver = build()
    user = await resolver.resolve("{vault://sm/creds/username}")
    password = await resolver.resolve("{vault://sm/creds/password}")
    assert (user.value, password.value) == ("u", value("p"))
    with raises_clean(SecretNotFound, match="subfield nope"):
        await resolver.resolve("{vault://sm/creds/nope}")
    assert proxy.count("GetSecretValue") == 1


async def test_versions_map_to_current_and_previous(sm: Any, build: Build) -> None:
    """No version and #1 read AWSCURRENT, #2 AWSPREVIOUS after put_secret_value."""
    await sm.create_secret(Name="db", SecretString="one")
    await sm.put_secret_value(SecretId="db", SecretString="two")
    resolver = build()
    values = [(await resolver.resolve(f"{{vault://sm/db{v}}}")).value for v in ("", "#1", "#2")]
    assert values == ["two", "two", "one"]


@pytest.mark.parametrize("ref", ["{vault://sm/db#3}", "{vault://sm/db#0}"])
async def test_other_versions_are_invalid_references(
    sm: Any, proxy: MotoProxy, build: Build, ref: str
) -> None:
    """Any version but 1 and 2 is Kong's invalid_reference error, without an AWS call."""
    await sm.create_secret(Name="db", SecretString="one")
    with pytest.raises(InvalidReference) as caught:
        await build().resolve(ref)
    assert caught.value.message == "invalid version for aws secret manager"
    assert caught.value.code == "invalid_reference"
    assert proxy.calls == []


async def test_version_id_and_stage_from_the_query(sm: Any, proxy: MotoProxy, build: Build) -> None:
    """?version_id= and ?version_stage= select a version; mixing them with #n is refused."""
    first = await sm.create_secret(Name="db", SecretString="one")
    await sm.put_secret_value(SecretId="db", SecretString="two")
    resolver = build()
    by_id = await resolver.resolve(f"{{vault://sm/db?version_id={first['VersionId']}}}")
    by_stage = await resolver.resolve("{vault://sm/db?version_stage=AWSPREVIOUS}")
    assert (by_id.value, by_id.version, by_stage.value) == ("one", first["VersionId"], "one")
    assert proxy.calls[0].params == {"SecretId": "db", "VersionId": first["VersionId"]}
    with pytest.raises(InvalidReference, match="not both"):
        await resolver.resolve("{vault://sm/db?version_stage=AWSCURRENT#2}")


async def test_missing_secret_is_not_found_and_negative_cached(
    sm: Any, proxy: MotoProxy, build: Build, clock: ManualClock
) -> None:
    """ResourceNotFoundException is not_found, remembered for neg_ttl, then asked again."""
    resolver = build({"neg_ttl": 30})
    for _ in range(2):
        with pytest.raises(SecretNotFound, match=r"secret 'late' \(AWSCURRENT\): not found"):
            await resolver.resolve("{vault://sm/late}")
    assert proxy.count("GetSecretValue") == 1
    await sm.create_secret(Name="late", SecretString="here")
    clock.advance(31)
    assert (await resolver.resolve("{vault://sm/late}")).value == "here"


async def test_deleted_secret_is_not_found(sm: Any, build: Build) -> None:
    """A secret scheduled for deletion reads as not_found, not as a backend error."""
    await sm.create_secret(Name="gone", SecretString=value("x"))
    await sm.delete_secret(SecretId="gone", RecoveryWindowInDays=7)
    with raises_clean(SecretNotFound, match="scheduled for deletion"):
        await build().resolve("{vault://sm/gone}")


async def test_region_per_reference_and_aws_region_fallback(
    moto_url: str, proxy: MotoProxy, build: Build, aws_env: pytest.MonkeyPatch
) -> None:
    """?region= (opened by query_overrides) overrides the vault's region; without one,
    AWS_REGION is used as Kong does."""
    async with aws_client(moto_url, "secretsmanager", "eu-west-1") as eu:
        await eu.create_secret(Name="db", SecretString="from-eu")
    resolver = build({"query_overrides": ["region"]})  # the entity opens region to queries
    assert (await resolver.resolve("{vault://sm/db?region=eu-west-1}")).value == "from-eu"
    with pytest.raises(SecretNotFound):
        await resolver.resolve("{vault://sm/db}")
    aws_env.setenv("AWS_REGION", "eu-west-1")
    regionless = build({"region": None})
    assert (await regionless.resolve("{vault://sm/db}")).value == "from-eu"
    assert [c.region for c in proxy.calls] == ["eu-west-1", "us-east-1", "eu-west-1"]


async def test_no_region_anywhere_is_a_backend_error(proxy: MotoProxy, build: Build) -> None:
    """Without region, AWS_REGION or AWS_DEFAULT_REGION the error says how to set one."""
    with pytest.raises(BackendError, match="no region"):
        await build({"region": None}).resolve("{vault://sm/db}")
    assert proxy.calls == []


async def test_assume_role_signs_with_temporary_credentials(
    sm: Any, proxy: MotoProxy, build: Build
) -> None:
    """With assume_role_arn, STS AssumeRole runs once and its credentials sign the reads."""
    await sm.create_secret(Name="a", SecretString=value("1"))
    await sm.create_secret(Name="b", SecretString="2")
    resolver = build({"assume_role_arn": ROLE, "sts_endpoint_url": proxy.url})
    assert (await resolver.resolve("{vault://sm/a}")).value == value("1")
    assert (await resolver.resolve("{vault://sm/b}")).value == "2"
    assume, *reads = proxy.calls
    assert assume.operation == "AssumeRole"
    assert (assume.params["RoleArn"], assume.params["RoleSessionName"]) == (ROLE, "secret-sidecar")
    assert assume.access_key == ACCESS_KEY
    assert [c.operation for c in reads] == ["GetSecretValue", "GetSecretValue"]
    assert {c.access_key for c in reads} != {ACCESS_KEY}
    assert len({c.access_key for c in reads}) == 1


async def test_assumed_credentials_refreshed_before_expiry(sm: Any, proxy: MotoProxy) -> None:
    """Temporary credentials are renewed once they are within 10 minutes of expiring."""
    await sm.create_secret(Name="a", SecretString="1")
    now = datetime.now(UTC)
    backend = AwsBackend("sm", environ={}, now=lambda: now)
    settings = AwsSettings(region="us-east-1", endpoint_url=proxy.url, assume_role_arn=ROLE,
                           role_session_name="rotating", sts_endpoint_url=proxy.url)  # fmt: skip
    try:
        await backend.fetch("a", None, settings)
        await backend.fetch("a", None, settings)
        assert proxy.count("AssumeRole") == 1
        now += timedelta(minutes=55)  # moto's credentials last an hour
        assert (await backend.fetch("a", None, settings)).value == "1"
        assert proxy.count("AssumeRole") == 2
    finally:
        await backend.close()


async def test_assume_role_denied_is_forbidden(sm: Any, proxy: MotoProxy, build: Build) -> None:
    """STS refusing AssumeRole is forbidden, named as the assume-role step."""
    await sm.create_secret(Name="a", SecretString="1")
    proxy.fail("AccessDenied", status=403, operation="AssumeRole")
    resolver = build({"assume_role_arn": ROLE, "sts_endpoint_url": proxy.url})
    with pytest.raises(AccessDenied, match=f"assume role {ROLE}"):
        await resolver.resolve("{vault://sm/a}")
    assert proxy.count("GetSecretValue") == 0


async def test_prefetch_of_50_uses_batch_calls(sm: Any, proxy: MotoProxy, build: Build) -> None:
    """50 AWSCURRENT references cost 3 BatchGetSecretValue calls; #2 goes single; per-secret
    batch errors (missing, deleted) and a bad version fail only their own reference."""
    for n in range(50):
        await sm.create_secret(Name=f"s{n}", SecretString=f"v{n}")
    await sm.put_secret_value(SecretId="s0", SecretString="v0-new")
    await sm.create_secret(Name="gone", SecretString="x")
    await sm.delete_secret(SecretId="gone", RecoveryWindowInDays=7)
    refs = [f"{{vault://sm/s{n}}}" for n in range(50)]
    extra = ["{vault://sm/s0#1}", "{vault://sm/s0#2}", "{vault://sm/missing}", "{vault://sm/gone}",
             "{vault://sm/s1#3}"]  # fmt: skip
    resolver = build()
    failures = await resolver.prefetch(refs + extra)
    assert {ref: exc.code for ref, exc in failures.items()} == {
        "{vault://sm/missing}": "not_found",
        "{vault://sm/gone}": "not_found",
        "{vault://sm/s1#3}": "invalid_reference",
    }
    assert proxy.count("BatchGetSecretValue") == 3
    assert [c.params for c in proxy.calls if c.operation == "GetSecretValue"] == [
        {"SecretId": "s0", "VersionStage": "AWSPREVIOUS"}
    ]
    assert sorted(len(c.params["SecretIdList"]) for c in proxy.calls[:3]) == [12, 20, 20]
    answers = [await resolver.resolve(ref) for ref in [*refs, *extra[:2]]]
    assert [a.value for a in answers] == [
        "v0-new",
        *(f"v{n}" for n in range(1, 50)),
        "v0-new",
        "v0",
    ]
    assert all(a.lookup.cached for a in answers)
    assert len(proxy.calls) == 4


async def test_refresh_of_due_entries_is_batched(sm: Any, proxy: MotoProxy, build: Build) -> None:
    """A refresh of many entries of one vault goes through BatchGetSecretValue too."""
    for n in range(5):
        await sm.create_secret(Name=f"s{n}", SecretString=f"v{n}")
    resolver = build()
    assert await resolver.prefetch([f"{{vault://sm/s{n}}}" for n in range(5)]) == {}
    await sm.put_secret_value(SecretId="s3", SecretString="rotated")
    assert await resolver.refresh_all() == {"ok": 5}
    assert (await resolver.resolve("{vault://sm/s3}")).value == "rotated"
    assert [c.operation for c in proxy.calls] == ["BatchGetSecretValue"] * 2


async def test_refused_batch_falls_back_to_single_calls(
    sm: Any, proxy: MotoProxy, build: Build
) -> None:
    """Without BatchGetSecretValue permission, single calls serve, and batch is not retried."""
    for n in range(25):
        await sm.create_secret(Name=f"s{n}", SecretString=f"v{n}")
    proxy.fail("AccessDeniedException", operation="BatchGetSecretValue")
    resolver = build()
    refs = [f"{{vault://sm/s{n}}}" for n in range(25)]
    assert await resolver.prefetch(refs) == {}
    assert await resolver.refresh_all() == {"ok": 25}
    assert proxy.count("BatchGetSecretValue") == 1  # one probe of the first of two chunks
    assert proxy.count("GetSecretValue") == 50
    assert (await resolver.resolve("{vault://sm/s24}")).value == "v24"


async def test_throttled_batch_is_retried_by_the_resolver(
    sm: Any, proxy: MotoProxy, build: Build
) -> None:
    """A throttled batch (the only chunk) raises, so the resolver retries it."""
    for n in range(3):
        await sm.create_secret(Name=f"s{n}", SecretString=f"v{n}")
    proxy.fail("ThrottlingException", times=1, operation="BatchGetSecretValue")
    failures = await build().prefetch([f"{{vault://sm/s{n}}}" for n in range(3)])
    assert failures == {}
    assert [c.operation for c in proxy.calls] == ["BatchGetSecretValue"] * 2


async def test_two_throttles_are_retried_away(sm: Any, proxy: MotoProxy, build: Build) -> None:
    """Two ThrottlingExceptions, then the value: three calls, all made by the resolver."""
    await sm.create_secret(Name="db", SecretString="v")
    proxy.fail("ThrottlingException", times=2)
    answer = await build(backend_retries=2).resolve("{vault://sm/db}")
    assert answer.value == "v"
    assert proxy.count("GetSecretValue") == 3


@pytest.mark.parametrize(
    ("code", "status"),
    [("ThrottlingException", 400), ("InternalServiceError", 500), ("ServiceUnavailable", 503)],
)
async def test_sdk_makes_a_single_attempt(
    sm: Any, proxy: MotoProxy, build: Build, code: str, status: int
) -> None:
    """With resolver retries off, one transient answer is one call and backend_unavailable."""
    await sm.create_secret(Name="db", SecretString="v")
    proxy.fail(code, status=status, times=1)
    with pytest.raises(BackendUnavailable, match=code):
        await build(backend_retries=0).resolve("{vault://sm/db}")
    assert proxy.count("GetSecretValue") == 1


async def test_persistent_throttle_serves_stale_then_unavailable(
    sm: Any, proxy: MotoProxy, build: Build, clock: ManualClock
) -> None:
    """Past ttl a throttled backend serves the last value stale until resurrect_ttl ends."""
    await sm.create_secret(Name="db", SecretString=value("good"))
    resolver = build({"ttl": 60, "resurrect_ttl": 120}, backend_retries=2)
    assert (await resolver.resolve("{vault://sm/db}")).value == value("good")
    proxy.fail("ThrottlingException")
    clock.advance(61)
    stale = await resolver.resolve("{vault://sm/db}")
    assert (stale.value, stale.lookup.stale) == (value("good"), True)
    assert proxy.count("GetSecretValue") == 1 + 3
    clock.advance(120)
    with raises_clean(BackendUnavailable, match="ThrottlingException"):
        await resolver.resolve("{vault://sm/db}")
    proxy.heal()
    clock.advance(120)
    answer = await resolver.resolve("{vault://sm/db}")
    assert (answer.value, answer.lookup.stale) == (value("good"), False)


async def test_read_timeout_is_backend_timeout(sm: Any, proxy: MotoProxy, build: Build) -> None:
    """No answer within read_timeout is backend_timeout (transient)."""
    await sm.create_secret(Name="db", SecretString=value("v"))
    proxy.hang()
    resolver = build({"read_timeout": 0.2}, backend_retries=0)
    with raises_clean(BackendTimeout, match="timeout") as caught:
        await resolver.resolve("{vault://sm/db}")
    assert caught.value.transient


async def test_unreachable_endpoint_is_unavailable(proxy: MotoProxy, build: Build) -> None:
    """A refused connection is backend_unavailable (transient)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    resolver = build({"endpoint_url": f"http://127.0.0.1:{port}"}, backend_retries=0)
    with pytest.raises(BackendUnavailable, match="cannot reach AWS"):
        await resolver.resolve("{vault://sm/db}")


async def test_unknown_credentials_are_forbidden_without_echoing_them(
    moto_url: str, sm: Any, proxy: MotoProxy, build: Build
) -> None:
    """Keys AWS does not know are forbidden, for a batch too; no key appears in the message."""
    await sm.create_secret(Name="db", SecretString=value("s3cr3t"))
    await moto_auth(moto_url)
    with raises_clean(AccessDenied) as caught:
        await build().resolve("{vault://sm/db}")
    assert caught.value.code == "forbidden"
    for leak in (ACCESS_KEY, SECRET_KEY, value("s3cr3t")):
        assert leak not in caught.value.message
    proxy.calls.clear()
    failures = await build().prefetch(["{vault://sm/db}", "{vault://sm/other}"])
    assert {exc.code for exc in failures.values()} == {"forbidden"}
    assert [c.operation for c in proxy.calls] == ["BatchGetSecretValue"]  # no single retries


async def test_no_credentials_is_a_backend_error(
    proxy: MotoProxy, build: Build, aws_env: pytest.MonkeyPatch
) -> None:
    """An empty credential chain is a permanent backend_error that says so."""
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(BackendError, match="no usable AWS credentials"):
        await build().resolve("{vault://sm/db}")
    assert proxy.calls == []


def test_config_fields_are_validated(aws_env: pytest.MonkeyPatch) -> None:
    """Unknown fields (a static key) and bad values are config errors naming the field."""
    with pytest.raises(ConfigError, match="aws_secret_access_key"):
        make_resolver((VaultEntity(prefix="sm", name="aws",
                                   config={"aws_secret_access_key": "x"}),))  # fmt: skip
    with pytest.raises(ConfigError, match="endpoint_url"):
        make_resolver((VaultEntity(prefix="sm", name="aws", config={"endpoint_url": "ftp:x"}),))
    widened = VaultEntity(prefix="sm", name="aws", config={"query_overrides": ["read_timeout",
                          "connect_timeout"]})  # fmt: skip
    resolver = make_resolver((widened,), environ={"KONG_VAULT_AWS_REGION": "eu-west-1"})
    settings = resolver.target("{vault://sm/db?read_timeout=1.5}").key.settings
    assert isinstance(settings, AwsSettings)
    assert (settings.region, settings.read_timeout, settings.role_session_name) == (
        "eu-west-1",
        1.5,
        "secret-sidecar",
    )
    with pytest.raises(InvalidReference, match="connect_timeout"):
        resolver.target("{vault://sm/db?connect_timeout=soon}")
    with pytest.raises(UnknownVault):
        make_resolver(environ={"KONG_VAULT_AWS_ASSUME_ROLE_ARN": "nope"}).target("{vault://aws/x}")
