"""Cached reads over the Unix socket: the daemon side by side with the floor, in one run.

The floor (``bench.floor``) and the daemon serve the same secrets (the env backend,
all prefetched); ``h2load --h1 -m 1`` drives each in turn with keep-alive
connections (floor, daemon, floor, daemon... for every run and concurrency), the
server pinned to core 0 and the load to core 1 where there are two. Per request
latencies come from h2load's log; each figure is the median of the runs, with the
min-max. Ratios are daemon/floor. The ``facade`` workload reads the same secrets
through the Vault-KV facade (TCP on loopback, hvac's request shape) and is reported
beside the daemon's own socket figure. The ``cold`` workload (``make bench`` only) reads
secrets never read before from a Vault test server that takes ``BACKEND_LATENCY`` per
request: every read is a cache miss and a backend call. ``make bench`` then adds, each
from its own module: exec -> ready and RSS at up to 100 000 prefetched (``bench.startup``),
read latency and loop lag while 10 000 entries are refreshed (``bench.refresh_burst``),
and backend calls per refresh interval for 1000 AWS secrets on moto
(``bench.aws_refresh``). Nothing here asserts a timing.

    python -m bench.http                  # make bench: 3 runs, c = 1, 16, 64
    python -m bench.http --quick          # make bench-quick: 1 short run at c = 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import aws_refresh, refresh_burst, startup
from bench.daemon import LOAD_CORE, SERVER_CORE, daemon_command, pinned, rss_mib, started
from bench.workload import keyed_refs, path, plain_refs, secrets_env
from tests.integration.harness import free_port

SECRETS = 1000
BATCH = 10
RESULTS = Path(__file__).parent / "results"
FACADE_TOKEN = "bench-facade-token-0123456789"
BACKEND_LATENCY = 0.02  # the cold workload's Vault: 20 ms a request, as across a region
COLD_PER_RUN = 6000  # fresh secret ids per h2load run: more than 5 s of cold misses read


@dataclass(frozen=True)
class Workload:
    name: str
    uris: list[str]  # paths; h2load takes them in turn
    body: dict[str, Any] | None = None  # POSTed (batch)
    refs_per_request: int = 1
    facade: bool = False  # over the Vault-KV facade's TCP port instead of the socket
    cold: bool = False  # fresh ids from the slow Vault each run: daemon only, no floor


def workloads() -> list[Workload]:
    plain = plain_refs(SECRETS)
    return [
        Workload("single", [path(r) for r in plain]),
        Workload("keyed", [path(r) for r in keyed_refs()]),
        Workload("batch", ["/v1/secrets:batch"], {"refs": plain[:BATCH]}, BATCH),
        Workload("facade", [f"/v1/secret/data/env/bench-{i}" for i in range(SECRETS)], facade=True),
        Workload("cold", [], cold=True),  # its URIs are made per run (cold_uris)
    ]


def cold_uris(run_slice: int) -> list[str]:
    return [path(f"{{vault://slow/cold-{run_slice}-{i}}}") for i in range(COLD_PER_RUN)]


@contextmanager
def _slow_vault(slices: int) -> Iterator[dict[str, Any] | None]:
    """The cold workload's Vault (a test server with ``latency``) holding every id the
    runs will read, as a sidecar vault entity; None when no run reads it."""
    if slices == 0:
        yield None
        return
    from tests.backends.vault_server import FakeVault  # noqa: PLC0415 - make bench only

    vault = FakeVault()
    vault.enable_kv("secret", "v1")
    for run_slice in range(slices):
        for i in range(COLD_PER_RUN):
            vault.put("secret", f"cold-{run_slice}-{i}", {"value": f"cold-{i}"})
    vault.latency = BACKEND_LATENCY
    vault.start()
    try:
        token = vault.create_token()
        yield {"prefix": "slow", "name": "hcv",
               "config": {"port": vault.port, "token": token, "kv": "v1"}}  # fmt: skip
    finally:
        vault.stop()


@dataclass(frozen=True)
class Sample:
    server: str  # "floor" or "daemon"
    workload: str
    concurrency: int
    run: int
    requests_per_second: float
    refs_per_second: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    failed: int


@contextmanager
def _server(
    kind: str,
    work: Path,
    env: dict[str, str],
    *,
    prefetch: list[str] | None = None,
    metrics_port: int | None = None,
    facade_port: int | None = None,
    vaults: list[dict[str, Any]] | None = None,
) -> Iterator[tuple[Path, int, float]]:
    """Start the floor or the daemon; yield its socket, pid and exec -> ready seconds."""
    if kind == "floor":
        socket_path = work / "floor.sock"
        command = [*pinned(SERVER_CORE), sys.executable, "-m", "bench.floor",
                   "--socket", str(socket_path), "--secrets", str(SECRETS)]  # fmt: skip
        probe = path(plain_refs(1)[0])
    else:
        config: dict[str, Any] = {
            "listen": {"max_concurrent_requests": 4096, "max_connections": 4096},
            "metrics": {"address": f"127.0.0.1:{metrics_port}" if metrics_port else ""},
            "prefetch": [*plain_refs(SECRETS), *keyed_refs()] if prefetch is None else prefetch,
            "limits": {"rate": 1e9, "burst": 10**6},
            "cache": {"max_entries": 200_000},
            "vaults": vaults or [],
        }
        if facade_port is not None:
            config["facade"] = {
                "enabled": True,
                "address": f"127.0.0.1:{facade_port}",
                "tokens": [{"name": "bench", "token_env": "BENCH_FACADE_TOKEN", "allow": ["*"]}],
            }
            env = {**env, "BENCH_FACADE_TOKEN": FACADE_TOKEN}
        command, socket_path = daemon_command(config, work)
        probe = "/readyz"
    with started(command, socket_path, probe, env, work / f"{kind}.log") as server:
        yield server.socket, server.pid, server.ready_seconds


def cold_reads(readers: int = 1000) -> dict[str, Any]:
    """``readers`` concurrent first reads of one reference: how many backend calls."""
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        _server("daemon", Path(tmp), {"BENCH_0": "v"}, prefetch=[], metrics_port=port) as (
            socket_path,
            _,
            _,
        ),
    ):
        statuses = asyncio.run(_concurrent_reads(socket_path, readers))
        calls = asyncio.run(_backend_calls(port))
    print(f"{readers} concurrent cold reads of one ref: {calls:.0f} backend call(s),"
          f" statuses {dict(statuses)}", flush=True)  # fmt: skip
    return {"readers": readers, "backend_calls": calls, "statuses": dict(statuses)}


async def _concurrent_reads(socket_path: Path, readers: int) -> Counter[int]:
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=readers)
    url = f"http://bench{path(plain_refs(1)[0])}"
    async with aiohttp.ClientSession(connector=connector) as session:

        async def read() -> int:
            async with session.get(url) as response:
                await response.read()
                return response.status

        return Counter(await asyncio.gather(*(read() for _ in range(readers))))


async def _backend_calls(port: int) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    found = re.search(r'secret_sidecar_backend_calls_total\{[^}]*outcome="ok"[^}]*\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def _h2load(
    target: Path | str, load: Workload, concurrency: int, duration: float, work: Path
) -> tuple[float, list[float], int]:
    """req/s, per-request latencies in ms, failed requests; ``target`` is a Unix socket
    or (the facade) an ``http://host:port`` base."""
    uris = work / f"{load.name}.uris"
    base = target if isinstance(target, str) else "http://bench"
    uris.write_text("".join(f"{base}{u}\n" for u in load.uris))
    log = work / "h2load.log"
    log.unlink(missing_ok=True)
    command = [*pinned(LOAD_CORE), "h2load", "--h1", "-m", "1", "-t", "1",
               "-c", str(concurrency), "-D", f"{duration:g}", "--warm-up-time", "1",
               "-i", str(uris), "--log-file", str(log)]  # fmt: skip
    if isinstance(target, Path):
        command += ["-B", f"unix:{target}"]
    else:
        command += ["-H", f"X-Vault-Token: {FACADE_TOKEN}"]
    if load.body is not None:
        body = work / f"{load.name}.json"
        body.write_text(json.dumps(load.body))
        command += ["-d", str(body), "-H", "Content-Type: application/json"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    out = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or out}")
    found = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    failed = re.search(r"(\d+) failed, (\d+) errored", out)
    if found is None or failed is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    latencies = []
    for line in log.read_text().splitlines():
        _, _, micros = line.split("\t")  # start, status, microseconds
        latencies.append(int(micros) / 1000)
    return float(found.group(1)), latencies, int(failed.group(1)) + int(failed.group(2))


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(
    runs: int, concurrencies: list[int], duration: float, names: list[str]
) -> dict[str, Any]:
    env = secrets_env(SECRETS)
    chosen = [w for w in workloads() if w.name in names]
    samples: list[Sample] = []
    facts: dict[str, Any] = {}
    facade = f"http://127.0.0.1:{free_port()}"
    slices = runs * len(concurrencies) if any(w.cold for w in chosen) else 0
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        facade_port = int(facade.rpartition(":")[2])
        with (
            _slow_vault(slices) as slow,
            _server("floor", work, env) as (floor_socket, _, _),
            _server("daemon", work, env, facade_port=facade_port,
                    vaults=[slow] if slow else None) as (daemon_socket, daemon_pid, ready),
        ):  # fmt: skip
            cold_slices = iter(range(slices))
            facts["daemon_exec_to_ready_seconds"] = round(ready, 3)
            facts["daemon_rss_mib_before"] = round(rss_mib(daemon_pid), 1)
            for run in range(runs):
                for workload in chosen:
                    for c in concurrencies:
                        load = workload
                        targets: list[tuple[str, Path | str]] = (
                            [("facade", facade)] if load.facade
                            else [("daemon", daemon_socket)] if load.cold
                            else [("floor", floor_socket), ("daemon", daemon_socket)]
                        )  # fmt: skip
                        if load.cold:
                            load = replace(load, uris=cold_uris(next(cold_slices)))
                        for server, target in targets:
                            rps, latencies, failed = _h2load(target, load, c, duration, work)
                            samples.append(Sample(
                                server, load.name, c, run, rps, rps * load.refs_per_request,
                                _percentile(latencies, 0.5), _percentile(latencies, 0.99),
                                _percentile(latencies, 0.999), failed,
                            ))  # fmt: skip
                            print(f"run {run + 1}/{runs} {load.name:6} c={c:<3} {server:6}"
                                  f" {rps:10.0f} req/s  p99 {samples[-1].p99_ms:.3f} ms"
                                  f"  failed {failed}", flush=True)  # fmt: skip
            facts["daemon_rss_mib_after"] = round(rss_mib(daemon_pid), 1)
    return {"samples": [asdict(s) for s in samples], "facts": facts, "machine": machine()}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    command = ["h2load", "--version"]
    h2load = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "h2load": h2load.strip()}  # fmt: skip


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per workload and concurrency: medians (and min-max) per server, daemon/floor ratio."""
    rows = []
    samples = [Sample(**s) for s in result["samples"]]
    keys = sorted({(s.workload, s.concurrency) for s in samples if s.server == "floor"})
    for workload, c in keys:
        row: dict[str, Any] = {"workload": workload, "concurrency": c}
        for server in ("floor", "daemon"):
            mine = [s for s in samples if (s.server, s.workload, s.concurrency) ==
                    (server, workload, c)]  # fmt: skip
            refs = [s.refs_per_second for s in mine]
            row[server] = {
                "refs_per_second": statistics.median(refs),
                "refs_per_second_range": [min(refs), max(refs)],
                "p50_ms": statistics.median(s.p50_ms for s in mine),
                "p99_ms": statistics.median(s.p99_ms for s in mine),
                "p999_ms": statistics.median(s.p999_ms for s in mine),
                "failed": sum(s.failed for s in mine),
            }
        row["ratio"] = row["daemon"]["refs_per_second"] / row["floor"]["refs_per_second"]
        rows.append(row)
    return rows


def summarize_cold(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per concurrency: cache misses served per second against the slow Vault."""
    samples = [Sample(**s) for s in result["samples"] if s["workload"] == "cold"]
    rows = []
    for c in sorted({s.concurrency for s in samples}):
        mine = [s for s in samples if s.concurrency == c]
        rows.append({
            "concurrency": c,
            "refs_per_second": statistics.median(s.refs_per_second for s in mine),
            "p50_ms": statistics.median(s.p50_ms for s in mine),
            "p99_ms": statistics.median(s.p99_ms for s in mine),
            "p999_ms": statistics.median(s.p999_ms for s in mine),
            "failed": sum(s.failed for s in mine),
        })  # fmt: skip
    return rows


def summarize_facade(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per concurrency: the facade's median beside the daemon's socket ``single`` median."""
    samples = [Sample(**s) for s in result["samples"]]
    rows = []
    for c in sorted({s.concurrency for s in samples if s.server == "facade"}):
        facade = [s for s in samples if s.server == "facade" and s.concurrency == c]
        socket_ = [s for s in samples if (s.server, s.workload, s.concurrency) ==
                   ("daemon", "single", c)]  # fmt: skip
        row: dict[str, Any] = {
            "concurrency": c,
            "facade_refs_per_second": statistics.median(s.refs_per_second for s in facade),
            "facade_p50_ms": statistics.median(s.p50_ms for s in facade),
            "facade_p99_ms": statistics.median(s.p99_ms for s in facade),
            "failed": sum(s.failed for s in facade),
        }
        if socket_:
            row["socket_refs_per_second"] = statistics.median(s.refs_per_second for s in socket_)
            row["facade_over_socket"] = (
                row["facade_refs_per_second"] / row["socket_refs_per_second"]
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], result: dict[str, Any], runs: int) -> str:
    m, f = result["machine"], result["facts"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['h2load']};"
        f" server on core {SERVER_CORE}, h2load on core {LOAD_CORE}; medians of {runs} run(s)"
        " (min-max).",
        "",
        "| workload | c | floor refs/s | daemon refs/s | daemon/floor | daemon p50 / p99 /"
        " p99.9 ms | floor p50 / p99 ms | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        fl, d = row["floor"], row["daemon"]
        lo, hi = d["refs_per_second_range"]
        lines.append(
            f"| {row['workload']} | {row['concurrency']} | {fl['refs_per_second']:,.0f}"
            f" | {d['refs_per_second']:,.0f} ({lo:,.0f}-{hi:,.0f}) | {row['ratio']:.3f}x"
            f" | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} / {d['p999_ms']:.2f}"
            f" | {fl['p50_ms']:.2f} / {fl['p99_ms']:.2f} | {d['failed'] + fl['failed']} |"
        )
    facade = summarize_facade(result)
    if facade:
        lines += ["", "| over the Vault-KV facade (TCP) | c | refs/s | p50 / p99 ms"
                  " | socket `single` refs/s | facade/socket | failed |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for row in facade:
            ratio = row.get("facade_over_socket")
            lines.append(
                f"| facade | {row['concurrency']} | {row['facade_refs_per_second']:,.0f}"
                f" | {row['facade_p50_ms']:.2f} / {row['facade_p99_ms']:.2f}"
                f" | {row.get('socket_refs_per_second', float('nan')):,.0f}"
                f" | {'-' if ratio is None else f'{ratio:.2f}x'} | {row['failed']} |"
            )
    misses = summarize_cold(result)
    if misses:
        lines += ["", f"| cold misses (Vault test server, {BACKEND_LATENCY * 1000:g} ms a request)"
                  " | c | refs/s | p50 / p99 / p99.9 ms | failed |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for row in misses:
            lines.append(
                f"| cold | {row['concurrency']} | {row['refs_per_second']:,.0f}"
                f" | {row['p50_ms']:.2f} / {row['p99_ms']:.2f} / {row['p999_ms']:.2f}"
                f" | {row['failed']} |"
            )
    lines += ["", f"Daemon exec -> ready with {SECRETS + 100} prefetched: "
              f"{f['daemon_exec_to_ready_seconds']} s; RSS {f['daemon_rss_mib_before']} MiB"
              f" before the load, {f['daemon_rss_mib_after']} MiB after."]  # fmt: skip
    cold = f.get("cold_reads")
    if cold:
        lines.append(f"{cold['readers']} concurrent cold reads of one reference:"
                     f" {cold['backend_calls']:.0f} backend call(s).")  # fmt: skip
    if "prefetch" in f:
        lines += startup.markdown(f["prefetch"])
    if "refresh_burst" in f:
        lines += refresh_burst.markdown(f["refresh_burst"])
    if "aws_refresh" in f:
        lines += aws_refresh.markdown(f["aws_refresh"])
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], target: Path) -> bool:
    """req/s and p99 against concurrency, daemon and floor; False without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415 - only make bench installs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    figure, (rate, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for workload in sorted({r["workload"] for r in rows}):
        mine = [r for r in rows if r["workload"] == workload]
        xs = [r["concurrency"] for r in mine]
        for server, style in (("daemon", "-o"), ("floor", "--s")):
            rate.plot(xs, [r[server]["refs_per_second"] for r in mine], style,
                      label=f"{workload} {server}")  # fmt: skip
            tail.plot(xs, [r[server]["p99_ms"] for r in mine], style,
                      label=f"{workload} {server}")  # fmt: skip
    for axes, label in ((rate, "refs/s"), (tail, "p99 latency, ms")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent connections")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
    rate.set_yscale("log")
    rate.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 run of 2 s at c = 16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--workloads", nargs="+", default=[w.name for w in workloads()])
    parser.add_argument("--save", action="store_true", help="write <results>/<date>.*")
    parser.add_argument("--results", type=Path, default=RESULTS, help="default bench/results")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    if args.quick:
        args.runs, args.duration, args.concurrency = 1, 2.0, [16]
        args.workloads = [w for w in args.workloads if w != "cold"]  # CI: no Vault to fill
    result = measure(args.runs, args.concurrency, args.duration, args.workloads)
    result["facts"]["cold_reads"] = cold_reads()
    if not args.quick:  # make bench only: about 3 minutes more
        result["facts"]["prefetch"] = startup.lifecycle([0, 10_000, 50_000, 100_000])
        result["facts"]["refresh_burst"] = refresh_burst.measure()
        result["facts"]["aws_refresh"] = aws_refresh.measure()
    rows = summarize(result)
    table = markdown(rows, result, args.runs)
    print("\n" + table)
    if args.save:
        args.results.mkdir(exist_ok=True)
        stem = args.results / datetime.now(UTC).strftime("%Y-%m-%d")
        summary = {"summary": rows, "facade": summarize_facade(result),
                   "cold": summarize_cold(result)}  # fmt: skip
        stem.with_suffix(".json").write_text(json.dumps({**result, **summary}, indent=1))
        stem.with_suffix(".md").write_text(table)
        if plot(rows, stem.with_suffix(".png")):
            print(f"wrote {stem}.json, .md and .png")
        else:
            print(f"wrote {stem}.json and .md (no matplotlib: no plot)")


if __name__ == "__main__":
    main()
