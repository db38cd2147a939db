"""The integration tests' daemon fixtures, re-exported for the deploy tests."""

from tests.integration.conftest import daemon, make_daemon

__all__ = ["daemon", "make_daemon"]
