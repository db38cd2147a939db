"""What every answer of the socket API must satisfy, and the record of what did not.

A fuzz test sends its cases through ``Run.case``; violations are collected by class
(the rule broken plus status and code), keeping the shortest request of each class,
and ``Run.finish`` fails the test with one entry per class. So a single run reports
every distinct failure, with a small reproducer each, instead of stopping at the first.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tests.fuzz import wire
from tests.fuzz.daemon import CREDENTIAL_CANARY, VALUE_CANARY, FuzzDaemon

# design.md section 4, plus the socket API's 405 (wrong method) and 408 (slow client).
STABLE_CODES = {
    "invalid_reference": 400,
    "invalid_request": 400,
    "forbidden": 403,
    "not_found": 404,
    "unknown_vault": 404,
    "payload_too_large": 413,
    "too_many_requests": 429,
    "method_not_allowed": 405,
    "request_timeout": 408,
}
# The one backend condition the env backend can produce: ``?base64_decode`` on a value
# that is not base64 (design.md: 502 backend_error, "the backend failed in a way
# retrying will not fix"). Allowed only for a request that asks for base64_decode.
BASE64_ERROR = ("backend_error", 502)
SHOWN = 400  # characters of a request or an answer shown in a report

# Totals per test for the session summary (tests/fuzz/conftest.py prints them).
STATS: dict[str, Counter[str]] = {}


def count(test: str, what: str = "cases") -> None:
    STATS.setdefault(test, Counter())[what] += 1


@dataclass(frozen=True)
class Expect:
    """What a case's construction lets us predict beyond the rules every answer obeys."""

    proxied: bool = False  # carries a proxy header: must be refused (400 invalid_request)
    nul_reference: bool = False  # the single ref holds a NUL: 400 invalid_reference
    value: str | None = None  # a clean read of a known reference: 200 with this value
    batch_nul: frozenset[int] = frozenset()  # batch refs holding a NUL: invalid_reference
    batch_values: tuple[tuple[int, str], ...] = ()  # batch refs that must resolve
    base64_decode: bool = False  # asks for base64_decode: 502 backend_error is allowed


NOTHING = Expect()


@dataclass
class Failure:
    kind: str
    count: int
    request: bytes
    observed: str


def mask(text: str) -> str:
    """A report names the canaries, never shows them."""
    return text.replace(VALUE_CANARY, "<VALUE-CANARY>").replace(
        CREDENTIAL_CANARY, "<CREDENTIAL-CANARY>"
    )


def shown(data: bytes, limit: int = SHOWN) -> str:
    text = repr(data[:limit]) + (f" ... ({len(data)} bytes)" if len(data) > limit else "")
    return mask(text)


def describe(exchange: wire.Exchange) -> str:
    response = exchange.response
    if response is None:
        what = "timed out" if exchange.timed_out else "closed without an answer"
        return f"{what}; received {shown(exchange.received)}"
    body = b"<event stream>" if response.body is None else response.body
    return mask(f"{response.status} {response.content_type or '-'} ") + shown(body)


@dataclass
class Verdict:
    """The problems of one answer, by class, with what was observed."""

    problems: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, observed: str) -> None:
        self.problems.append((kind, observed))


def _error_of(document: Any) -> tuple[str | None, str | None]:
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        code, message = document["error"].get("code"), document["error"].get("message")
        return (code if isinstance(code, str) else None), (
            message if isinstance(message, str) else None
        )
    return None, None


def check(exchange: wire.Exchange, expect: Expect, *, half_close: bool) -> Verdict:
    """Every rule of the socket API contract, applied to one exchange."""
    verdict = Verdict()
    seen = describe(exchange)
    if exchange.timed_out:
        if half_close:
            verdict.add("connection still open 5 s after the client's EOF", seen)
        else:
            verdict.add("no answer within 5 s to a complete request", seen)
    if exchange.malformed is not None:
        verdict.add("answer is not HTTP", f"{exchange.malformed}; {seen}")
    if CREDENTIAL_CANARY.encode() in exchange.received:
        verdict.add("credential canary in an answer", seen)
    response = exchange.response
    if response is None:
        if expect.value is not None or expect.nul_reference:
            verdict.add("clean request closed without an answer", seen)
        return verdict
    status, body = response.status, response.body
    code: str | None = None
    document: Any = None
    if body and response.content_type == "application/json":
        try:
            document = json.loads(body)
        except ValueError:
            document = None
    if not 200 <= status < 300 and (body or body is None):
        if response.content_type != "application/json":
            verdict.add(f"non-JSON error body: {status} {response.content_type or '-'}", seen)
        elif document is None:
            verdict.add(f"error body does not parse as JSON: {status}", seen)
        else:
            code, message = _error_of(document)
            exact = (
                isinstance(document, dict)
                and document.keys() == {"error"}
                and document["error"].keys() == {"code", "message"}
            )
            if code is None or message is None or not exact:
                verdict.add(f"error body not {{error: {{code, message}}}}: {status}", seen)
            elif status >= 500:
                pass  # its own class below
            elif code not in STABLE_CODES:
                verdict.add(f"error code outside the stable set: {status} {code}", seen)
            elif STABLE_CODES[code] != status:
                verdict.add(f"error code does not match its status: {status} {code}", seen)
    if status >= 500 and not ((code, status) == BASE64_ERROR and expect.base64_decode):
        verdict.add(f"5xx answer: {status} {code or response.content_type or '-'}", seen)
    if status != 200 and VALUE_CANARY.encode() in response.head + (body or b""):
        verdict.add(f"value canary in a non-200 answer: {status} {code}", seen)
    if status == 200 and isinstance(document, dict):
        _check_batch(document, expect, verdict, seen)
    if expect.proxied and 200 <= status < 300:
        verdict.add(f"proxy header accepted: {status}", seen)
    if expect.nul_reference and (status, code) != (400, "invalid_reference"):
        verdict.add(f"NUL in a reference not refused as invalid_reference: {status} {code}", seen)
    if expect.value is not None:
        value = document.get("value") if isinstance(document, dict) else None
        if status != 200 or value != expect.value:
            verdict.add(f"known reference not served: {status} {code}", seen)
    return verdict


def _check_batch(document: dict[str, Any], expect: Expect, verdict: Verdict, seen: str) -> None:
    results = document.get("results")
    if not isinstance(results, list):
        return
    for index, result in enumerate(results):
        error = result.get("error") if isinstance(result, dict) else None
        if error is not None:  # a per-reference error: same rules as an error answer
            code, _ = _error_of(result)
            if VALUE_CANARY in json.dumps(error):
                verdict.add(f"value canary in a batch error: {code}", seen)
            if code is None or (
                code not in STABLE_CODES and not (code == "backend_error" and expect.base64_decode)
            ):
                verdict.add(f"batch error code outside the stable set: {code}", seen)
        got = error.get("code") if isinstance(error, dict) else None
        if index in expect.batch_nul and got != "invalid_reference":
            verdict.add(f"NUL in a batch reference not refused as invalid_reference: {got}", seen)
    for index, value in expect.batch_values:
        result = results[index] if index < len(results) else None
        if not isinstance(result, dict) or result.get("value") != value:
            verdict.add("known reference not served in a batch", seen)


@dataclass(frozen=True)
class LogProblem:
    kind: str
    line: str
    at: float | None  # when the daemon logged it (a traceback: its last line before)


def _timestamp(event: dict[str, Any]) -> float | None:
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _request_line(following: list[str]) -> str:
    """Which request a failure line was about: the next ``request`` line, if close."""
    for line in following[:8]:
        if '"request"' in line:
            try:
                event = json.loads(line)
            except ValueError:
                return ""
            if event.get("event") == "request":
                return (
                    f" (then: {event.get('method')} {event.get('endpoint')} {event.get('status')})"
                )
    return ""


def log_problems(text: str) -> list[LogProblem]:
    """Lines the daemon must never log: failures of its own, tracebacks, canaries."""
    problems: list[LogProblem] = []
    block: list[str] = []  # consecutive lines that are not JSON: one traceback, chained or not
    at: float | None = None
    lines = [*text.splitlines(), "{}"]
    for number, line in enumerate(lines):
        if VALUE_CANARY in line:
            problems.append(LogProblem("log: value canary", mask(line[:SHOWN]), at))
        if CREDENTIAL_CANARY in line:
            problems.append(LogProblem("log: credential canary", mask(line[:SHOWN]), at))
        if not line.startswith("{"):
            block.append(line)
            continue
        if any(b.startswith("Traceback") for b in block):
            last = [b.strip() for b in block if b.strip()][-3:]
            problems.append(LogProblem("log: Traceback", mask(" | ".join(last)[:SHOWN]), at))
        block = []
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        at = _timestamp(event) or at
        name, level = event.get("event"), event.get("level")
        if name == "request.failed":
            kind = f"log: request.failed ({event.get('error_type')})"
            problems.append(LogProblem(kind, mask(line + _request_line(lines[number + 1 :])), at))
        elif level in ("error", "critical"):
            problems.append(LogProblem(f"log: {level} event {name}", mask(line[:SHOWN]), at))
    return problems


class Run:
    """The cases of one fuzz test against one daemon: counts and distinct failures."""

    def __init__(self, name: str, daemon: FuzzDaemon) -> None:
        self.name = name
        self.daemon = daemon
        self.stats = STATS.setdefault(name, Counter())
        self.failures: dict[str, Failure] = {}
        self.dead = False
        self.recent: deque[tuple[float, bytes]] = deque(maxlen=64)  # (sent at, request)
        daemon.new_log_text()  # what earlier tests logged is theirs

    def record(self, kind: str, request: bytes, observed: str) -> None:
        failure = self.failures.get(kind)
        if failure is None:
            self.failures[kind] = Failure(kind, 1, request, observed)
            return
        failure.count += 1
        if len(request) < len(failure.request):
            failure.request, failure.observed = request, observed

    def case(
        self, data: bytes, expect: Expect = NOTHING, *, half_close: bool | None = None
    ) -> None:
        """Send one case on a fresh connection and check the answer and the log."""
        if self.dead:
            self.stats["skipped (daemon gone)"] += 1
            return
        self.scan_log()  # late lines of earlier cases (aiohttp drains bodies after answering)
        self.recent.append((time.time(), data))
        if half_close is None:
            half_close = not wire.request_is_complete(data)
        exchange = wire.exchange(
            self.daemon.socket, data, half_close=half_close, sync=self.daemon.answers
        )
        self.stats["cases"] += 1
        response = exchange.response
        if response is not None:
            self.stats[f"status {response.status}"] += 1
        elif exchange.timed_out:
            self.stats["timed out"] += 1
        else:
            self.stats["closed without an answer"] += 1
        if half_close:
            self.stats["half-closed (incomplete by construction)"] += 1
        for checked, what in [
            (expect.proxied, "proxy header refused"),
            (expect.nul_reference or expect.batch_nul, "NUL ref refused"),
            (expect.value is not None or expect.batch_values, "known ref served"),
        ]:
            if checked:
                self.stats[f"checked: {what}"] += 1
        for kind, observed in check(exchange, expect, half_close=half_close).problems:
            self.record(kind, data, observed)
        # The daemon may still be finishing this case: one answered request later,
        # whatever it logged for this one is in the file. It also proves it is alive.
        if (response is None or half_close) and not self.daemon.answers():
            self.record("daemon stopped answering /healthz", data, describe(exchange))
            if not self.daemon.alive():
                self.dead = True
        self.scan_log()

    def scan_log(self) -> None:
        """Record what the daemon logged that it must not, against the case it was logged
        during: the last one sent before the line's timestamp."""
        for problem in log_problems(self.daemon.new_log_text()):
            cases = list(reversed(self.recent))
            index = 0
            if problem.at is not None:
                while index + 1 < len(cases) and cases[index][0] > problem.at:
                    index += 1
            request = cases[index][1] if cases else b""
            line = problem.line
            if index + 1 < len(cases):  # a line logged after an answer may be the case before's
                line += f"; or from the case before: {shown(cases[index + 1][1], 160)}"
            self.record(problem.kind, request, line)

    def report(self) -> str:
        lines = [
            f"{len(self.failures)} distinct failure classes in {self.stats['cases']} cases"
            f" of {self.name} (shortest request of each class):"
        ]
        for failure in sorted(self.failures.values(), key=lambda f: f.kind):
            lines.append(f"- {failure.kind}  [{failure.count} cases]")
            lines.append(f"    request:  {shown(failure.request)}")
            lines.append(f"    observed: {failure.observed}")
        return "\n".join(lines)

    def finish(self, minimum: int) -> None:
        """Fail with every distinct failure class; also if fewer cases ran than promised."""
        if self.daemon.alive() and self.daemon.answers():
            self.scan_log()  # the last case's late lines
        self.stats["failure classes"] = len(self.failures)
        assert not self.failures, self.report()
        assert self.stats["cases"] >= minimum, f"only {self.stats['cases']} of {minimum} cases ran"
