"""exec -> ready and RSS of the daemon with N prefetched env secrets, one daemon each.

Every size reads the same env backend with the same names and values
(``BENCH_<i>=v<i>``), so each is N distinct entries cached in the daemon. 100 000 such
variables are about 2.7 MB of environment, past the 2 MiB execve allows at the usual
8 MiB stack limit (a quarter of it); ``bench.daemon`` raises the soft stack limit for
that spawn only (execve then allows up to 6 MiB), which the daemon inherits: thread
stacks reserve more address space, not more RSS.

    python -m bench.startup 0 10000 100000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.daemon import daemon_command, environment_bytes, rss_mib, started
from bench.workload import plain_refs


def lifecycle(sizes: list[int]) -> dict[str, Any]:
    """Per size: exec -> ready seconds, RSS once ready, and the environment's bytes."""
    facts: dict[str, Any] = {}
    for size in sizes:
        env = {f"BENCH_{i}": f"v{i}" for i in range(size)}
        config = {
            "metrics": {"address": ""},
            "prefetch": plain_refs(size),
            "limits": {"rate": 1e9, "burst": 10**6},
            "cache": {"max_entries": 200_000},
        }
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            command, socket_path = daemon_command(config, Path(tmp))
            with started(command, socket_path, "/readyz", env, Path(tmp) / "daemon.log") as d:
                fact = {"exec_to_ready_seconds": round(d.ready_seconds, 3),
                        "rss_mib": round(rss_mib(d.pid), 1),
                        "environment_mib": round(environment_bytes(env) / 2**20, 1)}  # fmt: skip
        facts[str(size)] = fact
        print(f"prefetch {size}: exec -> ready {fact['exec_to_ready_seconds']:.3f} s,"
              f" RSS {fact['rss_mib']} MiB", flush=True)  # fmt: skip
    return facts


def markdown(facts: dict[str, Any]) -> list[str]:
    lines = [f"{int(size):,} prefetched: exec -> ready {fact['exec_to_ready_seconds']} s,"
             f" RSS {fact['rss_mib']} MiB." for size, fact in facts.items()]  # fmt: skip
    big = [f"{fact['environment_mib']} MiB" for fact in facts.values()
           if fact.get("environment_mib", 0) > 2]  # fmt: skip
    if big:
        lines.append(f"({', '.join(big)} of environment: past execve's usual 2 MiB, so the"
                     " bench raised the stack limit the daemon starts with.)")  # fmt: skip
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", type=int, nargs="+")
    print("\n".join(markdown(lifecycle(parser.parse_args().sizes))))
