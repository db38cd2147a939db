"""Canary strings planted as secret values and backend credentials, and the scanner for them.

The promise under test: no secret value and no backend credential ever appears in a
log line, a metrics scrape, an error body, ``/v1/status``, ``/readyz`` or an
exception's text. The test peers store values that contain ``CANARY_VALUE`` and hand
out credentials that contain ``CANARY_CREDENTIAL`` (``value()`` and ``credential()``
make distinct ones), and the suite scans centrally for them: ``tests/conftest.py``
(captured output of every in-process test), ``tests.integration.harness`` (every
answer, scrape and log of a daemon process) and ``tests.backends.contract``
(exceptions a backend test expects).

Forms scanned. Raw text, case-insensitively (a name upper-cased on its way to a log
is still a leak). JSON escaping and URL encoding of the canaries are the identity
(lower-case hex, letters and ``-`` only), so the raw scan covers a canary inside a
JSON document or a URL. Base64, standard and URL-safe alphabets, at each of the
three byte alignments, because a value can travel as base64: AWS ``SecretBinary``
and GCP payloads are bytes, and ``base64_decode`` means the backend stores the
base64 of the value. Hex, quoted-printable and the like are not scanned: nothing in
the daemon produces them.

Every ``assert_clean`` failure names where the leak was and shows a short context
with the canary masked, so a failing report does not leak the canary itself.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CANARY_VALUE = "canary-value-5e1b7c93a2d04f68"  # inside every planted secret value
CANARY_CREDENTIAL = "canary-cred-9d42a6f0c1e87b35"  # inside every planted backend credential
CONTEXT = 40  # characters of context shown either side of a leak

_planted: dict[str, str] = {}  # more credentials, by text: label (see ``plant_credential``)


def value(label: str) -> str:
    """A secret value for a test: ``label`` (what the test calls it) plus the canary."""
    return f"{label}-{CANARY_VALUE}"


def credential(label: str) -> str:
    """A backend credential for a test (token, secret id, key): ``label`` plus the canary."""
    return f"{label}-{CANARY_CREDENTIAL}"


def plant_credential(text: str, label: str = "planted credential") -> str:
    """Scan for ``text`` as a credential too, until ``forget_planted``: for a credential
    whose format cannot hold the canary (a generated private key). Returns ``text``."""
    if len(text) < 16:
        raise ValueError("a planted credential must be at least 16 characters")
    _planted[text] = label
    return text


def forget_planted() -> None:
    """Drop the credentials ``plant_credential`` added (called before each test)."""
    _planted.clear()


def base64_forms(text: str) -> list[str]:
    """The parts of ``text``'s base64 that do not depend on what surrounds it, for each of
    the three alignments it can have inside a longer encoded string, in both alphabets."""
    raw = text.encode()
    forms: list[str] = []
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw).decode()
        start = (8 * offset + 5) // 6  # characters that also carry the preceding bytes
        end = (8 * (offset + len(raw))) // 6  # characters that also carry the following ones
        fixed = encoded[start:end]
        forms += [fixed, fixed.replace("+", "-").replace("/", "_")]
    return list(dict.fromkeys(forms))


@dataclass(frozen=True)
class _Needle:
    label: str  # what is shown instead of the canary
    text: str
    fold_case: bool  # base64 is case-sensitive, raw text is not

    def find(self, haystack: str, folded: str) -> int:
        return (folded if self.fold_case else haystack).find(self.text)


def _forms(label: str, canary: str) -> tuple[_Needle, ...]:
    raw = _Needle(f"<{label}>", canary.lower(), fold_case=True)
    encoded = (_Needle(f"<{label} as base64>", f, fold_case=False) for f in base64_forms(canary))
    return (raw, *encoded)


_VALUE_NEEDLES = _forms("CANARY_VALUE", CANARY_VALUE)
_CREDENTIAL_NEEDLES = _forms("CANARY_CREDENTIAL", CANARY_CREDENTIAL)


def _needles(*, values: bool) -> Iterator[_Needle]:
    if values:
        yield from _VALUE_NEEDLES
    yield from _CREDENTIAL_NEEDLES
    for text, label in _planted.items():
        yield _Needle(f"<{label}>", text, fold_case=False)


def mask(text: str) -> str:
    """``text`` with every canary form (and planted credential) replaced by its label."""
    for needle in _needles(values=True):
        flags = re.IGNORECASE if needle.fold_case else 0
        text = re.sub(re.escape(needle.text), needle.label, text, flags=flags)
    return text


def leaks(text: str, *, allow_values: bool = False) -> list[str]:
    """One masked context line per kind of canary found in ``text`` (empty: clean)."""
    folded = text.lower()
    found: list[str] = []
    for needle in _needles(values=not allow_values):
        at = needle.find(text, folded)
        if at < 0:
            continue
        start, end = max(0, at - CONTEXT), at + len(needle.text) + CONTEXT
        snippet = text[start:end]
        context = "..." * (start > 0) + mask(snippet) + "..." * (end < len(text))
        found.append(f"{needle.label} at offset {at}: {context!r}")
    return found


def assert_clean(text: str, *, allow_values: bool = False, where: str = "text") -> None:
    """Fail if ``text`` holds a canary credential, or (unless ``allow_values``) a canary
    value, in any scanned form; the message names ``where`` and shows masked context."""
    __tracebackhide__ = True  # pytest would print the arguments: the unmasked text
    found = leaks(text, allow_values=allow_values)
    if found:
        kind = "a canary credential" if allow_values else "a canary value or credential"
        details = "\n  ".join(found)
        raise AssertionError(f"{kind} leaked into {where}:\n  {details}")


def exception_texts(exc: BaseException) -> list[tuple[str, str]]:
    """``(where, text)`` for ``str`` and ``repr`` of ``exc`` and of each exception chained
    to it as a traceback shows them (``__cause__``, else an unsuppressed ``__context__``):
    what a caller sees and what a log line with ``exc_info`` would render."""
    texts: list[tuple[str, str]] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        name = type(current).__name__
        texts += [(f"str() of {name}", str(current)), (f"repr() of {name}", repr(current))]
        if current.__cause__ is not None:
            todo.append(current.__cause__)
        elif current.__context__ is not None and not current.__suppress_context__:
            todo.append(current.__context__)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
    return texts


def assert_exception_clean(exc: BaseException) -> None:
    """No canary value or credential in the text or repr of ``exc`` or its chain."""
    __tracebackhide__ = True
    assert_all_clean(exception_texts(exc))


def assert_all_clean(texts: Iterable[tuple[str, str]], *, allow_values: bool = False) -> None:
    """``assert_clean`` over ``(where, text)`` pairs, reporting every leak at once."""
    __tracebackhide__ = True
    failures: list[str] = []
    for where, text in texts:
        try:
            assert_clean(text, allow_values=allow_values, where=where)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("\n".join(failures))
