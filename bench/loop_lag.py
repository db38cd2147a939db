"""Cached-read latency while reads are stuck on a hung backend, against a healthy one.

Starts the real daemon (``python -m sidecar run``) with an hcv vault on the Vault-API
test server and an aws vault on moto's server, each behind the fault proxy of
``tests/faults``. Per backend, in alternating rounds: a healthy phase (proxy passing
traffic) and a hung phase (proxy holding every call, with ``--stuck`` reads of
never-cached keys in flight), each timing ``--reads`` sequential reads of one cached
key over a keep-alive connection. Prints p50/p99/p99.9/max per phase, the hung/healthy
ratios, and the daemon's own ``event_loop_lag_seconds`` mean per phase (with its
sample count: the daemon samples twice a second, so short phases give few samples).

    .venv/bin/python -m bench.loop_lag --reads 2000 --stuck 50 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.faults.peers import (
    BACKENDS,
    Backend,
    Client,
    Peers,
    finish,
    lag_config,
    percentile,
    running_peers,
    start_daemon,
    stuck_reads,
)
from tests.integration.harness import Daemon

FIGURES = (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))
LAG = "secret_sidecar_event_loop_lag_seconds"


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    lag_sum: float = 0.0
    lag_count: float = 0.0

    def figures(self) -> list[float]:
        return [percentile(self.latencies, fraction) * 1000 for _, fraction in FIGURES]

    @property
    def lag_ms(self) -> float:
        return 1000 * self.lag_sum / self.lag_count if self.lag_count else float("nan")

    def lag(self) -> str:
        return f"{self.lag_ms:.2f} ({self.lag_count:.0f})"


async def loop_lag(daemon: Daemon) -> tuple[float, float]:
    """The daemon's own loop-lag histogram: (sum, count) so far."""
    values = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(await daemon.metrics()):
        for sample in family.samples:
            for suffix in values:
                if sample.name == f"{LAG}_{suffix}":
                    values[suffix] = sample.value
    return values["sum"], values["count"]


async def timed(reader: Client, reference: str, reads: int, phase: Phase) -> None:
    lag_before = await loop_lag(reader.daemon)
    for _ in range(reads):
        reply = await reader.read(reference)
        if reply.status != 200:
            raise SystemExit(f"cached read failed: {reply}")
        phase.latencies.append(reply.elapsed)
    lag_after = await loop_lag(reader.daemon)
    phase.lag_sum += lag_after[0] - lag_before[0]
    phase.lag_count += lag_after[1] - lag_before[1]


async def measure(
    peers: Peers, backend: Backend, workdir: Path, *, reads: int, stuck: int, rounds: int
) -> tuple[Phase, Phase]:
    daemon = start_daemon(workdir, lag_config(peers))
    reader, stuck_client = Client(daemon), Client(daemon)
    healthy, hung = Phase(), Phase()
    try:
        cached = await peers.put(backend, "bench-cached", "bench value")
        for _ in range(200):  # warm-up: connection, code paths, allocator
            await reader.read(cached)
        for number in range(rounds):
            await timed(reader, cached, reads // rounds, healthy)
            tasks = await stuck_reads(stuck_client, peers, backend, stuck, f"bench-{number}")
            started = time.monotonic()
            await timed(reader, cached, reads // rounds, hung)
            if any(task.done() for task in tasks) or time.monotonic() - started > 25:
                raise SystemExit("stuck reads ended during the hung phase: lengthen timeouts")
            peers.heal()
            await asyncio.gather(*tasks)  # the next healthy phase starts with none in flight
    finally:
        peers.heal()
        await reader.close()
        await stuck_client.close()
        finish(daemon)
    return healthy, hung


async def main(backends: list[Backend], reads: int, stuck: int, rounds: int) -> None:
    names = [name for name, _ in FIGURES]
    header = "".join(f"{name + ' ms':>10}" for name in names) + f"{'loop lag ms (n)':>18}"
    print(
        f"cached-read latency, {reads} sequential reads per phase in {rounds} rounds, "
        f"{stuck} never-cached reads stuck on the hung backend"
    )
    print(f"{'backend':<8}{'phase':<9}{header}")
    with running_peers() as peers, tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            healthy, hung = await measure(
                peers, backend, Path(tmp) / backend, reads=reads, stuck=stuck, rounds=rounds
            )
            for label, phase in (("healthy", healthy), ("hung", hung)):
                row = "".join(f"{v:>10.2f}" for v in phase.figures())
                print(f"{backend:<8}{label:<9}{row}{phase.lag():>18}")
            pairs = [*zip(hung.figures(), healthy.figures(), strict=True)]
            pairs.append((hung.lag_ms, healthy.lag_ms))
            ratios = [f"{h / b:.2f}x" if b > 0 else "-" for h, b in pairs]
            row = "".join(f"{r:>10}" for r in ratios[:-1])
            print(f"{backend:<8}{'hung/ok':<9}{row}{ratios[-1]:>18}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, action="append", dest="backends")
    parser.add_argument("--reads", type=int, default=2000, help="per phase, over all rounds")
    parser.add_argument("--stuck", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.backends or list(BACKENDS), args.reads, args.stuck, args.rounds))
