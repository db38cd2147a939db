"""Start -> ready -> reload -> drain -> stop, in one place.

Resources start in order and close in reverse: socket (bound), metrics listener,
Vault-KV facade, API (accepting), backends, prefetch/readiness. SIGTERM/SIGINT turn
readiness off, stop accepting, let in-flight requests finish within ``drain_timeout``,
close backends and remove the socket; a second one removes the socket and exits at
once (exit code 1). SIGHUP re-reads the configuration; an invalid one is logged and the old kept. A
reload swaps vaults, cache limits, refresh, ACL, watch, metrics and facade settings;
vaults that changed are retired (their entries dropped) and closed once their loads in
flight have ended. Only the listen socket's settings wait for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine

from aiohttp import web

from sidecar import logging as sidecar_logging
from sidecar import unix_socket
from sidecar.access import AccessPolicy, check_rules_enforceable
from sidecar.assembly import build_resolver, schedule_of
from sidecar.audit import AuditTrail
from sidecar.cache import Change, Entry, Health, SecretKey
from sidecar.config import Config
from sidecar.connections import GuardedSite
from sidecar.errors import ConfigError, SidecarError, StartupError
from sidecar.facade import FacadeListener
from sidecar.logging import get_logger
from sidecar.metrics import Metrics
from sidecar.refresh import Refresher
from sidecar.resolver import Resolver
from sidecar.server import State, build_metrics_app, build_server
from sidecar.vaults import VaultRegistry, close_vaults
from sidecar.watch import EventBus

log = get_logger("sidecar.lifecycle")

PREFETCH_RETRY_MAX = 30.0  # seconds between retries of prefetch refs that failed
LOOP_LAG_INTERVAL = 0.5  # seconds between event-loop lag samples
SETTLE_MARGIN = 5.0  # seconds past backend_timeout a retired vault's loads get to end


class Daemon:
    """The running pieces of one ``serve`` call, so reload can swap them."""

    def __init__(self, config: Config, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.config = config
        self.metrics = metrics
        self.events = EventBus()
        resolver = build_resolver(config, metrics, clock=clock, on_change=self._changed)
        self.cache = resolver.cache
        self.state = State(
            resolver,
            AccessPolicy(config.clients),
            metrics,
            config.listen.max_concurrent_requests,
            self.events,
            config.watch,
            config.listen.body_timeout,
            AuditTrail(config.log.audit_interval),
            config.log.requests == "all",
        )
        self.refresher = Refresher(lambda: self.state.resolver, self.cache, config.refresh.idle_ttl)
        metrics.watch_backends(
            lambda: [(v.prefix, v.backend_name, v.backend) for v in self.state.resolver.vaults]
        )
        self._pinned: list[SecretKey] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.scrape: web.AppRunner | None = None  # the metrics listener
        self.facade = FacadeListener(self.state)  # the Vault-KV listener, if enabled

    def _changed(self, key: SecretKey, change: Change, entry: Entry) -> None:
        """One log line per transition (not per attempt), metrics, and watcher events."""
        if change is Change.ROTATED:
            self.metrics.rotations.labels(key.vault).inc()
        failure = entry.failure
        level = log.warning if change in (Change.STALE, Change.FAILED) else log.info
        level(
            f"secret.{change.value}",
            vault=key.vault,
            secret_id=key.secret_id,
            version=key.version,
            error=failure.message if failure is not None and change is not Change.ROTATED else None,
        )
        self.events.publish(key, change, entry)

    def update_gauges(self) -> None:
        self.metrics.entries.set(len(self.cache))
        self.metrics.ready.set(1 if self.state.ready else 0)
        self.metrics.watchers.set(len(self.events))
        for prefix, row in self.state.resolver.status()["vaults"].items():
            self.metrics.oldest_age.labels(prefix).set(row["oldest_age_seconds"] or 0.0)
            for health in Health:
                self.metrics.entries_by_health.labels(prefix, health.value).set(row[health.value])

    def start(self) -> None:
        """Background work: readiness (vaults, prefetch), loop-lag samples, the refresher."""
        self._restart("readiness", self._prepare())
        self._restart("loop-lag", self._sample_loop_lag())
        self._restart("audit", self._flush_audit())
        self._restart("refresh", self.refresher.run() if self.config.refresh.enabled else None)

    def _restart(self, name: str, work: Coroutine[object, object, None] | None) -> None:
        """Replace a background task (``None``: just stop it)."""
        previous = self._tasks.pop(name, None)
        if previous is not None:
            previous.cancel()
        if work is not None:
            self._tasks[name] = asyncio.create_task(work)

    async def _sample_loop_lag(self) -> None:
        """A timer that fires late means every request waits as long: a blocking call, or
        more work than the loop can do (both would show here before anywhere else)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LOOP_LAG_INTERVAL
            await asyncio.sleep(LOOP_LAG_INTERVAL)
            self.metrics.loop_lag.observe(max(loop.time() - due, 0.0))

    async def _flush_audit(self) -> None:
        """Repeat reads are counted between flushes (``sidecar.audit``)."""
        trail = self.state.audit
        while True:
            await asyncio.sleep(trail.interval)
            trail.flush()

    async def _prepare(self) -> None:
        state, delay = self.state, 1.0
        while True:
            resolver = state.resolver
            missing: dict[str, str] = {}
            for vault in resolver.vaults:
                try:
                    await vault.ensure_started()
                except Exception as exc:
                    missing[f"vault:{vault.prefix}"] = getattr(exc, "message", type(exc).__name__)
            failures = await resolver.prefetch(self.config.prefetch)
            missing.update({f"ref:{ref}": exc.message for ref, exc in failures.items()})
            self._pin_prefetch(resolver)
            state.not_ready = missing
            state.ready = not missing
            self.metrics.ready.set(1 if state.ready else 0)
            if state.ready:
                log.info("ready", prefetched=len(self.config.prefetch))
                return
            log.warning("not_ready", missing=sorted(missing), retry_in_seconds=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, PREFETCH_RETRY_MAX)

    def _pin_prefetch(self, resolver: Resolver) -> None:
        """Prefetch references are refreshed even when nobody reads them."""
        for key in self._pinned:
            self.cache.unpin(key)
        self._pinned = []
        for ref in self.config.prefetch:
            with contextlib.suppress(SidecarError):
                self._pinned.append(resolver.target(ref).key)
        for key in self._pinned:
            self.cache.pin(key)

    async def reload(self, load: Callable[[], Config]) -> None:
        try:
            config = load()
            check_rules_enforceable(config.clients)
            vaults = VaultRegistry(config.vaults, limits=config.limits)
        except ConfigError as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error("config.reload_failed", error=exc.message)
            return
        old = self.config
        if config.listen != old.listen:
            log.warning("config.restart_needed", reason="listen settings apply at the next start")
        retired = vaults.adopt_unchanged(self.state.resolver.vaults)
        generations = {vault.generation for vault in retired}
        dropped = self.cache.retire(generations)
        self.cache.resize(config.cache.max_entries)
        self.cache.schedule = schedule_of(config)
        self.refresher = Refresher(lambda: self.state.resolver, self.cache, config.refresh.idle_ttl)
        self.state.resolver = Resolver(vaults, self.cache, config.cache, self.metrics)
        self.state.access = AccessPolicy(config.clients)
        self.state.watch = config.watch
        self.state.audit.interval = config.log.audit_interval
        self.state.log_requests = config.log.requests == "all"
        self.config = config
        if config.metrics != old.metrics:
            await self._move_metrics(old)
        await self.facade.reload(old.facade, config.facade)
        sidecar_logging.configure(config.log.level, config.log.format)
        self.metrics.reloads.labels("ok").inc()
        log.info("config.reloaded", retired_vaults=sorted(v.prefix for v in retired),
                 dropped_entries=dropped)  # fmt: skip
        self.start()
        # Loads already running finish against the vault they started on: close it after.
        busy = await self.cache.settle(generations, old.cache.backend_timeout + SETTLE_MARGIN)
        if busy:
            log.warning("reload.closing_busy_vaults", loads=busy)
        await close_vaults(retired)

    def not_ready_any_more(self) -> None:
        """From the stop signal on, /readyz says 503 ``draining``: the gateway's probes must
        stop sending before the socket does."""
        self.state.ready = False
        self.state.not_ready = {"draining": "the daemon is stopping"}
        self.metrics.ready.set(0)

    async def start_metrics(self) -> None:
        self.scrape = await _start_metrics(self, self.config)

    async def _move_metrics(self, old: Config) -> None:
        """Listen on the new metrics address; if that fails, keep the old one."""
        previous, self.scrape = self.scrape, None
        if previous is not None:
            await previous.cleanup()
        try:
            await self.start_metrics()
        except StartupError as exc:
            log.error("config.metrics_not_moved", error=exc.message, kept=old.metrics.address)
            with contextlib.suppress(StartupError):  # the old port taken meanwhile: none
                self.scrape = await _start_metrics(self, old)
        else:
            log.info("metrics.moved", metrics=self.config.metrics.address or None)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.facade.close()
        await self.state.resolver.vaults.close()
        self.state.audit.flush()
        if self.scrape is not None:
            await self.scrape.cleanup()


async def _start_metrics(daemon: Daemon, config: Config) -> web.AppRunner | None:
    address = config.metrics.host_port
    if address is None:
        return None
    runner = web.AppRunner(build_metrics_app(daemon.metrics, daemon.update_gauges))
    await runner.setup()
    try:
        await web.TCPSite(runner, *address).start()
    except OSError as exc:
        await runner.cleanup()
        where = config.metrics.address
        raise StartupError(f"cannot listen for metrics on {where}: {exc}") from exc
    return runner


async def _drain(daemon: Daemon, site: web.BaseSite, drain_timeout: float) -> None:
    """Stop accepting, end watch streams, then let in-flight requests finish while their
    connections stay fully open (aiohttp's own shutdown stops reading request bodies)."""
    log.info("draining", in_flight=daemon.state.in_flight, timeout_seconds=drain_timeout)
    daemon.not_ready_any_more()
    await site.stop()
    await daemon.facade.stop_accepting()
    daemon.events.end_all()
    try:
        async with asyncio.timeout(drain_timeout):
            await daemon.state.idle.wait()
    except TimeoutError:
        log.warning("drain.timeout", in_flight=daemon.state.in_flight)


async def _until_stopped(
    stop: asyncio.Event, shutdown_trigger: Callable[[], Awaitable[object]] | None
) -> None:
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
    if shutdown_trigger is not None:
        waiters.append(asyncio.ensure_future(shutdown_trigger()))
    _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in pending:
        waiter.cancel()


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    ready: asyncio.Event | None = None,
    reload: Callable[[], Config] | None = None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.monotonic,
    handle_signals: bool = False,
) -> None:
    """Run the daemon until ``shutdown_trigger`` returns (or SIGTERM/SIGINT).

    ``ready`` is set once the socket accepts requests; ``/readyz`` separately
    reports whether prefetch and every vault are in. ``reload`` re-reads the
    configuration on SIGHUP.
    """
    daemon = Daemon(config, metrics or Metrics(), clock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()  # keep a reference, or a reload task may be GC'd

    def on_hangup() -> None:
        if reload is not None:
            task = loop.create_task(daemon.reload(reload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    listen = config.listen
    sock = unix_socket.bind(listen)
    inode = os.lstat(listen.socket).st_ino

    def on_stop() -> None:
        """The first signal drains; a second one means "now": no drain, no backend close."""
        if not stop.is_set():
            daemon.not_ready_any_more()
            stop.set()
            return
        log.warning("stop.forced", in_flight=daemon.state.in_flight)
        unix_socket.remove(listen.socket, inode)
        sidecar_logging.flush(timeout=1.0)  # os._exit skips atexit; "now" waits 1 s at most
        os._exit(1)

    api = web.ServerRunner(build_server(daemon.state), shutdown_timeout=1.0)
    try:
        await api.setup()
        # Every listener is up before the socket accepts: once /healthz answers, the
        # metrics port and the facade do too (and a port taken stops the start first).
        await daemon.start_metrics()
        await daemon.facade.start(config.facade)
        site = GuardedSite(api, sock, listen)
        await site.start()
        if handle_signals:
            loop.add_signal_handler(signal.SIGTERM, on_stop)
            loop.add_signal_handler(signal.SIGINT, on_stop)
            loop.add_signal_handler(signal.SIGHUP, on_hangup)
        log.info("listening", socket=str(listen.socket), metrics=config.metrics.address or None)
        daemon.start()
        if ready is not None:
            ready.set()
        await _until_stopped(stop, shutdown_trigger)
        await _drain(daemon, site, listen.drain_timeout)
    finally:
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        await api.cleanup()  # close idle keep-alive connections, cancel what outlived the drain
        await daemon.close()
        unix_socket.remove(listen.socket, inode)
        log.info("stopped")


def run(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Run ``serve`` on uvloop when it is installed (plain asyncio otherwise)."""
    try:
        import uvloop  # noqa: PLC0415

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(config, reload=reload, handle_signals=True))
    finally:
        sidecar_logging.flush()  # "stopped" and every line before it, ahead of any traceback
    _exit_past_stuck_calls()


def _exit_past_stuck_calls() -> None:
    """Exit now even if a backend call is stuck in a worker thread.

    hvac's calls run in threads that Python joins at exit, so one hung request would hold
    the process until its own timeout, past the drain. Everything is closed and the
    socket removed by now: abandoning those threads loses nothing.
    """
    main = threading.main_thread()
    stuck = [t for t in threading.enumerate() if t is not main and not t.daemon]
    if stuck:
        log.warning("exit.abandoned_backend_calls", threads=len(stuck))
        sidecar_logging.flush()
        sys.stderr.flush()
        os._exit(0)
