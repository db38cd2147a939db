"""The socket API of a real daemon under structured and raw HTTP fuzzing.

Every case is one fresh connection to the daemon's Unix socket. For every case: an
answer within 5 s or a close (a request we know is incomplete is half-closed first, so
the daemon knows no more is coming); no 5xx (except design.md's 502 backend_error for
a ref asking base64_decode of a value that is not base64); every non-2xx body is JSON
``{"error": {"code", "message"}}`` with a stable code matching its status; the
credential canary in no answer, the value canary in no non-200 answer; nothing logged
that is a failure, a traceback or a canary. After the module the daemon still serves.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings

from tests.fuzz import budget, wire
from tests.fuzz.daemon import FuzzDaemon
from tests.fuzz.oracle import Run
from tests.fuzz.strategies import (
    REGRESSIONS,
    Request,
    arbitrary_bytes,
    http_requests,
    mutated_requests,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(300)]


def test_structured_requests_get_contract_answers(fuzz_daemon: FuzzDaemon) -> None:
    """Requests built from the API's routes, methods, refs, headers and bodies (and odd
    ones: percent abuse, NUL, 100 KB refs, proxy headers, deep JSON, lying lengths) are
    answered by the contract; X-Forwarded-For is refused; a NUL in a ref is an
    invalid_reference; a clean read of a known secret is served its value. The failure
    classes found so far run first, as explicit examples."""
    run = Run("socket: structured HTTP", fuzz_daemon)

    @settings(budget.FUZZ, max_examples=budget.HTTP_STRUCTURED)
    @given(request=http_requests())
    def one(request: Request) -> None:
        half_close = request.half_close or not wire.request_is_complete(request.data)
        run.case(request.data, request.expect, half_close=half_close)

    for regression in reversed(REGRESSIONS):  # the outermost example runs first
        one = example(request=regression)(one)
    one()
    run.finish(budget.HTTP_STRUCTURED)


def test_arbitrary_bytes_get_contract_answers(fuzz_daemon: FuzzDaemon) -> None:
    """Arbitrary bytes, and HTTP-ish token soup, get a contract answer or a close."""
    run = Run("socket: arbitrary bytes", fuzz_daemon)

    @settings(budget.FUZZ, max_examples=budget.RAW_ARBITRARY)
    @given(data=arbitrary_bytes)
    def one(data: bytes) -> None:
        run.case(data)

    one()
    run.finish(budget.RAW_ARBITRARY)


def test_mutated_requests_get_contract_answers(fuzz_daemon: FuzzDaemon) -> None:
    """Valid requests with flipped, deleted, duplicated or injected bytes (CRLF, headers,
    lengths), truncated or pipelined, get a contract answer or a close."""
    run = Run("socket: mutated requests", fuzz_daemon)

    @settings(budget.FUZZ, max_examples=budget.RAW_MUTATIONS)
    @given(data=mutated_requests)
    def one(data: bytes) -> None:
        run.case(data)

    one()
    run.finish(budget.RAW_MUTATIONS)
