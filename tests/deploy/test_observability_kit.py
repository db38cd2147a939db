"""deploy/observability: the alerting rules, their unit tests, the example Prometheus
config and the Grafana dashboard, checked against promtool, a running daemon's real
metrics and a real Prometheus server scraping it."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.backends.vault_server import FakeVault
from tests.deploy.tooling import ROOT, run_tool, tool
from tests.integration.conftest import MakeDaemon
from tests.integration.harness import Daemon, free_port, wait_until

KIT = ROOT / "deploy" / "observability"
ALERTS = KIT / "alerts.yaml"
ALERTS_TEST = KIT / "alerts_test.yaml"
DASHBOARD = KIT / "dashboard.json"
# Series Prometheus makes itself for every target, and the labels it attaches.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
TARGET_LABELS = {"job", "instance"}


# -- reading PromQL -------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<matchers>\{[^}]*\})
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<var>\$\{?\w+\}?)
  | (?P<number>[0-9][0-9.]*(?:e[+-]?[0-9]+)?[a-z]*)
  | (?P<other>\S)
    """,
    re.VERBOSE,
)
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"\s*,?')
# Followed by a parenthesised list of label names, not an expression.
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"}
# What follows a function or an aggregation: its arguments, or ``sum by (x) (...)``.
_CALLS = {"(", "by", "without"}


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[Matcher, ...]


def _matchers(block: str) -> tuple[Matcher, ...]:
    inner, found, at = block[1:-1], [], 0
    while at < len(inner.rstrip()):
        match = _MATCHER.match(inner, at)
        assert match is not None, f"cannot read the matchers {block!r}"
        found.append(Matcher(*match.groups()))
        at = match.end()
    return tuple(found)


def selectors(expr: str) -> list[Selector]:
    """The series selectors of a PromQL expression: metric names with their matchers.

    Not metric names: functions and aggregations (a name followed by ``(``, ``by`` or
    ``without``), keywords, the label lists of ``by``/``without``/``on``/``ignoring``/
    ``group_*``, strings, ranges, numbers and Grafana variables.
    """
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "name" and text in _LABEL_LISTS and following[1] == "(":
            i = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
        elif kind == "name" and text not in _KEYWORDS and following[1] not in _CALLS:
            matchers = _matchers(following[1]) if following[0] == "matchers" else ()
            found.append(Selector(text, matchers))
        elif kind == "matchers" and (i == 0 or tokens[i - 1][0] != "name"):
            matchers = _matchers(text)
            names = [m.value for m in matchers if m.label == "__name__" and m.op == "="]
            assert names, f"a selector without a metric name in {expr!r}"
            found.append(Selector(names[0], matchers))
        i += 1
    return found


def grouping_labels(expr: str) -> set[str]:
    """The label names of an expression's ``by``/``without``/``on``/``ignoring``/``group_*``
    lists."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    labels: set[str] = set()
    inside = False
    for i, (kind, text) in enumerate(tokens):
        if kind == "name" and text in _LABEL_LISTS and i + 1 < len(tokens):
            inside = tokens[i + 1][1] == "("
        elif inside and text == ")":
            inside = False
        elif inside and kind == "name":
            labels.add(text)
    return labels


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum without (outcome) (rate(x_total{outcome!~"ok|not_found"}[5m])) > 0',
            [Selector("x_total", (Matcher("outcome", "!~", "ok|not_found"),))],
        ),
        (
            "histogram_quantile(0.99, sum by (vault, le) (rate(d_bucket[$__rate_interval])))"
            " / on (vault) group_left (x) y offset 5m unless z == bool 1e3",
            [Selector("d_bucket", ()), Selector("y", ()), Selector("z", ())],
        ),
        (
            '{__name__="n", job=~"$job"} or absent(up)',
            [
                Selector("n", (Matcher("__name__", "=", "n"), Matcher("job", "=~", "$job"))),
                Selector("up", ()),
            ],
        ),
    ],
)
def test_the_expression_reader_finds_selectors_and_nothing_else(
    expr: str, expected: list[Selector]
) -> None:
    """The reader the checks below rely on: names and matchers, never a function, a
    keyword, a label list or a label value that looks like a name."""
    assert selectors(expr) == expected


def test_the_expression_reader_finds_grouping_labels() -> None:
    expr = "sum by (vault, le) (x) / on (vault) group_left (backend) y > ignoring (a) z"
    assert grouping_labels(expr) == {"vault", "le", "backend", "a"}


# -- the kit's files ------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for panel in document["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return flat


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def every_expr() -> list[tuple[str, str]]:
    """(where, expression) for every alert and every dashboard target."""
    rules = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    targets = [
        (f"panel {p['title']!r}", t["expr"])
        for p in panels(dashboard())
        for t in p.get("targets", [])
    ]
    return rules + targets


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """alerts.yaml is valid and each alert fires, and stays quiet, when its tests say
    (promtool resolves the test file's rule_files from its own directory)."""
    run_tool("promtool", "check", "rules", str(ALERTS))
    out = run_tool("promtool", "test", "rules", str(ALERTS_TEST))
    assert "SUCCESS" in out


def test_every_alert_is_complete_and_tested_firing_and_not_firing() -> None:
    """Each alert waits (``for``), has a severity, a summary, a description and a runbook
    link to its own section of the kit's README, and has unit tests where it fires and
    where it must not."""
    readme = (KIT / "README.md").read_text()
    anchors = {_anchor(line.lstrip("#")) for line in readme.splitlines() if line.startswith("#")}
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    rules = alert_rules()
    assert len(rules) >= 9
    for rule in rules:
        name = rule["alert"]
        assert rule["for"], name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        notes = rule["annotations"]
        assert notes["summary"], name
        assert notes["description"], name
        url, _, anchor = notes["runbook_url"].partition("#")
        assert url.endswith("deploy/observability/README.md"), name
        assert anchor == name.lower(), name
        assert anchor in anchors, f"{name}: no README section #{anchor}"
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never tested firing"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never tested quiet"


def test_example_prometheus_config_passes_promtool() -> None:
    """prometheus.yml parses and its rule file (alerts.yaml, beside it) loads."""
    out = run_tool("promtool", "check", "config", str(KIT / "prometheus.yml"))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_dashboard_is_a_grafana_dashboard_on_a_chosen_prometheus() -> None:
    """Every panel queries the data source picked in the ``datasource`` variable (so the
    JSON imports into any Grafana), ids are unique, and the panels cover what operators
    look at: requests, latency, hit ratio, backends, age, health, rotations, readiness."""
    document = dashboard()
    assert 36 <= document["schemaVersion"] <= 41
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    everything = panels(document)
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    shown = [p for p in everything if p["type"] != "row"]
    for panel in shown:
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel
        assert panel["targets"], panel["title"]
        assert all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    used = {s.metric for expr in dashboard_exprs() for s in selectors(expr)}
    for family in (
        "secret_sidecar_requests_total",
        "secret_sidecar_request_duration_seconds_bucket",
        "secret_sidecar_cache_lookups_total",
        "secret_sidecar_backend_calls_total",
        "secret_sidecar_backend_call_duration_seconds_bucket",
        "secret_sidecar_oldest_value_age_seconds",
        "secret_sidecar_cache_entries_by_health",
        "secret_sidecar_rotations_total",
        "secret_sidecar_refreshes_total",
        "secret_sidecar_ready",
        "secret_sidecar_backend_token_ttl_seconds",
        "secret_sidecar_event_loop_lag_seconds_bucket",
    ):
        assert family in used, family


# -- against a running daemon ---------------------------------------------------------------


@dataclass
class Exposition:
    """What a scrape offers: every series name Prometheus would store (a family with no
    samples yet still names them by its type), the label values seen per series name, and
    each sample's value."""

    names: set[str]
    values: dict[tuple[str, str], set[str]]
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Exposition:
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"),
        }
        names: set[str] = set()
        values: dict[tuple[str, str], set[str]] = {}
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            for sample in family.samples:
                names.add(sample.name)
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
                for label, value in sample.labels.items():
                    values.setdefault((sample.name, label), set()).add(value)
        return cls(names, values, samples)


async def _scrape(daemon: Daemon) -> Exposition:
    return Exposition.parse(await daemon.metrics())


def _problems(exposition: Exposition, where: str, expr: str) -> Iterable[str]:
    """Names the daemon does not export, label names none of the expression's series
    has, and matcher values it was not seen to produce."""
    found = selectors(expr)
    labels = {label for metric, label in exposition.values if metric in {s.metric for s in found}}
    for label in grouping_labels(expr) - labels - TARGET_LABELS:
        yield f"{where}: no series of {sorted({s.metric for s in found})} has a label {label}"
    for selector in found:
        if selector.metric in SYNTHETIC:
            continue
        if selector.metric not in exposition.names:
            yield f"{where}: {selector.metric} is not exported"
            continue
        for matcher in selector.matchers:
            if matcher.label in TARGET_LABELS | {"__name__"}:
                continue
            seen = exposition.values.get((selector.metric, matcher.label), set())
            if not seen:
                yield f"{where}: {selector.metric} has no label {matcher.label}"
            wanted = matcher.value.split("|") if "~" in matcher.op else [matcher.value]
            for value in wanted:
                if value not in seen:
                    yield (
                        f"{where}: {selector.metric}{{{matcher.label}{matcher.op}{value!r}}}"
                        f" matches no value seen ({sorted(seen)})"
                    )


async def test_rules_and_dashboard_use_only_what_a_running_daemon_exports(
    make_daemon: MakeDaemon,
) -> None:
    """Every metric the alerts and the dashboard query is a series a real daemon exports
    (with an env vault and an hcv vault logged in to a Vault server), and every label
    value or grouping label they use is one it really produced, once it reloaded its
    config, served hits, misses and a not-found, saw a rotation and, with Vault down,
    served a stale value."""
    vault = FakeVault()
    vault.enable_kv("secret", "v1")
    vault.put("secret", "db", {"password": "p"})
    vault.start()
    try:
        token = vault.create_token(ttl=3600)
        config = {"vaults": [{"prefix": "hv", "name": "hcv",
                              "config": {"port": vault.port, "token": token}}]}  # fmt: skip
        daemon = await make_daemon(config).started()
        daemon.signal(signal.SIGHUP)  # the same config again: a reload that works

        async def reloaded() -> bool:
            try:
                return "secret_sidecar_config_reloads_total{" in await daemon.metrics()
            except aiohttp.ClientConnectionError:  # metrics listen after the socket
                return False

        await wait_until(reloaded, 10, "the reload to be counted")
        for ref in ("{vault://env/db-password}", "{vault://env/db-password}", "{vault://env/gone}"):
            await daemon.get(ref)
        assert (await daemon.get("{vault://hv/db/password}"))[0] == 200
        vault.put("secret", "db", {"password": "rotated"})
        await daemon.request("POST", "/v1/refresh", params={"ref": "{vault://hv/db/password}"})
        vault.sealed = True
        status, body = await daemon.request(
            "POST", "/v1/refresh", params={"ref": "{vault://hv/db/password}"}
        )
        assert status == 200, body
        exposition = await _scrape(daemon)
    finally:
        vault.stop()
    assert exposition.values[("secret_sidecar_refreshes_total", "outcome")] >= {"ok", "stale"}
    stale = frozenset({"vault": "hv", "health": "stale"}.items())
    assert exposition.samples[("secret_sidecar_cache_entries_by_health", stale)] == 1
    hv = frozenset({"vault": "hv"}.items())
    assert exposition.samples[("secret_sidecar_rotations_total", hv)] == 1
    exprs = every_expr()
    assert len({s.metric for _, expr in exprs for s in selectors(expr)}) >= 15
    problems = [p for where, expr in exprs for p in _problems(exposition, where, expr)]
    assert not problems, "\n".join(problems)


# -- a real Prometheus scraping the daemon --------------------------------------------------


@dataclass
class Prometheus:
    url: str
    session: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            document = await response.json()
        assert document["status"] == "success", document
        return document["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result


@contextlib.asynccontextmanager
async def prometheus_scraping(workdir: Path, target: str) -> AsyncIterator[Prometheus]:
    """A Prometheus server on loopback scraping ``target`` every second with alerts.yaml
    loaded; stopped (and killed if it will not stop) on the way out."""
    port = free_port()
    process = _start_prometheus(workdir, target, port)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            server = Prometheus(f"http://127.0.0.1:{port}", session)

            async def ready() -> bool:
                assert process.poll() is None, (workdir / "prometheus.log").read_text()
                try:
                    async with session.get(f"{server.url}/-/ready") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(ready, 10, "Prometheus to be ready")
            yield server
    finally:
        _stop(process)


def _start_prometheus(workdir: Path, target: str, port: int) -> subprocess.Popen[bytes]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "secret-sidecar", "static_configs": [{"targets": [target]}]}
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (workdir / "prometheus.log").open("wb") as log:
        return subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _grafana_to_promql(expr: str) -> str:
    """A dashboard expression as Grafana sends it, with its variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")


async def test_real_prometheus_scrapes_the_daemon_and_loads_the_rules(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A real Prometheus server scraping a daemon on loopback stores its readiness and its
    request counter (exactly the reads made), loads every alert with health ok, raises
    none of them for a healthy daemon, and accepts every dashboard expression."""
    reads = 5
    for _ in range(reads):
        assert (await daemon.get("{vault://env/db-password}"))[0] == 200
    async with prometheus_scraping(tmp_path, f"127.0.0.1:{daemon.metrics_port}") as prometheus:

        async def value_of(expr: str) -> float | None:
            result = await prometheus.query(expr)
            return float(result[0]["value"][1]) if result else None

        async def ready() -> bool:
            return await value_of('secret_sidecar_ready{job="secret-sidecar"}') == 1

        await wait_until(ready, 20, "secret_sidecar_ready == 1 in Prometheus")
        secrets = 'sum(secret_sidecar_requests_total{endpoint="/v1/secrets", code="200"})'
        assert await value_of(secrets) == reads
        assert await value_of('up{job="secret-sidecar"}') == 1

        names = {rule["alert"] for rule in alert_rules()}

        async def rules_evaluated() -> bool:
            groups = (await prometheus.api("rules"))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert {rule["name"] for rule in rules} == names
            assert all(rule.get("lastError", "") == "" for rule in rules), rules
            return all(rule["health"] == "ok" for rule in rules)

        await wait_until(rules_evaluated, 10, "every rule evaluated with health ok")

        async def quiet() -> bool:
            # Loop lag depends on the machine's load (CI runs tests side by side), not on
            # the daemon's health: the one alert a healthy daemon may trip here.
            alerts = (await prometheus.api("alerts"))["alerts"]
            return all(a["labels"]["alertname"] == "SecretSidecarEventLoopLag" for a in alerts)

        # SecretSidecarAbsent is pending until the first scrape; then nothing may be
        await wait_until(quiet, 5, "no alert pending or firing for a healthy daemon")
        for expr in dashboard_exprs():
            await prometheus.query(_grafana_to_promql(expr))  # status success: it parses
