"""The harness's canary checks can fail: planted leaks in answers, events, scrapes and logs.

``check_answer`` and ``check_event`` are shown hand-made answers; a real daemon whose
vault prefixes are the canaries (a prefix is no secret, but it is echoed by
``/v1/status``, labelled in metrics and logged) shows that the checks of
``Daemon.session``, ``Daemon.metrics`` and ``Daemon.stop`` see what the daemon sends.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.canary import CANARY_CREDENTIAL, CANARY_VALUE, credential, leaks, value
from tests.integration.conftest import MakeDaemon
from tests.integration.harness import check_answer, check_event

SECRET = value("db")
TOKEN = credential("token")


def _answer(document: Any) -> str:
    return json.dumps(document)


def test_values_are_allowed_only_in_successful_reads() -> None:
    """A value is fine as the value of a 200 read or batch result, and nowhere else:
    not in another field, an error, a non-200 answer or another endpoint."""
    read = {"ref": "{vault://env/db}", "value": SECRET, "version": None}
    check_answer("GET", "/v1/secrets", 200, _answer(read))
    batch = {"results": [read, {"ref": "x", "error": {"code": "not_found", "message": "m"}}]}
    check_answer("POST", "/v1/secrets:batch", 200, _answer(batch))
    leaking = [
        ("GET", "/v1/secrets", 200, {**read, "version": SECRET}),
        ("GET", "/v1/secrets", 400, {"error": {"code": "invalid_reference", "message": SECRET}}),
        ("POST", "/v1/secrets:batch", 200, {"results": [{"ref": "x", "error": {"m": SECRET}}]}),
        ("GET", "/v1/status", 200, {"vaults": {"env": {"last_error": SECRET}}}),
        ("GET", "/readyz", 503, {"missing": {"ref": SECRET}}),
        ("POST", "/v1/refresh", 200, {"refreshed": [{"value": SECRET}]}),
    ]
    for method, path, status, document in leaking:
        with pytest.raises(AssertionError, match=f"answer to {method} {path} \\({status}\\)"):
            check_answer(method, path, status, _answer(document))


def test_credentials_are_never_allowed_even_as_a_value() -> None:
    """A credential fails every answer, a successful read's value included."""
    with pytest.raises(AssertionError, match="CANARY_CREDENTIAL"):
        check_answer("GET", "/v1/secrets", 200, _answer({"ref": "r", "value": TOKEN}))
    with pytest.raises(AssertionError, match="CANARY_CREDENTIAL"):
        check_answer("GET", "/metrics", 200, f'x{{vault="{TOKEN}"}} 1.0\n')  # not JSON


def test_an_echo_of_the_request_is_not_a_leak_but_anything_else_is() -> None:
    """A reference the caller sent (holding a canary) may come back quoted in the
    message; a canary the caller did not send still fails the same answer."""
    ref = "{vault://env/x?ttl=" + CANARY_VALUE + "}"
    echo = {"error": {"code": "invalid_reference", "message": f"ttl: not a number [{ref}]"}}
    check_answer("GET", "/v1/secrets", 400, _answer(echo), sent=[ref])
    echo["error"]["message"] += " " + SECRET
    with pytest.raises(AssertionError, match="CANARY_VALUE"):
        check_answer("GET", "/v1/secrets", 400, _answer(echo), sent=[ref])


def test_watch_events_carry_values_only_when_asked() -> None:
    """An event's value is allowed on a stream with include_values, not otherwise; a
    value elsewhere in the event, or a credential, always fails."""
    event = {"ref": "{vault://env/db}", "event": "rotated", "value": SECRET}
    check_event("rotated", event, include_values=True)
    with pytest.raises(AssertionError, match="'rotated' watch event"):
        check_event("rotated", event, include_values=False)
    with pytest.raises(AssertionError, match="CANARY_VALUE"):
        check_event("failed", {"error": {"message": SECRET}}, include_values=True)
    with pytest.raises(AssertionError, match="CANARY_CREDENTIAL"):
        check_event("rotated", {**event, "value": TOKEN}, include_values=True)


async def test_a_real_daemon_is_checked_in_answers_watch_metrics_and_log(
    make_daemon: MakeDaemon,
) -> None:
    """With canary vault prefixes: a read through them passes (the ref is the caller's
    own, the value allowed), while /v1/status, a scrape and, at stop, the last scrape and
    the log are flagged for both canaries, masked; a watch stream is read and checked."""
    vaults = [{"prefix": CANARY_VALUE, "name": "env"}, {"prefix": CANARY_CREDENTIAL, "name": "env"}]
    daemon = await make_daemon({"vaults": vaults, "watch": {"heartbeat": 0.05}}).started()
    status, answer = await daemon.get(f"{{vault://{CANARY_VALUE}/db-password}}")
    assert (status, answer["value"]) == (200, value("hunter2-integration"))
    async with daemon.watch("{vault://env/db-password}", include_values=True) as events:
        assert await anext(events) == ("comment", {"comment": "heartbeat"})
    reports = []
    with pytest.raises(AssertionError, match=r"GET /v1/status \(200\)") as caught:
        await daemon.request("GET", "/v1/status")
    reports.append(str(caught.value))
    with pytest.raises(AssertionError, match="a metrics scrape") as caught:
        await daemon.metrics()
    reports.append(str(caught.value))
    with pytest.raises(AssertionError, match="the daemon log") as caught:
        daemon.stop()
    reports.append(str(caught.value))
    assert "the metrics scraped at stop" in reports[-1]
    for report in reports:
        assert "<CANARY_VALUE>" in report
        assert "<CANARY_CREDENTIAL>" in report
        assert leaks(report) == []  # masked
    daemon.stop()  # reported once per start: the fixture's stop does not fail again
