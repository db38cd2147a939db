"""A HashiCorp Vault KV API over the resolver, for Kong's bundled ``hcv`` vault.

Konnect-managed gateways cannot load a custom vault, but Kong's ``hcv`` vault already
speaks Vault's KV HTTP API to any address. On a loopback port the sidecar answers that
API, read-only: ``GET /v1/<mount>/data/<vault>/<secret-id...>[?version=n]`` (KV v2;
``/v1/<mount>/<vault>/<secret-id...>`` for v1) is the reference
``{vault://<vault>/<secret-id...>/}`` (``#n``), read through the same resolver, cache,
single-flight, in-flight limit, metrics (``endpoint="facade"``) and audit trail as the
socket. Who may read is the token's rule, not a uid; nothing but those reads and the
optional Kubernetes login is answered: no write, list or ``sys`` endpoint exists.

Answers are shaped as Vault's, errors as Vault clients expect them (``{"errors": []}``
with 404 for not found, 403 for a bad token or a path outside its rule).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from aiohttp import web

from sidecar.access import Peer
from sidecar.config import FacadeConfig
from sidecar.errors import (
    ConfigError,
    Forbidden,
    InvalidRequest,
    SidecarError,
    StartupError,
)
from sidecar.facade_tokens import TokenTable
from sidecar.http_message import JSONMessage
from sidecar.logging import get_logger
from sidecar.resolver import Answer
from sidecar.schedule import NEVER
from sidecar.server import (
    CLIENT_GONE,
    NotAllowed,
    State,
    admitted,
    json_body,
    observe,
    read,
    request_factory,
)

if TYPE_CHECKING:  # PyJWT and cryptography: about 9 MiB and 50 ms, for Kubernetes login only
    from sidecar.facade_login import KubernetesLogin

log = get_logger("sidecar.facade")

ENDPOINT = "facade"  # the endpoint label of its requests in metrics
STALE = "X-Secret-Sidecar-Stale"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_VERSION = re.compile(r"[0-9]{1,15}")
_DENIED = {"errors": ["permission denied"]}


@dataclass
class Facade:
    """What the facade's handlers read. ``state`` is the daemon's own, so a reload of
    vaults or ACL reaches the facade too; new facade settings make a new ``Facade``."""

    state: State
    config: FacadeConfig
    tokens: TokenTable
    login: KubernetesLogin | None = None


class _NotFound(Exception):
    """A path the facade does not serve: Vault's 404 with no error text."""


class FacadeListener:
    """The facade's TCP listener across reloads. One token table for the daemon's life:
    a reload re-reads the configured tokens (a rotated token file takes effect), and
    tokens handed out at login stay valid while their role exists."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.tokens = TokenTable()
        self.facade: Facade | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self, config: FacadeConfig) -> None:
        """Listen if enabled; ``ConfigError`` (a token) or ``StartupError`` (the port)."""
        if not config.enabled:
            return
        self.tokens.load(config.tokens, os.environ)
        roles = config.kubernetes.roles if config.kubernetes is not None else ()
        self.tokens.revoke_names({f"kubernetes:{role.name}" for role in roles})
        login = None
        if config.kubernetes is not None:
            from sidecar.facade_login import KubernetesLogin  # noqa: PLC0415 - see the top

            login = KubernetesLogin(
                config.kubernetes,
                self.tokens,
                bearer_token_file=config.kubernetes.discovery_token_file,
            )
            await login.start()
        facade = Facade(self.state, config, self.tokens, login)
        runner = web.ServerRunner(build_facade_server(facade), shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, *config.host_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            if login is not None:
                await login.close()
            raise StartupError(f"cannot listen for the facade on {config.address}: {exc}") from exc
        self.facade, self._runner, self._site = facade, runner, site
        log.info("facade.listening", address=config.address, mount=config.mount, kv=config.kv)

    async def reload(self, old: FacadeConfig, new: FacadeConfig) -> None:
        """New settings: a new listener, or the old one back if that fails."""
        if new == old:
            if self.facade is not None:
                try:
                    self.tokens.load(new.tokens, os.environ)
                except ConfigError as exc:
                    log.error("config.facade_tokens_kept", error=exc.message)
            return
        await self.close()
        try:
            await self.start(new)
        except (ConfigError, StartupError) as exc:
            log.error("config.facade_kept", error=exc.message)
            with contextlib.suppress(ConfigError, StartupError):
                await self.start(old)

    async def stop_accepting(self) -> None:
        if self._site is not None:
            await self._site.stop()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.facade is not None and self.facade.login is not None:
            await self.facade.login.close()
        self.facade, self._runner, self._site = None, None, None


def build_facade_server(facade: Facade) -> web.Server:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return await _guard(facade, request)

    return web.Server(handle, access_log=None, request_factory=request_factory)


async def _guard(facade: Facade, request: web.BaseRequest) -> web.StreamResponse:
    """Routing, errors in Vault's shape, one metric per request and a log line for
    errors (the path is not logged: it names secret ids; the audit trail has them)."""
    started = time.perf_counter()
    status = 500
    try:
        try:
            response = await _route(facade, request)
        except ConnectionError:
            raise
        except Exception as exc:  # every error leaves in Vault's shape
            response = _error(exc)
        status = response.status
        return response
    except ConnectionError:
        status = CLIENT_GONE
        raise
    finally:
        observe(facade.state, request, ENDPOINT, status, started)


async def _route(facade: Facade, request: web.BaseRequest) -> web.StreamResponse:
    config = facade.config
    parts = request.rel_url.raw_path.split("/")  # as sent: percent-decoded once, below
    if len(parts) < 4 or parts[0] != "" or parts[1] != "v1":
        raise _NotFound
    login = facade.login
    if parts[2] == "auth" and login is not None and config.kubernetes is not None:
        if parts[3:] != [config.kubernetes.auth_path, "login"]:
            raise _NotFound
        if request.method != "POST":
            raise NotAllowed(["POST"])
        return await admitted(facade.state, request, lambda s, r: _login(s, r, login))
    if parts[2] != config.mount:
        raise _NotFound
    rest = parts[3:]
    if config.kv == "v2":
        if rest[0] != "data":
            raise _NotFound  # metadata/, delete/, destroy/...: not served
        rest = rest[1:]
    if request.method != "GET":
        raise NotAllowed(["GET"])
    return await admitted(facade.state, request, lambda s, r: _read_secret(facade, r, rest))


def _peer(facade: Facade, request: web.BaseRequest) -> Peer:
    headers = request.headers
    presented = headers.get("X-Vault-Token")
    if presented is None:
        scheme, _, credentials = headers.get("Authorization", "").partition(" ")
        presented = credentials.strip() if scheme.lower() == "bearer" else None
    holder = facade.tokens.holder(presented)
    if holder is None:
        raise Forbidden("permission denied")
    return Peer(None, None, None, token=holder.name, token_allow=holder.allow)


def _reference(segments: list[str], version: int | None) -> str:
    """The reference a path names: the whole secret (trailing ``/``), so ids may hold
    ``/``. The reference grammar percent-decodes each segment twice, as Kong does, so a
    byte outside the unreserved set is written ``%25XX`` to arrive as that byte; nothing
    in a path can add a query or a version to the reference."""
    decoded = [unquote_to_bytes(segment) for segment in segments if segment]
    if len(decoded) < 2:
        raise InvalidRequest("path must name a vault and a secret: <vault>/<secret-id>")
    encoded = [
        "".join(chr(b) if b in _UNRESERVED else f"%25{b:02X}" for b in segment)
        for segment in decoded
    ]
    tail = "" if version is None else f"#{version}"
    return "{vault://" + "/".join(encoded) + "/" + tail + "}"


def _version(facade: Facade, request: web.BaseRequest) -> int | None:
    query = request.query
    unknown = sorted(set(query) - {"version"})
    if unknown:
        raise InvalidRequest(f"unsupported query parameter(s): {', '.join(unknown)}")
    raw = query.getall("version", [])
    if not raw:
        return None
    if len(raw) > 1 or not _VERSION.fullmatch(raw[0]):
        raise InvalidRequest("version must be one decimal number")
    if facade.config.kv == "v1":
        raise InvalidRequest("a KV v1 mount has no versions")
    version = int(raw[0])
    return version or None  # Vault reads version 0 as the latest


async def _read_secret(
    facade: Facade, request: web.BaseRequest, segments: list[str]
) -> JSONMessage:
    peer = _peer(facade, request)  # before anything about the path is said
    ref = _reference(segments, _version(facade, request))
    answer = await read(facade.state, peer, ref, trace=request)
    headers = {STALE: "true"} if answer.lookup.stale else None
    return JSONMessage.of(_secret_body(facade.config, answer), 200, headers)


def _secret_body(config: FacadeConfig, answer: Answer) -> dict[str, Any]:
    """Vault's read answer. A JSON-object secret is the data object (Kong's hcv vault
    re-encodes it and takes its key); any other secret is ``{"value": <text>}``."""
    data = _data(answer.value)
    lease = 0 if answer.lookup.expires_in == NEVER else max(int(answer.lookup.expires_in), 0)
    if config.kv == "v2":
        created = datetime.fromtimestamp(time.time() - answer.lookup.age, UTC)
        version = answer.version
        data = {
            "data": data,
            "metadata": {
                "created_time": created.isoformat().replace("+00:00", "Z"),
                "custom_metadata": None,
                "deletion_time": "",
                "destroyed": False,
                "version": int(version) if version is not None and version.isdigit() else None,
            },
        }
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": lease,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": None,
    }


def _data(value: str) -> dict[str, Any]:
    if value.startswith("{"):
        try:
            document = json.loads(value)
        except (ValueError, RecursionError):
            pass
        else:
            if isinstance(document, dict):
                return document
    return {"value": value}


async def _login(state: State, request: web.BaseRequest, login: KubernetesLogin) -> JSONMessage:
    body = await json_body(state, request, '{"jwt": ..., "role": ...}')
    if not isinstance(body, dict):
        raise InvalidRequest('body must be {"jwt": "<token>", "role": "<role>"}')
    issued = await login.login(body.get("jwt"), body.get("role"))  # it logs the outcome
    auth = {
        "client_token": issued.token,
        "accessor": "",
        "policies": list(issued.policies),
        "token_policies": list(issued.policies),
        "metadata": dict(issued.metadata),
        "lease_duration": issued.lease_seconds,
        "renewable": False,
        "entity_id": "",
        "token_type": "service",
        "orphan": True,
    }
    return JSONMessage.of({"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False,
                  "lease_duration": 0, "data": None, "wrap_info": None, "warnings": None,
                  "auth": auth})  # fmt: skip


# Our codes as Vault's statuses; 404 and 403 carry no detail, as Vault's do.
_NOT_FOUND = frozenset({"not_found", "unknown_vault"})


def _error(exc: Exception) -> JSONMessage:
    if isinstance(exc, _NotFound):
        return JSONMessage.of({"errors": []}, 404)
    if isinstance(exc, NotAllowed):
        allowed = {"Allow": ", ".join(exc.allowed)}
        return JSONMessage.of({"errors": ["unsupported operation"]}, 405, allowed)
    if isinstance(exc, SidecarError):
        if exc.code in _NOT_FOUND:
            return JSONMessage.of({"errors": []}, 404)
        if isinstance(exc, Forbidden):
            return JSONMessage.of(_DENIED, 403)
        return JSONMessage.of({"errors": [exc.message]}, exc.status)
    if isinstance(exc, web.HTTPException):
        return JSONMessage.of({"errors": [exc.reason]}, exc.status)
    log.error("request.failed", endpoint=ENDPOINT, error_type=type(exc).__name__)
    return JSONMessage.of({"errors": ["internal error"]}, 500)
