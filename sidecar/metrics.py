"""Prometheus metrics (design.md section 7), on a registry of our own.

Labels are bounded sets (endpoint, code, vault, backend, outcome): never a
reference, a secret id or a value, so cardinality stays flat and nothing leaks.
"""

from __future__ import annotations

import bisect
import collections
import itertools
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar import __version__
from sidecar.backends.base import AuthReporting
from sidecar.logging import dropped_lines

BackendsView = Callable[[], Iterable[tuple[str, str, object]]]  # (vault, backend name, backend)

PREFIX = "secret_sidecar"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Cache hits are sub-millisecond; backend calls span milliseconds to the timeout.
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every family the daemon exports; one instance per daemon (tests make their own)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.backend_calls = Counter(
            f"{PREFIX}_backend_calls", "Backend calls by vault, backend and outcome.",
            ["vault", "backend", "outcome"], registry=r,
        )  # fmt: skip
        self.backend_duration = Histogram(
            f"{PREFIX}_backend_call_duration_seconds", "Backend call duration.",
            ["vault", "backend", "outcome"], buckets=_SLOW, registry=r,
        )  # fmt: skip
        self.refreshes = Counter(
            f"{PREFIX}_refreshes", "Refreshes of cached values by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.rotations = Counter(
            f"{PREFIX}_rotations", "Refreshes that found a changed value, by vault.",
            ["vault"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            f"{PREFIX}_backend_rate_limited", "Backend calls that waited for the rate limit.",
            ["vault"], registry=r,
        )  # fmt: skip
        self.entries = Gauge(
            f"{PREFIX}_cache_entries", "Entries in the cache.", registry=r,
        )  # fmt: skip
        self.entries_by_health = Gauge(
            f"{PREFIX}_cache_entries_by_health",
            "Entries per vault by health: fresh, stale (serving the last value), failed.",
            ["vault", "health"], registry=r,
        )  # fmt: skip
        self.watchers = Gauge(
            f"{PREFIX}_watchers", "Open /v1/watch streams.", registry=r,
        )  # fmt: skip
        self.oldest_age = Gauge(
            f"{PREFIX}_oldest_value_age_seconds", "Age of the oldest cached value per vault.",
            ["vault"], registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            f"{PREFIX}_ready", "1 once prefetch is resolved and every vault started.", registry=r,
        )  # fmt: skip
        self.loop_lag = Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled twice a second).",
            buckets=_FAST, registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            f"{PREFIX}_config_reloads", "Configuration reloads by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        Info(f"{PREFIX}_build", "Build information.", registry=r).info({"version": __version__})
        self._auth = _AuthCollector(lambda: ())
        r.register(self._auth)
        self._hot = _PerRequest()
        r.register(self._hot)
        self.observe_request = self._hot.observe_request
        self.count_lookup = self._hot.count_lookup
        r.register(_LogDrops())

    def watch_backends(self, backends: BackendsView) -> None:
        """Export what authenticating backends report, read at scrape time.

        Registered once above and pointed at the current vaults here, so a second
        daemon on the same ``Metrics`` (tests, reloads) cannot register it twice.
        """
        self._auth.backends = backends

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PerRequest(Collector):
    """What every request counts, kept as plain numbers and exported at scrape time.

    prometheus_client takes a lock and looks up label children on every increment;
    the daemon's loop is one thread, so counting here is a dict update, and the
    families are built when Prometheus asks.
    """

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.durations: dict[str, list[float]] = {}  # endpoint -> per-bucket counts, then sum
        self.lookups: collections.Counter[str] = collections.Counter()

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        row = self.durations.get(endpoint)
        if row is None:
            row = self.durations[endpoint] = [0.0] * (len(_FAST) + 2)
        row[bisect.bisect_left(_FAST, seconds)] += 1  # the first bucket with le >= seconds
        row[-1] += seconds

    def count_lookup(self, result: str) -> None:
        self.lookups[result] += 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "API requests by endpoint and status code.",
            labels=["endpoint", "code"],
        )  # fmt: skip
        for (endpoint, status), count in sorted(self.requests.items()):
            requests.add_metric([endpoint, str(status)], count)
        durations = HistogramMetricFamily(
            f"{PREFIX}_request_duration_seconds", "API request duration by endpoint.",
            labels=["endpoint"],
        )  # fmt: skip
        for endpoint, row in sorted(self.durations.items()):
            cumulative = list(itertools.accumulate(row[:-1]))
            bounds = [floatToGoString(b) for b in _FAST] + ["+Inf"]  # type: ignore[no-untyped-call]
            durations.add_metric([endpoint], list(zip(bounds, cumulative, strict=True)), row[-1])
        lookups = CounterMetricFamily(
            f"{PREFIX}_cache_lookups", "Cache lookups by result (hit, miss, stale, negative).",
            labels=["result"],
        )  # fmt: skip
        for result, count in sorted(self.lookups.items()):
            lookups.add_metric([result], count)
        yield from (requests, durations, lookups)


class _LogDrops(Collector):
    """The log writer's count of dropped lines (sidecar.log_writer), read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_log_lines_dropped",
            "Log lines dropped because stderr was not read for long (or its reader was gone).",
        )
        family.add_metric([], dropped_lines())
        yield family


class _AuthCollector(Collector):
    def __init__(self, backends: BackendsView) -> None:
        self.backends = backends

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            f"{PREFIX}_backend_auth",
            "Backend authentication operations (login, renew, lookup, unwrap) by outcome.",
            labels=["vault", "backend", "operation", "outcome"],
        )
        ttl = GaugeMetricFamily(
            f"{PREFIX}_backend_token_ttl_seconds",
            "Seconds left on the backend's token with the least time left, per vault.",
            labels=["vault", "backend"],
        )
        for vault, name, backend in self.backends():
            if not isinstance(backend, AuthReporting):
                continue
            for (operation, outcome), count in sorted(backend.auth_events.items()):
                calls.add_metric([vault, name, operation, outcome], count)
            left = [s for s in backend.token_ttl_remaining().values() if s is not None]
            if left:
                ttl.add_metric([vault, name], min(left))
        yield calls
        yield ttl
