"""The fuzz suite: its marker, the daemon each socket module fuzzes, and the case totals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.daemon import FuzzDaemon
from tests.fuzz.oracle import STATS, log_problems, mask


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fuzz: property-based fuzzing (runs by default; deselect with -m 'not fuzz')"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The number of generated cases per fuzz test, and how the socket ones were answered."""
    if not STATS:
        return
    terminalreporter.section("fuzz cases")
    total = 0
    for name, counts in STATS.items():
        total += counts["cases"]
        details = ", ".join(f"{key}: {n}" for key, n in sorted(counts.items()) if key != "cases")
        suffix = f" ({details})" if details else ""
        terminalreporter.write_line(f"{name}: {counts['cases']} cases{suffix}")
    terminalreporter.write_line(f"fuzz cases in total: {total}")


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzDaemon]:
    """A real daemon for one module; after the module it must still serve, stop cleanly
    on SIGTERM, and its whole log must hold no traceback, failure or canary."""
    daemon = FuzzDaemon(tmp_path_factory.mktemp("fuzz")).start()
    problems: list[str] = []
    try:
        yield daemon
    finally:
        if not daemon.alive():
            problems.append(f"the daemon died (exit code {daemon.returncode()})")
        elif not daemon.answers("/healthz"):
            problems.append("the daemon no longer answers /healthz")
        code = daemon.stop()
        if code != 0:
            problems.append(f"the daemon exited {code} on SIGTERM, not 0")
    kinds: dict[str, tuple[int, str]] = {}
    for problem in log_problems(daemon.logs()):
        count, first = kinds.get(problem.kind, (0, problem.line))
        kinds[problem.kind] = (count + 1, first)
    problems += [f"{count} x {kind}, first: {first}" for kind, (count, first) in kinds.items()]
    if problems:
        problems.append(f"(the daemon's log: {daemon.log_path})")
        pytest.fail(mask("after the module:\n" + "\n".join(problems)), pytrace=False)
