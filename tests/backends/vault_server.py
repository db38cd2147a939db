"""A Vault-API-compatible HTTP server for tests: aiohttp on its own thread and loop.

No Vault binary can be installed here, so this serves the part of Vault's HTTP
API the ``hcv`` backend uses, as Vault documents it: KV v1 and v2 reads (versions,
soft delete, destroy), ``auth/token/lookup-self`` and ``renew-self`` with TTLs and
max TTLs it enforces, AppRole and Kubernetes logins, ``sys/wrapping/unwrap``,
namespaces through ``X-Vault-Namespace`` (a token works in its namespace and
below), per-token path policies (403 ``permission denied``), a sealed switch (503)
and injected failures. Errors are ``{"errors": [...]}`` with ``Content-Type:
application/json`` exactly, which hvac needs to parse them. Time comes from an
injected clock so tests can expire tokens without waiting. Every token it makes
(``create_token``, logins, ``wrap``) holds the credential canary (``tests.canary``),
so a token that leaks anywhere fails the test.

It runs on its own loop because hvac is synchronous: a blocking call made on the
test's loop would otherwise wait for a server that can never answer.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.canary import credential
from tests.support import ManualClock

Clock = Callable[[], float]
DENIED = "permission denied"
KV_V1_LEASE = 2764800  # Vault's default 768 h lease shown on KV v1 reads


@dataclass
class Token:
    name: str  # a label for assertions; the token string itself is never logged
    namespace: str
    policies: tuple[str, ...]  # path globs (API paths without /v1/) this token may read
    ttl: float  # 0: never expires (root tokens)
    max_ttl: float
    renewable: bool
    issued_at: float
    expires_at: float
    creation_ttl: float


@dataclass
class Version:
    data: dict[str, Any]
    created: float
    deleted: bool = False
    destroyed: bool = False


@dataclass
class Mount:
    kv: str  # "v1" or "v2"
    v1: dict[str, dict[str, Any]] = field(default_factory=dict)
    v2: dict[str, list[Version]] = field(default_factory=dict)


@dataclass
class AppRole:
    secret_ids: set[str]
    policies: tuple[str, ...]
    ttl: float
    max_ttl: float
    renewable: bool


@dataclass
class KubeRole:
    jwts: set[str]
    policies: tuple[str, ...]
    ttl: float
    max_ttl: float


@dataclass
class Seen:
    """What one request carried (never the token: its server-side name instead)."""

    method: str
    path: str  # without /v1/, e.g. "secret/data/db"
    query: str
    namespace: str
    token: str | None  # the Token.name of the X-Vault-Token sent, "?" if unknown
    vault_request: bool  # the X-Vault-Request header hvac sends against SSRF
    body: dict[str, Any]


def _json(status: int, document: Any) -> web.Response:
    # Exactly application/json: hvac ignores the errors array otherwise.
    return web.Response(
        status=status, body=json.dumps(document).encode(), content_type="application/json"
    )


def _errors(status: int, *messages: str) -> web.Response:
    return _json(status, {"errors": list(messages)})


def _envelope(data: Any = None, auth: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": auth,
        **extra,
    }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class Timeline(ManualClock):
    """One manual time for the cache, the server's token TTLs and the renewal task."""

    def __init__(self) -> None:
        super().__init__()
        self.naps: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, delay: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.naps.append(delay)
        self._sleepers.append((self.now + delay, future))
        await future

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        for item in list(self._sleepers):
            if item[0] <= self.now:
                self._sleepers.remove(item)
                if not item[1].done():
                    item[1].set_result(None)

    @property
    def sleeping(self) -> int:
        """Tasks waiting on this timeline (a renewal task between two refreshes)."""
        return sum(1 for _, future in self._sleepers if not future.done())


class FakeVault:
    """State for every namespace ("" is root); mutate it from the tests, between requests."""

    def __init__(self, clock: Clock = time.monotonic, tls: ssl.SSLContext | None = None) -> None:
        self.clock = clock
        self.tls = tls
        self.mounts: dict[tuple[str, str], Mount] = {}  # (namespace, mount path)
        self.tokens: dict[str, Token] = {}
        self.approles: dict[tuple[str, str, str], AppRole] = {}  # (ns, auth path, role_id)
        self.kube_roles: dict[tuple[str, str, str], KubeRole] = {}  # (ns, auth path, role)
        self.wrapped: dict[str, dict[str, Any]] = {}
        self.seen: list[Seen] = []
        self.sealed = False
        self.hang = False
        self.latency = 0.0  # seconds each request takes (a distant Vault, for benchmarks)
        self._failures: list[int] = []
        self.failing: int | None = None  # answer every request with this status
        self._names = iter(range(1, 1_000_000))
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-vault")
        self._release = asyncio.Event()
        self.port = 0

    # -- set-up, from the tests ---------------------------------------------------------

    def enable_kv(self, mount: str, kv: str, namespace: str = "") -> None:
        self.mounts[(namespace, mount)] = Mount(kv)

    def put(self, mount: str, path: str, data: dict[str, Any], namespace: str = "") -> None:
        """Write a secret: KV v1 overwrites, KV v2 adds a version."""
        store = self.mounts[(namespace, mount)]
        if store.kv == "v1":
            store.v1[path] = data
        else:
            store.v2.setdefault(path, []).append(Version(data, time.time()))

    def delete_version(
        self, mount: str, path: str, version: int, *, destroy: bool = False, namespace: str = ""
    ) -> None:
        entry = self.mounts[(namespace, mount)].v2[path][version - 1]
        entry.deleted, entry.destroyed = True, entry.destroyed or destroy

    def create_token(
        self,
        policies: tuple[str, ...] = ("*",),
        *,
        ttl: float = 0,
        max_ttl: float = 0,
        renewable: bool = True,
        namespace: str = "",
    ) -> str:
        """A token as ``vault token create`` makes it; ``ttl`` 0 never expires."""
        value = credential("hvs." + secrets.token_urlsafe(12))
        now = self.clock()
        name = f"t{next(self._names)}"
        self.tokens[value] = Token(
            name, namespace, policies, ttl, max_ttl, renewable, now, now + ttl if ttl else 0.0, ttl
        )
        return value

    def name_of(self, token: str) -> str:
        return self.tokens[token].name

    def revoke(self, token: str) -> None:
        self.tokens.pop(token, None)

    def add_approle(
        self,
        role_id: str,
        secret_id: str,
        *,
        policies: tuple[str, ...] = ("*",),
        ttl: float = 3600,
        max_ttl: float = 0,
        renewable: bool = True,
        path: str = "approle",
        namespace: str = "",
    ) -> None:
        self.approles[(namespace, path, role_id)] = AppRole(
            {secret_id}, policies, ttl, max_ttl, renewable
        )

    def add_kube_role(
        self,
        role: str,
        jwt: str,
        *,
        policies: tuple[str, ...] = ("*",),
        ttl: float = 3600,
        max_ttl: float = 0,
        path: str = "kubernetes",
        namespace: str = "",
    ) -> None:
        self.kube_roles[(namespace, path, role)] = KubeRole({jwt}, policies, ttl, max_ttl)

    def wrap(self, data: dict[str, Any]) -> str:
        """A single-use wrapping token for ``data``, as ``-wrap-ttl`` responses carry."""
        value = credential("hvs." + secrets.token_urlsafe(18))
        self.wrapped[value] = data
        return value

    def fail(self, *statuses: int) -> None:
        """Answer the next requests with these statuses, one each."""
        self._failures.extend(statuses)

    def calls(self, *paths: str) -> list[Seen]:
        """Requests whose path is one of these, or all of them."""
        return [s for s in self.seen if not paths or s.path in paths]

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/v1/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=self.tls).start()

    def release(self) -> None:
        """Answer the requests ``hang`` holds (and let later ones through)."""
        self.hang = False
        self._loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        async def _stop() -> None:
            self._release.set()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # -- the API ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"].strip("/")
        namespace = request.headers.get("X-Vault-Namespace", "").strip("/")
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return _errors(400, "failed to parse JSON input")
        value = request.headers.get("X-Vault-Token")
        token = self.tokens.get(value) if value else None
        self.seen.append(
            Seen(
                request.method,
                path,
                request.query_string,
                namespace,
                token.name if token else ("?" if value else None),
                request.headers.get("X-Vault-Request") == "true",
                body,
            )
        )
        if self.hang:
            await self._release.wait()
        if self.latency:
            await asyncio.sleep(self.latency)
        status = self._failures.pop(0) if self._failures else self.failing
        if status is not None:
            return _errors(status, f"injected failure {status}")
        if self.sealed:
            return _errors(503, "Vault is sealed")
        if path == "sys/wrapping/unwrap" and request.method in ("POST", "PUT"):
            return self._unwrap(value, body)
        if (
            path.startswith("auth/")
            and path.endswith("/login")
            and request.method in ("POST", "PUT")
        ):
            return self._login(namespace, path.removeprefix("auth/").removesuffix("/login"), body)
        if token is None or not self._valid(token, namespace):
            return _errors(403, DENIED)
        if path == "auth/token/lookup-self" and request.method == "GET":
            return self._lookup_self(value or "", token)
        if path == "auth/token/renew-self" and request.method in ("POST", "PUT"):
            return self._renew_self(value or "", token, body)
        if request.method != "GET":
            return _errors(405, "unsupported operation")
        if not any(fnmatch.fnmatchcase(path, rule) for rule in token.policies):
            return _errors(403, f"1 error occurred:\n\t* {DENIED}\n\n")
        return self._read(namespace, path, request.query.get("version"))

    def _valid(self, token: Token, namespace: str) -> bool:
        """Live, and used in its own namespace or a child of it."""
        if token.expires_at and self.clock() >= token.expires_at:
            return False
        return (
            token.namespace == ""
            or namespace == token.namespace
            or namespace.startswith(token.namespace + "/")
        )

    def _read(self, namespace: str, path: str, version: str | None) -> web.Response:
        for (ns, mount_path), mount in self.mounts.items():
            if ns != namespace or not (path + "/").startswith(mount_path + "/"):
                continue
            rest = path[len(mount_path) + 1 :]
            if mount.kv == "v1":
                if rest not in mount.v1:
                    return _errors(404)
                return _json(200, {**_envelope(mount.v1[rest]), "lease_duration": KV_V1_LEASE})
            if not rest.startswith("data/"):
                return _errors(404, f"no handler for route {path!r}")
            return self._read_v2(mount, rest.removeprefix("data/"), version)
        return _errors(404, f'no handler for route "{path}". route entry not found.')

    def _read_v2(self, mount: Mount, secret: str, version: str | None) -> web.Response:
        versions = mount.v2.get(secret)
        number = int(version) if version and version != "0" else len(versions or [])
        if not versions or not 1 <= number <= len(versions):
            return _errors(404)
        entry = versions[number - 1]
        metadata = {
            "created_time": _iso(entry.created),
            "custom_metadata": None,
            "deletion_time": _iso(entry.created) if entry.deleted else "",
            "destroyed": entry.destroyed,
            "version": number,
        }
        if entry.deleted:  # Vault answers 404 with the metadata and no data
            return _json(404, _envelope({"data": None, "metadata": metadata}))
        return _json(200, _envelope({"data": entry.data, "metadata": metadata}))

    def _issue(
        self,
        namespace: str,
        policies: tuple[str, ...],
        ttl: float,
        max_ttl: float,
        renewable: bool,
        metadata: dict[str, str],
    ) -> web.Response:
        value = self.create_token(
            policies, ttl=ttl, max_ttl=max_ttl, renewable=renewable, namespace=namespace
        )
        token = self.tokens[value]
        auth = {
            "client_token": value,
            "accessor": token.name,
            "policies": list(policies),
            "token_policies": list(policies),
            "metadata": metadata,
            "lease_duration": int(ttl),
            "renewable": renewable,
            "entity_id": "",
            "token_type": "service",
            "orphan": True,
            "mfa_requirement": None,
            "num_uses": 0,
        }
        return _json(200, _envelope(None, auth))

    def _login(self, namespace: str, mount: str, body: dict[str, Any]) -> web.Response:
        if "role_id" in body:
            role = self.approles.get((namespace, mount, str(body["role_id"])))
            if role is None or body.get("secret_id") not in role.secret_ids:
                return _errors(400, "invalid role or secret ID")
            return self._issue(
                namespace,
                role.policies,
                role.ttl,
                role.max_ttl,
                role.renewable,
                {"role_name": "sidecar"},
            )
        if "jwt" in body:
            kube = self.kube_roles.get((namespace, mount, str(body.get("role"))))
            if kube is None:
                return _errors(400, f'invalid role name "{body.get("role")}"')
            if body["jwt"] not in kube.jwts:
                return _errors(403, DENIED)
            return self._issue(
                namespace, kube.policies, kube.ttl, kube.max_ttl, True, {"role": str(body["role"])}
            )
        return _errors(400, "missing role_id or jwt")

    def _lookup_self(self, value: str, token: Token) -> web.Response:
        now = self.clock()
        ttl = max(0, int(token.expires_at - now)) if token.expires_at else 0
        data = {
            "accessor": token.name,
            "creation_time": int(token.issued_at),
            "creation_ttl": int(token.creation_ttl),
            "display_name": "token",
            "entity_id": "",
            "expire_time": None,
            "explicit_max_ttl": int(token.max_ttl),
            "id": value,
            "issue_time": _iso(token.issued_at),
            "meta": None,
            "num_uses": 0,
            "orphan": True,
            "path": "auth/token/create",
            "policies": list(token.policies),
            "renewable": token.renewable,
            "ttl": ttl,
            "type": "service",
        }
        return _json(200, _envelope(data))

    def _renew_self(self, value: str, token: Token, body: dict[str, Any]) -> web.Response:
        if not token.renewable or not token.ttl:
            return _errors(400, "lease is not renewable")
        now = self.clock()
        wanted = float(body.get("increment") or token.creation_ttl)
        warnings = None
        if token.max_ttl and now + wanted > token.issued_at + token.max_ttl:
            wanted = token.issued_at + token.max_ttl - now
            warnings = [f'TTL of "{int(wanted)}s" exceeded the effective max_ttl; capped']
        token.expires_at = now + wanted
        auth = {
            "client_token": value,
            "accessor": token.name,
            "policies": list(token.policies),
            "token_policies": list(token.policies),
            "metadata": None,
            "lease_duration": int(wanted),
            "renewable": True,
            "entity_id": "",
            "token_type": "service",
            "orphan": True,
            "mfa_requirement": None,
            "num_uses": 0,
        }
        return _json(200, {**_envelope(None, auth), "warnings": warnings})

    def _unwrap(self, value: str | None, body: dict[str, Any]) -> web.Response:
        wrapping = body.get("token") or value
        data = self.wrapped.pop(str(wrapping), None)
        if data is None:
            return _errors(400, "wrapping token is not valid or does not exist")
        return _json(200, _envelope(data))
