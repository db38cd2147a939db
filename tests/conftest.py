"""Suite-wide settings that must be in place before any test module imports its SDK, and
the canary scan every test gets (see ``tests.canary``)."""

import os
import sys
from collections.abc import Iterator

import pytest
import structlog

from sidecar import logging as sidecar_logging
from tests.canary import assert_all_clean, forget_planted

# gRPC's C core logs connection events (GOAWAY on server stop) to stderr at INFO.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

pytest_plugins = ["pytester"]  # tests/unit/test_canary.py runs the scan on a planted leak


@pytest.fixture(autouse=True)
def canary_scan(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test logs through the daemon's own logging set-up (JSON lines on stderr,
    redaction on; debug level, so every line is scanned), and after it, what pytest
    captured of it is scanned: stderr and log records for canary values and credentials,
    stdout for credentials (``secret-sidecar resolve`` prints values there).

    Without ``configure`` structlog's defaults would apply in-process: console lines on
    the ``sys.stdout`` of import time, no redaction, so a log leak would look like
    legitimate stdout. Why this works: pytest's global capture replaces ``sys.stderr``
    before any test runs, and ``configure`` binds structlog's printer to the ``sys.stderr`` of that
    moment, so log lines land in the capture this reads even when the test uses
    ``capsys`` (which starts later). Output a ``capsys``/``capfd`` test did not read is
    handed back to the global capture when the test ends, so it is scanned too; what a
    test read itself with ``readouterr()`` is its own to check. Under ``-s`` nothing is
    captured and nothing is scanned.
    """
    forget_planted()
    saved = structlog.get_config()
    sidecar_logging.configure("debug", "json")
    try:
        yield
    finally:
        structlog.configure(**saved)  # as the test found it
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None or not capture.is_globally_capturing():
        return
    # Setup and call are already report sections; this teardown's output so far is
    # still in the capture: read it and write it back so the report keeps it.
    out, err = capture.read_global_capture()
    sys.stdout.write(out)
    sys.stderr.write(err)
    sections = [*request.node._report_sections, ("teardown", "stdout", out)]
    sections.append(("teardown", "stderr", err))
    values = [
        (f"captured {key} of {when}", text) for when, key, text in sections if key != "stdout"
    ]
    stdout = [
        (f"captured stdout of {when}", text) for when, key, text in sections if key == "stdout"
    ]
    assert_all_clean(values)
    assert_all_clean(stdout, allow_values=True)
