"""Kong's ``aws`` vault: AWS Secrets Manager through aiobotocore.

botocore makes one attempt per call (``total_max_attempts: 1``): the resolver
already retries transient failures with backoff inside its own deadline, and two
retry layers would multiply the calls a throttled account receives.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import botocore
from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioCredentialResolver, AioDeferredRefreshableCredentials
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as AwsConnectionError
from botocore.loaders import create_loader
from pydantic import Field, field_validator

from sidecar.backends.base import QUERY_FIELDS, BackendKind, Fetched, VaultSettings
from sidecar.errors import (
    AccessDenied,
    BackendError,
    BackendFailure,
    BackendTimeout,
    BackendUnavailable,
    CredentialsExpired,
    InvalidReference,
    SecretNotFound,
    Unrecognised,
)

BATCH_SIZE = 20  # BatchGetSecretValue's limit for SecretIdList
PARALLEL = 8  # API calls in flight within one fetch_many
CURRENT = "AWSCURRENT"
Selector = tuple[tuple[str, str], ...]  # GetSecretValue's VersionId/VersionStage arguments
Clock = Callable[[], datetime]

_TRANSIENT = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
    "InternalServiceError", "InternalFailure", "ServiceUnavailable", "RequestTimeout",
    "RequestTimeoutException", "SlowDown", "PriorRequestNotComplete", "IDPCommunicationError",
})  # fmt: skip
_DENIED = frozenset({
    "AccessDeniedException", "AccessDenied", "UnrecognizedClientException",
    "InvalidClientTokenId", "InvalidSignatureException", "SignatureDoesNotMatch",
    "IncompleteSignature", "MissingAuthenticationToken",
})  # fmt: skip
# Our own credentials ran out: a new client re-reads the credential chain, then one retry.
_EXPIRED = frozenset({"ExpiredTokenException", "ExpiredToken", "RequestExpired"})
# The request's shape or the vault's settings are wrong: asking again as is will not help.
_REFUSED = frozenset({
    "InvalidParameterException", "InvalidRequestException", "ValidationException",
    "InvalidParameterValue", "MalformedQueryString",
})  # fmt: skip
# A whole BatchGetSecretValue refused like this is not worth trying again on that client.
_BATCH_REFUSED = frozenset({
    "AccessDeniedException", "AccessDenied", "UnknownOperationException", "InvalidAction",
    "NotImplemented", "NotImplementedException", "UnsupportedOperation",
})  # fmt: skip
_DELETED = re.compile(r"delet", re.IGNORECASE)


class AwsSettings(VaultSettings):
    """Kong's fields, our ``version_id``/``version_stage`` extension and per-attempt timeouts.

    No credential fields on purpose: credentials come from the standard AWS chain
    (plus ``assume_role_arn``), so none ever sits in a config file or a reference.
    A query may pick a version; region, endpoints and role only if the vault widens it.
    """

    query_fields: ClassVar[frozenset[str]] = QUERY_FIELDS | {"version_id", "version_stage"}

    region: str | None = Field(default=None, min_length=1)
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://")
    assume_role_arn: str | None = Field(default=None, pattern=r"^arn:[\w-]+:iam::\d{12}:role/")
    role_session_name: str = Field(default="secret-sidecar", pattern=r"^[\w+=,.@-]{2,64}$")
    sts_endpoint_url: str | None = Field(default=None, pattern=r"^https?://")
    version_id: str | None = Field(default=None, min_length=1)
    version_stage: str | None = Field(default=None, min_length=1)
    connect_timeout: float = Field(default=3.0, gt=0)
    read_timeout: float = Field(default=5.0, gt=0)

    @field_validator("region")
    @classmethod
    def _known_region(cls, region: str | None) -> str | None:
        """Kong's schema lists the regions it accepts; ours is botocore's list, newer."""
        if region is not None and region not in known_regions():
            raise ValueError(
                f"must be an AWS region botocore {botocore.__version__} knows:"
                f" {', '.join(sorted(known_regions()))}"
            )
        return region

    @field_validator("endpoint_url", "sts_endpoint_url")
    @classmethod
    def _has_host(cls, url: str | None) -> str | None:
        """Kong's ``typedefs.url`` wants a scheme and a host."""
        if url is not None and not urlsplit(url).hostname:
            raise ValueError("must be an http(s) URL with a host, e.g. https://vpce.example:443")
        return url


@functools.cache
def known_regions() -> frozenset[str]:
    """Every region of every partition in botocore's own endpoint data (offline, read once)."""
    data = create_loader().load_data("endpoints")
    return frozenset(region for partition in data["partitions"] for region in partition["regions"])


@dataclass(frozen=True, slots=True)
class Target:
    """What makes two clients different; settings equal in these share one client."""

    region: str | None
    endpoint_url: str | None
    assume_role_arn: str | None
    role_session_name: str
    sts_endpoint_url: str | None
    connect_timeout: float
    read_timeout: float


def selector(version: int | None, settings: AwsSettings) -> Selector:
    """Kong's mapping (none or ``#1`` AWSCURRENT, ``#2`` AWSPREVIOUS), or the query's choice.

    Through ``check`` the resolver runs it when a reference is bound, so an impossible
    version is refused before any cache entry or AWS call.
    """
    if settings.version_id or settings.version_stage:
        if version is not None:
            raise InvalidReference("use either #version or version_id/version_stage, not both")
        chosen = (("VersionId", settings.version_id), ("VersionStage", settings.version_stage))
        return tuple((name, value) for name, value in chosen if value)
    if version is None or version == 1:
        return (("VersionStage", CURRENT),)
    if version == 2:
        return (("VersionStage", "AWSPREVIOUS"),)
    raise InvalidReference("invalid version for aws secret manager")


def secret_text(response: Mapping[str, Any], what: str) -> Fetched:
    """SecretString as is; SecretBinary as UTF-8 text, or base64 when it is not UTF-8."""
    if isinstance(response.get("SecretString"), str):
        value: str = response["SecretString"]
    elif isinstance(response.get("SecretBinary"), bytes):
        data: bytes = response["SecretBinary"]
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            value = base64.b64encode(data).decode("ascii")
    else:
        raise BackendError(f"{what}: answer has neither SecretString nor SecretBinary")
    return Fetched(value, response.get("VersionId"))


def code_failure(code: str, status: int | None, message: str, what: str) -> BackendFailure:
    """An AWS error code (a call's or a batch item's) as ours; AWS's text is only inspected."""
    if code == "ResourceNotFoundException":
        return SecretNotFound(f"{what}: not found")
    if code == "InvalidRequestException" and _DELETED.search(message):
        return SecretNotFound(f"{what}: secret is scheduled for deletion")
    if code in _EXPIRED:
        return CredentialsExpired(f"{what}: our AWS credentials expired ({code})")
    if code in _DENIED or status in (401, 403):
        return AccessDenied(f"{what}: access denied ({code})")
    if code == "DecryptionFailure":
        return AccessDenied(f"{what}: cannot decrypt (check kms:Decrypt on its KMS key)")
    if code in _TRANSIENT or status == 429 or (status or 0) >= 500:
        return BackendUnavailable(f"{what}: Secrets Manager unavailable ({code})")
    if code in _REFUSED:
        return BackendError(f"{what}: request refused ({code})")
    return Unrecognised(f"{what}: unrecognised error ({code})", f"aws:{code}")


def map_error(exc: Exception, what: str) -> BackendFailure:
    """The one place botocore errors become ours. No request, response or credential text."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code_failure(str(error.get("Code", status)), status, error.get("Message", ""), what)
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return BackendTimeout(f"{what}: no answer within the connect/read timeout")
    if isinstance(exc, AwsConnectionError | HTTPClientError | CredentialRetrievalError):
        # CredentialRetrievalError: a metadata/STS endpoint failed; a blip must not drop values
        return BackendUnavailable(f"{what}: cannot reach AWS ({type(exc).__name__})")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return BackendError(f"{what}: no usable AWS credentials in the standard chain")
    if isinstance(exc, NoRegionError):
        return BackendError(f"{what}: no region; set region, AWS_REGION or AWS_DEFAULT_REGION")
    return Unrecognised.of(exc, what)


class _AssumedRole:
    """A credential provider: temporary credentials of ``RoleArn``, renewed before expiry.

    botocore refreshes them (advisory 15 min, mandatory 10 min before they
    expire) on the signing path, so no timer task is needed.
    """

    METHOD = "assume-role"

    def __init__(self, sts: Any, role_arn: str, session_name: str, now: Clock) -> None:
        self._sts, self._role_arn, self._session_name, self._now = sts, role_arn, session_name, now

    async def load(self) -> Any:
        return AioDeferredRefreshableCredentials(self._refresh, self.METHOD, self._now)

    async def _refresh(self) -> dict[str, Any]:
        try:
            answer = await self._sts.assume_role(
                RoleArn=self._role_arn, RoleSessionName=self._session_name
            )
        except (ClientError, BotoCoreError) as exc:
            raise map_error(exc, f"assume role {self._role_arn}") from None
        creds = answer["Credentials"]
        return {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": creds["Expiration"].isoformat(),
        }


class AwsBackend:
    """One client per effective (region, endpoint, role, timeouts), made on first use."""

    def __init__(
        self, vault: str, environ: Mapping[str, str] | None = None, now: Clock | None = None
    ) -> None:
        self._vault = vault
        self._environ = os.environ if environ is None else environ
        self._now = now or (lambda: datetime.now(UTC))
        self._clients: dict[Target, Any] = {}
        self._batching: dict[Target, bool] = {}  # False: refused; unknown until the first batch
        self._stack = AsyncExitStack()
        self._lock = asyncio.Lock()

    async def start(self, settings: AwsSettings) -> None:
        """Nothing to open yet: region, endpoint and role may differ per reference."""

    def target(self, settings: AwsSettings) -> Target:
        """Kong's region fallback (``AWS_REGION``) first; None leaves it to botocore."""
        region = settings.region or self._environ.get("AWS_REGION") or None
        return Target(region, settings.endpoint_url, settings.assume_role_arn,
                      settings.role_session_name, settings.sts_endpoint_url,
                      settings.connect_timeout, settings.read_timeout)  # fmt: skip

    async def client(self, target: Target) -> Any:
        async with self._lock:
            if target not in self._clients:
                try:
                    self._clients[target] = await self._connect(target)
                except (ClientError, BotoCoreError) as exc:
                    raise map_error(exc, f"vault {self._vault!r}") from None
            return self._clients[target]

    async def _connect(self, t: Target) -> Any:
        """The secretsmanager client (and, for a role, the STS client its credentials use)."""
        config = AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=t.connect_timeout,
            read_timeout=t.read_timeout,
            max_pool_connections=2 * PARALLEL,
            user_agent_extra="secret-sidecar",
        )
        async with AsyncExitStack() as stack:  # closes what was opened if a step fails
            session = AioSession()
            if t.assume_role_arn:
                sts = await stack.enter_async_context(
                    session.create_client(
                        "sts", region_name=t.region, endpoint_url=t.sts_endpoint_url, config=config
                    )
                )
                role = _AssumedRole(sts, t.assume_role_arn, t.role_session_name, self._now)
                session = AioSession()
                session.register_component("credential_provider", AioCredentialResolver([role]))
            client = await stack.enter_async_context(
                session.create_client(
                    "secretsmanager", region_name=t.region, endpoint_url=t.endpoint_url,
                    config=config,
                )
            )  # fmt: skip
            self._stack.push_async_callback(stack.pop_all().aclose)
        return client

    def forget(self, target: Target) -> None:
        """Drop a client whose credentials expired: the next call builds a new one, which
        reads the credential chain again (a rotated web identity token, new instance
        credentials). The old one stays open until ``close``, for calls still using it."""
        self._clients.pop(target, None)

    async def fetch(self, secret_id: str, version: int | None, settings: AwsSettings) -> Fetched:
        chosen = selector(version, settings)
        target = self.target(settings)
        try:
            return await self._get(await self.client(target), secret_id, chosen)
        except CredentialsExpired:
            self.forget(target)
            raise

    async def _get(self, client: Any, secret_id: str, chosen: Selector) -> Fetched:
        what = f"secret {secret_id!r} ({', '.join(value for _, value in chosen)})"
        try:
            response = await client.get_secret_value(SecretId=secret_id, **dict(chosen))
        except (ClientError, BotoCoreError) as exc:
            raise map_error(exc, what) from None
        return secret_text(response, what)

    async def fetch_many(
        self, items: Sequence[tuple[str, int | None]], settings: AwsSettings
    ) -> list[Fetched | BackendFailure]:
        """AWSCURRENT reads in BatchGetSecretValue calls of 20; the rest, and what a
        batch leaves unanswered or refuses, in single calls (at most ``PARALLEL`` at once).

        Raises only when every item failed transiently, so the resolver retries the lot.
        """
        target = self.target(settings)
        client = await self.client(target)
        results: dict[int, Fetched | BackendFailure] = {}
        current: dict[str, list[int]] = {}  # secret id -> indexes asking for AWSCURRENT
        singles: list[tuple[int, Selector]] = []
        for index, (secret_id, version) in enumerate(items):
            chosen = selector(version, settings)
            if chosen == (("VersionStage", CURRENT),) and self._batching.get(target, True):
                current.setdefault(secret_id, []).append(index)
            else:
                singles.append((index, chosen))
        gate = asyncio.Semaphore(PARALLEL)
        ids = list(current)
        chunks = [ids[i : i + BATCH_SIZE] for i in range(0, len(ids), BATCH_SIZE)]
        answers: dict[str, Fetched | BackendFailure] = {}
        if chunks and target not in self._batching:  # one probe, not 50 refusals at once
            answers.update(await self._batch(client, target, chunks.pop(0), gate))
        for found in await asyncio.gather(*(self._batch(client, target, c, gate) for c in chunks)):
            answers.update(found)
        for secret_id, indexes in current.items():
            if secret_id in answers:
                results.update(dict.fromkeys(indexes, answers[secret_id]))
            else:
                singles += [(index, (("VersionStage", CURRENT),)) for index in indexes]

        async def single(index: int, chosen: Selector) -> None:
            async with gate:
                try:
                    results[index] = await self._get(client, items[index][0], chosen)
                except BackendFailure as exc:
                    results[index] = exc

        await asyncio.gather(*(single(index, chosen) for index, chosen in singles))
        ordered = [results[index] for index in range(len(items))]
        failures = [r for r in ordered if isinstance(r, BackendFailure) and r.transient]
        if any(isinstance(r, CredentialsExpired) for r in failures):
            self.forget(target)
        if failures and len(failures) == len(ordered):
            raise failures[0]
        return ordered

    async def _batch(
        self, client: Any, target: Target, ids: list[str], gate: asyncio.Semaphore
    ) -> dict[str, Fetched | BackendFailure]:
        """Answers by secret id; ids left out of it go to single calls."""
        async with gate:
            if not self._batching.get(target, True):
                return {}
            try:
                response = await client.batch_get_secret_value(SecretIdList=ids)
            except (ClientError, BotoCoreError) as exc:
                code = (
                    exc.response.get("Error", {}).get("Code")
                    if isinstance(exc, ClientError)
                    else None
                )
                if code in _BATCH_REFUSED:  # no permission for, or no such, operation
                    self._batching[target] = False
                    return {}
                failure = map_error(exc, "batch")
                credentials = isinstance(exc, NoCredentialsError | PartialCredentialsError)
                if failure.transient or isinstance(failure, AccessDenied) or credentials:
                    return {name: map_error(exc, _what(name)) for name in ids}  # same for singles
                return {}  # e.g. a malformed id: single calls tell each secret's own story
        self._batching[target] = True
        answers: dict[str, Fetched | BackendFailure] = {}
        asked = set(ids)
        for value in response.get("SecretValues", []):
            for name in {value.get("Name"), value.get("ARN")} & asked:
                try:
                    answers[name] = secret_text(value, _what(name))
                except BackendFailure as exc:
                    answers[name] = exc
        for error in response.get("Errors", []):
            if error.get("SecretId") in asked:
                name = error["SecretId"]
                code = error.get("ErrorCode", "UnknownError")
                answers[name] = code_failure(code, None, error.get("Message", ""), _what(name))
        return answers

    async def close(self) -> None:
        stack, self._stack, self._clients = self._stack, AsyncExitStack(), {}
        await stack.aclose()


def _what(secret_id: str) -> str:
    return f"secret {secret_id!r} ({CURRENT})"


def check(secret_id: str, version: int | None, settings: AwsSettings) -> None:
    selector(version, settings)


KIND = BackendKind(name="aws", settings=AwsSettings, create=AwsBackend, check=check)
