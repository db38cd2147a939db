"""The socket API (design.md section 4): aiohttp handlers, limits and error mapping.

Every error leaves through ``_guard`` as ``{"error": {"code", "message"}}`` with
its status: ours carry their code; anything else becomes a bare 500 with no
detail, so no exception text (which could quote a value) reaches a caller.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import yarl
from aiohttp import HttpVersion11, web

from sidecar.access import AccessPolicy, Peer, peer_of
from sidecar.audit import AuditTrail
from sidecar.cache import Change, SecretKey
from sidecar.config import WatchConfig
from sidecar.connections import GuardedConnection
from sidecar.errors import (
    InvalidReference,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    SidecarError,
    TooManyRequests,
    UnknownRoute,
)
from sidecar.http_message import JSONMessage
from sidecar.json_codec import decode_json, encode_json
from sidecar.logging import get_logger
from sidecar.metrics import CONTENT_TYPE, Metrics
from sidecar.reference import parse
from sidecar.resolver import CONTROL_CHARACTERS, Answer, Resolver, Target, extract_key
from sidecar.watch import END, Event, EventBus

log = get_logger("sidecar.server")
audit = get_logger("sidecar.audit")  # watch subscriptions; reads go through State.audit

MAX_BODY = 1024 * 1024  # = BaseRequest.client_max_size, which the low-level server applies
MAX_BATCH = 1000
MAX_REFERENCE = 4096
# Answer even when saturated; watch streams are long-lived and limited by max_watchers.
UNLIMITED = frozenset({"/healthz", "/readyz", "/v1/status", "/v1/watch"})
CLIENT_GONE = 499  # the status logged when the client closed before its answer (as nginx)
# Signs of a request relayed from a network: the socket API is for local callers only.
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")

Handler = Callable[["State", web.BaseRequest], Awaitable[web.StreamResponse]]
# A single read's vault and outcome, for its request log line.
OUTCOME = web.RequestKey("outcome", tuple[str | None, str | None])
# The URL of a request whose line aiohttp's parser could not turn into one (see
# request_factory): ``_guard`` refuses it by identity.
_NO_URL = yarl.URL("/")


@dataclass
class State:
    """What the handlers read; lifecycle swaps ``resolver``/``access`` on reload."""

    resolver: Resolver
    access: AccessPolicy
    metrics: Metrics
    max_concurrent: int
    events: EventBus
    watch: WatchConfig
    body_timeout: float
    audit: AuditTrail
    log_requests: bool = False  # a log line for every request, not just errors
    ready: bool = False
    not_ready: dict[str, str] = field(
        default_factory=lambda: {"startup": "starting vaults and resolving prefetch references"}
    )
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set when in_flight is 0

    def __post_init__(self) -> None:
        self.idle.set()


def _peer(request: web.BaseRequest) -> Peer:
    protocol = request.protocol
    if isinstance(protocol, GuardedConnection):  # every socket API connection
        return protocol.peer
    return peer_of(request.transport)


def _error(exc: SidecarError) -> JSONMessage:
    return JSONMessage.of(exc.to_json(), exc.status)


async def _guard(state: State, request: web.BaseRequest) -> web.StreamResponse:
    """Everything around the handlers, in one place: routing, local-only and size limits,
    errors as JSON, and per request one metric (and, for errors or ``log.requests: all``,
    a log line). aiohttp's low-level server calls it directly: no application, router
    or middleware chain to go through on every read."""
    started = time.perf_counter()
    status = 500
    methods = ROUTES.get(request.path)
    endpoint = request.path if methods is not None else "unmatched"
    try:
        try:
            if request.rel_url is _NO_URL:  # see request_factory
                raise InvalidRequest("malformed HTTP request (request target is not a URL)")
            if methods is None:
                raise UnknownRoute("no such endpoint; see /v1/secrets, /v1/status, /healthz")
            handler = methods.get(request.method)
            if handler is None:
                raise NotAllowed(sorted(methods))
            response = await admitted(state, request, handler)
        except ConnectionError:
            raise
        except Exception as exc:  # every error leaves as JSON
            response = _error_response(request, exc)
        status = response.status
        return response
    except ConnectionError:
        status = CLIENT_GONE
        raise  # nobody to answer: aiohttp drops the connection
    finally:
        observe(state, request, endpoint, status, started)


def observe(
    state: State, request: web.BaseRequest, endpoint: str, status: int, started: float
) -> None:
    """Every listener's account of a request: one metric, and a log line for errors (or
    for every request with ``log.requests: all``), naming the endpoint, never the path."""
    elapsed = time.perf_counter() - started
    state.metrics.observe_request(endpoint, status, elapsed)
    if status >= 400 or state.log_requests:
        vault, outcome = request.get(OUTCOME, (None, None))
        log.info("request", method=request.method, endpoint=endpoint, status=status,
                 duration_ms=round(elapsed * 1000, 3), vault=vault, cache=outcome)  # fmt: skip


class NotAllowed(Exception):
    """A known path asked with another method; ``allowed`` goes to the Allow header."""

    def __init__(self, allowed: list[str]) -> None:
        super().__init__("method not allowed")
        self.allowed = allowed


async def admitted(state: State, request: web.BaseRequest, handler: Handler) -> web.StreamResponse:
    headers = request.headers
    for name in PROXY_HEADERS:
        if name in headers:
            raise InvalidRequest(f"proxied requests are refused ({name}): the API is local-only")
    if headers.get("Content-Encoding", "identity").lower() != "identity":
        raise InvalidRequest("request bodies must not be compressed (Content-Encoding)")
    if request.path in UNLIMITED:
        return await handler(state, request)
    if state.in_flight >= state.max_concurrent:
        raise TooManyRequests(f"more than {state.max_concurrent} requests in flight")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"request body exceeds {MAX_BODY} bytes")
    state.in_flight += 1
    state.idle.clear()
    try:
        return await handler(state, request)
    finally:
        state.in_flight -= 1
        if state.in_flight == 0:
            state.idle.set()


def _error_response(request: web.BaseRequest, exc: Exception) -> JSONMessage:
    """Our errors with their code; aiohttp's routing errors in our shape; anything else a
    bare 500, so no exception text (which could quote a value) reaches a caller."""
    if isinstance(exc, SidecarError):
        return _error(exc)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _error(PayloadTooLarge(f"request body exceeds {MAX_BODY} bytes"))
    if isinstance(exc, NotAllowed):
        allowed = ", ".join(exc.allowed)
        error = MethodNotAllowed(f"{request.method} is not allowed here (allowed: {allowed})")
        return JSONMessage.of(error.to_json(), error.status, {"Allow": allowed})
    if isinstance(exc, web.HTTPException):
        body = {"error": {"code": "invalid_request", "message": exc.reason}}
        return JSONMessage.of(body, status=exc.status)
    log.error("request.failed", error_type=type(exc).__name__)
    body = {"error": {"code": "internal_error", "message": "internal error"}}
    return JSONMessage.of(body, status=500)


def _authorized(state: State, peer: Peer, ref: str) -> Target:
    """Check size and characters, parse, check access, and only then bind to a vault.

    A reference bound before is taken from the resolver's memo: the access check still
    runs on it first, so what a peer may not read still tells it nothing.
    """
    target = state.resolver.bound(ref)
    if target is not None:
        state.access.check(peer, target.reference)
        return target
    if len(ref.encode("utf-8", "surrogatepass")) > MAX_REFERENCE:
        raise InvalidRequest(f"reference longer than {MAX_REFERENCE} bytes")
    if CONTROL_CHARACTERS.search(ref):
        raise InvalidReference("reference contains a control character")
    reference = parse(ref)
    state.access.check(peer, reference)
    return state.resolver.bind(reference, ref)


def _read_now(
    state: State, peer: Peer, ref: str, trace: web.BaseRequest | None = None
) -> Answer | None:
    """A read served from a fresh cached value without awaiting anything, or None when it
    needs a load (``read`` then does the rest). Most reads end here."""
    vault = None
    try:
        target = _authorized(state, peer, ref)
        vault = target.vault.prefix
        answer = state.resolver.cached(ref, target)
    except SidecarError as exc:
        _audit(state, peer, ref, vault, exc.code, trace=trace)
        raise
    if answer is not None:
        _audit(state, peer, ref, vault, "hit", trace=trace)
    return answer


async def read(
    state: State, peer: Peer, ref: str, *, force: bool = False, trace: web.BaseRequest | None = None
) -> Answer:
    """Resolve one reference for one peer: access, cache, audit.

    The audit trail names who asked for what and how it went, never the value.
    ``trace`` (a single read's request) gets the vault and outcome for its log line.
    """
    if not force:
        answer = _read_now(state, peer, ref, trace)
        if answer is not None:
            return answer
    vault = None
    try:
        target = _authorized(state, peer, ref)
        vault = target.vault.prefix
        answer = await state.resolver.resolve_target(ref, target, force=force)
    except SidecarError as exc:
        _audit(state, peer, ref, vault, exc.code, trace=trace)
        raise
    _audit(state, peer, ref, vault, answer.lookup.result.value, trace=trace)
    return answer


def _audit(
    state: State,
    peer: Peer,
    ref: str,
    vault: str | None,
    outcome: str,
    *,
    trace: web.BaseRequest | None,
) -> None:
    """``vault`` is None until the reference is bound: until then its query may hold
    anything the caller sent, so the trail shows the reference without it."""
    if trace is not None:
        trace[OUTCOME] = (vault, outcome)
    shown = ref if vault is not None else ref.partition("?")[0][:MAX_REFERENCE]
    state.audit.record(peer, shown, vault, outcome)


def _single_ref(request: web.BaseRequest) -> str:
    refs = request.query.getall("ref", [])
    if len(refs) != 1:
        raise InvalidRequest("exactly one 'ref' query parameter is required")
    return refs[0]


async def get_secret(state: State, request: web.BaseRequest) -> web.StreamResponse:
    answer = await read(state, _peer(request), _single_ref(request), trace=request)
    return JSONMessage(answer.encode())


async def json_body(state: State, request: web.BaseRequest, shape: str) -> Any:
    """The request's JSON body, within ``body_timeout``. A client that closes before its
    body is complete is gone, not a server error: aiohttp raises a bare RuntimeError
    ("Connection closed.") for it, turned here into the ConnectionError ``_guard`` and
    the facade count as 499."""
    try:
        if request.content.is_eof():  # all of it is here: no deadline to set (3 us a read)
            raw = await request.read()
        else:
            async with asyncio.timeout(state.body_timeout):
                raw = await request.read()
        return decode_json(raw, request.charset or "utf-8")
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {state.body_timeout:g} s") from None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than json can parse
        raise InvalidRequest(f"body must be JSON: {shape}") from None
    except RuntimeError as exc:
        raise ConnectionResetError("the client closed the connection mid-body") from exc


async def batch(state: State, request: web.BaseRequest) -> web.StreamResponse:
    body = await json_body(state, request, '{"refs": [...]}')
    refs = body.get("refs") if isinstance(body, dict) else None
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise InvalidRequest('body must be {"refs": [<reference string>, ...]}')
    if len(refs) > MAX_BATCH:
        raise InvalidRequest(f"at most {MAX_BATCH} references per batch, got {len(refs)}")
    peer = _peer(request)

    async def one(ref: str) -> bytes:
        try:
            return (await read(state, peer, ref)).encode()
        except SidecarError as exc:
            return encode_json({"ref": ref, **exc.to_json()})

    # Cached answers first, at once; only what needs a load waits (concurrently).
    results: list[bytes | None] = []
    for ref in refs:
        try:
            answer = _read_now(state, peer, ref)
            results.append(None if answer is None else answer.encode())
        except SidecarError as exc:
            results.append(encode_json({"ref": ref, **exc.to_json()}))
    waiting = [i for i, result in enumerate(results) if result is None]
    loaded = await asyncio.gather(*(one(refs[i]) for i in waiting))
    for i, result in zip(waiting, loaded, strict=True):
        results[i] = result
    return JSONMessage(b'{"results":[' + b",".join(filter(None, results)) + b"]}")


async def refresh(state: State, request: web.BaseRequest) -> web.StreamResponse:
    peer = _peer(request)
    refs = request.query.getall("ref", [])
    if not refs:
        state.access.check_admin(peer, "refreshing every entry")
        return JSONMessage.of({"refreshed": await state.resolver.refresh_all()})
    results = []
    for ref in refs:
        answer = await read(state, peer, ref, force=True)
        results.append({k: v for k, v in answer.to_json().items() if k != "value"})
    return JSONMessage.of({"refreshed": results})


async def watch(state: State, request: web.BaseRequest) -> web.StreamResponse:
    """Server-sent events on changes of the watched references.

    The values are sent only with ``include_values=true`` (and the peer must be
    allowed to read them, as for any read). Watched entries stay refreshed.
    """
    peer = _peer(request)
    refs = request.query.getall("ref", [])
    if not refs or len(refs) > MAX_BATCH:
        raise InvalidRequest(f"between 1 and {MAX_BATCH} 'ref' query parameters are required")
    include_values = request.query.get("include_values", "false").lower() in ("true", "1")
    if len(state.events) >= state.watch.max_watchers:
        raise TooManyRequests(f"more than {state.watch.max_watchers} watchers")
    targets: dict[SecretKey, list[tuple[str, Target]]] = {}
    for ref in refs:
        target = _authorized(state, peer, ref)
        targets.setdefault(target.key, []).append((ref, target))

    transport = request.transport
    subscription = state.events.subscribe(
        targets, state.watch.queue, lambda: transport.abort() if transport else None
    )
    cache = state.resolver.cache
    for key in targets:
        cache.pin(key)
    shown = [ref for pairs in targets.values() for ref, _ in pairs]
    audit.info("secret.watch", refs=shown, uid=peer.uid, gid=peer.gid, pid=peer.pid,
               include_values=include_values)  # fmt: skip
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await response.prepare(request)
        await state.resolver.load(list(targets), force=False)  # watched values get cached
        while True:
            event = await subscription.next(state.watch.heartbeat)
            if event is END:
                break
            if not isinstance(event, Event):
                await response.write(b": heartbeat\n\n")
                continue
            for ref, target in targets[event.key]:
                payload = _event_json(ref, target, event, include_values)
                data = json.dumps(payload)
                await response.write(f"event: {event.change.value}\ndata: {data}\n\n".encode())
    except ConnectionResetError:
        pass  # the watcher went away, or was dropped for not reading
    finally:
        state.events.unsubscribe(subscription)
        for key in targets:
            cache.unpin(key)
        if subscription.overflowed:
            log.warning("watch.dropped", reason="slow consumer", uid=peer.uid, pid=peer.pid)
    return response


def _event_json(ref: str, target: Target, event: Event, include_values: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ref": ref,
        "event": event.change.value,
        "at": event.at,
        "version": event.fetched.version if event.fetched else None,
    }
    if event.error is not None and event.change in (Change.STALE, Change.FAILED):
        body["error"] = {"code": event.error[0], "message": event.error[1]}
    if include_values and event.fetched is not None and event.change is not Change.FAILED:
        key = target.reference.key
        try:
            body["value"] = extract_key(event.fetched.value, key) if key else event.fetched.value
        except SidecarError as exc:
            body["error"] = exc.to_json()["error"]
    return body


async def healthz(state: State, request: web.BaseRequest) -> web.StreamResponse:
    return JSONMessage.of({"status": "ok"})


async def readyz(state: State, request: web.BaseRequest) -> web.StreamResponse:
    """What is missing names secret ids: only admin peers see it (the rest: ready or not)."""
    if state.ready:
        return JSONMessage.of({"ready": True})
    body: dict[str, Any] = {"ready": False}
    if state.access.is_admin(_peer(request)):
        body["missing"] = state.not_ready
    return JSONMessage.of(body, status=503)


async def status(state: State, request: web.BaseRequest) -> web.StreamResponse:
    """Per-vault state and last errors name secret ids: admin peers only, others get ready."""
    if not state.access.is_admin(_peer(request)):
        return JSONMessage.of({"ready": state.ready})
    body = {
        "ready": state.ready,
        "requests_in_flight": state.in_flight,
        "watchers": len(state.events),
    }
    return JSONMessage.of(body | state.resolver.status())


ROUTES: dict[str, dict[str, Handler]] = {
    "/v1/secrets": {"GET": get_secret},
    "/v1/secrets:batch": {"POST": batch},
    "/v1/refresh": {"POST": refresh},
    "/v1/watch": {"GET": watch},
    "/v1/status": {"GET": status},
    "/healthz": {"GET": healthz},
    "/readyz": {"GET": readyz},
}


def build_server(state: State) -> web.Server:
    """The socket API as aiohttp's low-level server (request bodies up to ``MAX_BODY``)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return await _guard(state, request)

    return web.Server(handle, access_log=None, request_factory=request_factory)


def request_factory(
    message: Any, payload: Any, protocol: Any, writer: Any, task: asyncio.Task[None]
) -> web.BaseRequest:
    """aiohttp's C parser leaves ``url`` None for a request line it cannot turn into a URL
    (``CONNECT`` with an empty target): ``BaseRequest`` would raise in the connection's
    task, which dies without an answer. Such a request gets our 400 and the connection
    closes, like any malformed one."""
    if message.url is None:
        message = message._replace(path="/", url=_NO_URL, version=HttpVersion11, should_close=True)
    # the loop aiohttp's own factory passes (get_running_loop is a getpid() per request)
    return web.BaseRequest(message, payload, protocol, writer, task, protocol._loop)


def build_metrics_app(metrics: Metrics, before_scrape: Callable[[], None]) -> web.Application:
    """The TCP ``/metrics`` listener for Prometheus; nothing else is served on TCP."""

    async def scrape(request: web.Request) -> web.Response:
        before_scrape()
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app
