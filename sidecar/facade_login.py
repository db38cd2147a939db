"""Kubernetes login for the Vault-KV facade: a projected service-account token in, a
short-lived facade token out.

This is the exchange Kong's bundled ``hcv`` vault performs with ``auth_method:
kubernetes`` (``POST /v1/auth/kubernetes/login`` with ``{jwt, role}``). Unlike Vault,
the sidecar does not ask the API server's TokenReview whether the token is still
valid: it verifies the JWT itself against the cluster's published signing keys (a
JWKS file, or the issuer's OpenID discovery document), its issuer, audience and
lifetime, so it needs no RBAC beyond reading the keys and works offline once started.
The price is that a deleted pod's token stays valid until it expires: hence the
handed-out token never outlives the JWT, and a dedicated audience (a projected token
for this sidecar only) is what stops a token meant for someone else from working here.

PyJWT does the cryptography and the registered claims; this module picks the key
(by ``kid``, asymmetric algorithms only, so ``none`` and the HMAC-with-a-public-key
confusion cannot reach a verifier), checks the Kubernetes claims and the role's
binding, and says why a login was refused without repeating the token.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import yarl

from sidecar.config import FacadeKubernetes, FacadeRole
from sidecar.errors import Forbidden, StartupError
from sidecar.facade_tokens import TokenTable
from sidecar.logging import get_logger

log = get_logger("sidecar.facade_login")

# What the API server signs with: RS256 for an RSA service-account key, ES256/384/512
# for an ECDSA one (by curve). Never "none", never HMAC: a verifier keyed with a
# public key must not be offered an algorithm that treats that key as a shared secret.
ALGORITHMS = ("RS256", "ES256", "ES384", "ES512")
_KEY_TYPES = frozenset({"RSA", "EC"})
REFETCH_INTERVAL = 60.0  # seconds between key loads, on an unknown kid (key rotation)
FETCH_TIMEOUT = 10.0  # seconds for one discovery or JWKS request
MAX_JWT = 16 * 1024  # characters; projected tokens are about 1 KiB
MAX_DOCUMENT = 1024 * 1024  # bytes of a discovery document or JWKS
MIN_TTL = 1.0  # seconds: a JWT closer than this to its exp is refused as expired
LEASE_MARGIN = 5.0  # seconds, at most 10 % of the token's life: see ``_lease``

_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # DNS-1123 label
_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # DNS-1123 subdomain
_UID = re.compile(r"[A-Za-z0-9-]{1,64}")
_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # config's name pattern
_SUBJECT_PREFIX = "system:serviceaccount:"


class LoginRefused(Forbidden):
    """A login the facade refuses; ``reason`` is a stable word for counters and logs.

    The message says why in general terms and may name the service account (namespace
    and name are not secrets), never the token or other claim values."""

    code = "forbidden"
    status = 403

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Issued:
    """A successful login, in the terms of Vault's ``auth`` answer.

    ``lease_seconds`` is what to answer as ``lease_duration``: a little less than the
    token's real life, never 0 (Kong's cache takes a ttl of 0 as "forever")."""

    token: str
    role: str
    name: str  # the token's holder name, the peer in audit events: kubernetes:<role>
    lease_seconds: int
    policies: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)


Keys = dict[str | None, jwt.PyJWK]  # by kid; None for a key published without one


class KubernetesLogin:
    """Verifies service-account JWTs and hands out facade tokens for the roles they bind.

    ``clock`` is monotonic (the refetch interval), ``wall`` the Unix time the JWT's
    ``exp`` is compared with; ``bearer_token_file`` (such as the pod's own
    ``/var/run/secrets/kubernetes.io/serviceaccount/token``) is sent to the discovery
    URL's origin only, for API servers that do not serve discovery anonymously, and
    read again at each fetch since the kubelet rotates it.
    """

    def __init__(
        self,
        settings: FacadeKubernetes,
        tokens: TokenTable,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        bearer_token_file: Path | None = None,
        fetch_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._roles: dict[str, FacadeRole] = {role.name: role for role in settings.roles}
        self._clock = clock
        self._wall = wall
        self._bearer_token_file = bearer_token_file
        self._timeout = fetch_timeout
        self._keys: Keys = {}
        self._loaded_at = -math.inf  # a login before a successful start may load
        self._lock = asyncio.Lock()  # one key load at a time
        self.accepted = 0
        self.refusals: collections.Counter[str] = collections.Counter()

    @property
    def key_ids(self) -> frozenset[str | None]:
        """The ``kid`` of every key currently trusted."""
        return frozenset(self._keys)

    async def start(self) -> None:
        """Load the signing keys; a failure is a ``StartupError`` saying what is wrong."""
        async with self._lock:
            self._loaded_at = self._clock()
            self._keys = await self._load()
        log.info("facade.login_keys_loaded", keys=len(self._keys), source=self._source())

    async def close(self) -> None:
        """Wait for a key load in progress; nothing else is held between loads (each
        opens and closes its own HTTP session: they happen once a minute at most)."""
        async with self._lock:
            self._keys = {}

    async def login(self, jwt_text: object, role: object) -> Issued:
        """Exchange a service-account JWT for a facade token of ``role``.

        Raises ``LoginRefused`` (403) for every refusal, ``TooManyRequests`` (429) when
        the token table is full. Arguments are ``object`` because they come straight
        from a JSON body: a non-string is refused like any malformed input.
        """
        try:
            issued = await self._login(jwt_text, role)
        except LoginRefused as exc:
            self.refusals[exc.reason] += 1
            log.warning(
                "facade.login_refused",
                reason=exc.reason,
                error=exc.message,
                role=role if isinstance(role, str) and role in self._roles else None,
            )
            raise
        self.accepted += 1
        log.info(
            "facade.login",
            role=issued.role,
            namespace=issued.metadata["service_account_namespace"],
            service_account=issued.metadata["service_account_name"],
            lease_seconds=issued.lease_seconds,
        )
        return issued

    async def _login(self, jwt_text: object, role_name: object) -> Issued:
        role = self._roles.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            shown = f" {role_name!r}" if isinstance(role_name, str) and _safe(role_name) else ""
            raise LoginRefused("unknown_role", f"unknown role{shown}")
        if not isinstance(jwt_text, str) or not jwt_text or len(jwt_text) > MAX_JWT:
            raise LoginRefused("malformed", "jwt must be a non-empty JWT of at most 16 KiB")
        try:
            header = jwt.get_unverified_header(jwt_text)
        except jwt.PyJWTError:
            raise LoginRefused("malformed", "jwt is not a well-formed JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise LoginRefused(
                "algorithm",
                "the JWT's signing algorithm is not accepted (only " + ", ".join(ALGORITHMS) + ")",
            )
        if kid is not None and not isinstance(kid, str):
            raise LoginRefused("malformed", "the JWT's key id is not a string")
        key = await self._key(kid)
        if key is None:
            raise LoginRefused(
                "unknown_key", "the JWT is signed with a key the cluster's issuer does not publish"
            )
        claims = self._verify(jwt_text, key)
        namespace, account = _service_account(claims)
        if not any(fnmatchcase(f"{namespace}/{account}", g) for g in role.service_accounts):
            raise LoginRefused(
                "not_bound",
                f"service account {namespace}/{account} is not bound to role {role.name!r}",
            )
        try:
            remaining = float(claims["exp"]) - self._wall()
        except (TypeError, ValueError, OverflowError):  # PyJWT took it as an int: a huge one
            raise LoginRefused("malformed", "the JWT's claims are not valid") from None
        ttl = min(self._settings.token_ttl, remaining)
        if ttl < MIN_TTL:  # within the leeway past exp: the new token would outlive the JWT
            raise LoginRefused("expired", "the JWT has expired")
        name = f"kubernetes:{role.name}"
        token = self._tokens.issue(name, role.allow, ttl)
        metadata = {
            "role": role.name,
            "service_account_namespace": namespace,
            "service_account_name": account,
        }
        uid = _claim_uid(claims)
        if uid is not None:
            metadata["service_account_uid"] = uid
        return Issued(token, role.name, name, _lease(ttl), (name,), metadata)

    def _verify(self, jwt_text: str, key: jwt.PyJWK) -> dict[str, Any]:
        """Signature, algorithm bound to the key, and the registered claims, by PyJWT."""
        try:
            return jwt.decode(
                jwt_text,
                key=key,
                algorithms=[key.algorithm_name],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway,
                options={
                    "require": ["exp", "iss", "aud", "sub"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise LoginRefused("signature", "the JWT's signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise LoginRefused(
                "algorithm", "the JWT's signing algorithm does not match its key's"
            ) from None
        except jwt.ExpiredSignatureError:
            raise LoginRefused("expired", "the JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise LoginRefused("not_yet_valid", "the JWT is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise LoginRefused(
                "audience", "the JWT is not meant for this audience (wrong aud)"
            ) from None
        except jwt.InvalidIssuerError:
            raise LoginRefused("issuer", "the JWT is from another issuer (wrong iss)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise LoginRefused("missing_claim", f"the JWT has no {exc.claim!r} claim") from None
        except jwt.PyJWTError:  # a claim of the wrong type, a key refused by PyJWT
            raise LoginRefused("malformed", "the JWT's claims are not valid") from None

    async def _key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for ``kid``; an unknown one loads the keys again, at most once a
        ``REFETCH_INTERVAL`` (so random kids cannot make us hammer the API server)."""
        key = _pick(self._keys, kid)
        if key is not None:
            return key
        async with self._lock:
            key = _pick(self._keys, kid)  # loaded by another login meanwhile
            if key is not None or self._clock() - self._loaded_at < REFETCH_INTERVAL:
                return key
            self._loaded_at = self._clock()  # a failed load counts too
            try:
                keys = await self._load()
            except StartupError as exc:
                log.warning("facade.login_keys_reload_failed", error=exc.message)
                return None
            added = len(set(keys) - set(self._keys))
            self._keys = keys
            log.info("facade.login_keys_reloaded", keys=len(keys), new=added)
            return _pick(keys, kid)

    def _source(self) -> str:
        return str(self._settings.jwks_file or self._settings.discovery_url)

    async def _load(self) -> Keys:
        if self._settings.jwks_file is not None:
            path = self._settings.jwks_file
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StartupError(
                    f"facade kubernetes: cannot read {path}: {exc.strerror}"
                ) from None
            return _parse_jwks(data, str(path))
        assert self._settings.discovery_url is not None  # the model requires one of the two
        return await self._discover(self._settings.discovery_url)

    async def _discover(self, url: str) -> Keys:
        """Discovery document -> ``jwks_uri`` -> keys, both over verified TLS."""
        _plain_http_only_to_loopback(url, "discovery_url")
        context = self._tls()
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            document = _json_object(await self._get(session, url, context), url)
            issuer = document.get("issuer")
            if issuer is not None and issuer != self._settings.issuer:
                raise StartupError(
                    f"facade kubernetes: {url} names issuer {issuer!r}, the config"
                    f" {self._settings.issuer!r}: tokens would all be refused"
                )
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                raise StartupError(f"facade kubernetes: {url} has no http(s) jwks_uri")
            _plain_http_only_to_loopback(jwks_uri, "the discovered jwks_uri")
            return _parse_jwks(await self._get(session, jwks_uri, context), jwks_uri)

    async def _get(
        self, session: aiohttp.ClientSession, url: str, context: ssl.SSLContext
    ) -> bytes:
        headers = {"Accept": "application/json"}
        bearer = self._bearer(url)
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            async with session.get(
                url,
                headers=headers,
                ssl=context if url.startswith("https://") else True,
                allow_redirects=bearer is None,  # a redirect must not carry our token away
            ) as response:
                if response.status != 200:
                    followed = " (redirects are not followed with a bearer token)"
                    raise StartupError(
                        f"facade kubernetes: {url} answered {response.status}"
                        + (followed if 300 <= response.status < 400 else "")
                    )
                body = await response.content.read(MAX_DOCUMENT + 1)
        except aiohttp.ClientConnectorCertificateError:
            raise StartupError(
                f"facade kubernetes: {url}: the server's TLS certificate is not trusted"
                + (f" by {self._settings.ca_file}" if self._settings.ca_file else " (set ca_file)")
            ) from None
        except TimeoutError:
            raise StartupError(
                f"facade kubernetes: {url} did not answer within {self._timeout:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise StartupError(f"facade kubernetes: cannot fetch {url}: {exc}") from None
        if len(body) > MAX_DOCUMENT:
            raise StartupError(f"facade kubernetes: {url} is larger than 1 MiB")
        return body

    def _tls(self) -> ssl.SSLContext:
        ca_file = self._settings.ca_file
        try:
            return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"facade kubernetes: cannot load ca_file {ca_file}: {exc}") from None

    def _bearer(self, url: str) -> str | None:
        if self._bearer_token_file is None or self._settings.discovery_url is None:
            return None
        if yarl.URL(url).origin() != yarl.URL(self._settings.discovery_url).origin():
            return None  # a jwks_uri elsewhere (a cloud's public OIDC bucket) gets no token
        try:
            token = self._bearer_token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise StartupError(
                f"facade kubernetes: cannot read the bearer token file {self._bearer_token_file}"
            ) from None
        return token or None


def _parse_jwks(data: bytes, where: str) -> Keys:
    """The usable verification keys of a JWKS; keys for other uses, symmetric keys,
    private keys and keys too short for their algorithm are left out, and a set with
    none left is an error (no login could ever succeed)."""
    document = _json_object(data, where)
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise StartupError(f"facade kubernetes: {where} is not a JWKS (no keys list)")
    keys: Keys = {}
    skipped = 0
    for entry in entries:
        key = _usable(entry)
        if key is None:
            skipped += 1
        else:
            keys.setdefault(key.key_id, key)
    if skipped:
        log.warning("facade.login_keys_skipped", source=where, skipped=skipped)
    if not keys:
        raise StartupError(
            f"facade kubernetes: {where} holds no usable signing key"
            f" ({', '.join(ALGORITHMS)}; RSA of 2048 bits or more)"
        )
    return keys


def _usable(entry: object) -> jwt.PyJWK | None:
    if not isinstance(entry, dict) or entry.get("kty") not in _KEY_TYPES:
        return None
    if entry.get("use", "sig") != "sig" or "d" in entry:  # "d": private material
        return None
    if entry.get("alg") is not None and entry.get("alg") not in ALGORITHMS:
        return None
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        key = jwt.PyJWK(entry)
        if key.algorithm_name not in ALGORITHMS:  # such as ES256K, from a curve
            return None
        if key.Algorithm.check_key_length(key.Algorithm.prepare_key(key.key)):
            return None
    except jwt.PyJWTError:
        return None
    return key


def _pick(keys: Keys, kid: str | None) -> jwt.PyJWK | None:
    """By ``kid``; a JWT without one only when the issuer publishes a single key."""
    if kid is None and len(keys) == 1:
        return next(iter(keys.values()))
    return keys.get(kid)


def _service_account(claims: Mapping[str, Any]) -> tuple[str, str]:
    """``(namespace, name)`` from ``sub``, checked against the ``kubernetes.io`` claim."""
    subject = claims.get("sub")
    parts = subject[len(_SUBJECT_PREFIX) :].split(":") if isinstance(subject, str) else []
    if (
        not isinstance(subject, str)
        or not subject.startswith(_SUBJECT_PREFIX)
        or len(parts) != 2
        or not _NAMESPACE.fullmatch(parts[0])
        or not _ACCOUNT.fullmatch(parts[1])
    ):
        raise LoginRefused(
            "subject",
            "the JWT is not a service account's (sub is not"
            " system:serviceaccount:<namespace>:<name>)",
        )
    namespace, account = parts
    kubernetes = claims.get("kubernetes.io")
    if kubernetes is not None:
        named = kubernetes.get("serviceaccount") if isinstance(kubernetes, dict) else None
        if (
            not isinstance(kubernetes, dict)
            or kubernetes.get("namespace") != namespace
            or not isinstance(named, dict)
            or named.get("name") != account
        ):
            raise LoginRefused(
                "claims_mismatch", "the JWT's kubernetes.io claim disagrees with its sub"
            )
    return namespace, account


def _claim_uid(claims: Mapping[str, Any]) -> str | None:
    kubernetes = claims.get("kubernetes.io")
    named = kubernetes.get("serviceaccount") if isinstance(kubernetes, dict) else None
    uid = named.get("uid") if isinstance(named, dict) else None
    return uid if isinstance(uid, str) and _UID.fullmatch(uid) else None


def _lease(ttl: float) -> int:
    """What the client is told: the life less a margin, so that a client which caches the
    token for ``lease_duration`` from when it got the answer (Kong does) logs in again
    before we drop it; at least 1 second, since Kong's cache takes 0 as "no expiry"."""
    return max(1, math.floor(ttl - min(LEASE_MARGIN, ttl / 10)))


def _safe(text: str) -> bool:
    return bool(_ROLE.fullmatch(text))


def _json_object(data: bytes, where: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise StartupError(f"facade kubernetes: {where} is not JSON") from None
    if not isinstance(document, dict):
        raise StartupError(f"facade kubernetes: {where} is not a JSON object")
    return document


def _plain_http_only_to_loopback(url: str, what: str) -> None:
    """The keys decide who logs in: fetched in clear, anyone on the path could swap them."""
    parsed = yarl.URL(url)
    if parsed.scheme == "http" and parsed.host not in {"127.0.0.1", "::1", "localhost"}:
        raise StartupError(
            f"facade kubernetes: {what} {url} is plain http to a non-loopback host;"
            " use https (with ca_file for a private CA)"
        )
