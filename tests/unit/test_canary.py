"""The canary scanners can fail: each is shown a planted leak and must flag it.

``tests.canary`` finds the canaries in every form it scans and masks them in its
reports; the autouse ``canary_scan`` fixture (tests/conftest.py) flags a test whose
captured output leaks, run here on planted tests through pytester.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from pathlib import Path

import pytest

from tests.canary import (
    CANARY_CREDENTIAL,
    CANARY_VALUE,
    assert_clean,
    assert_exception_clean,
    base64_forms,
    credential,
    leaks,
    mask,
    plant_credential,
    value,
)


def _planted_forms(secret: str) -> dict[str, str]:
    """``secret`` inside surrounding text, in every form the scanner must recognise."""
    around = f"prefix {secret} suffix"
    encoded = {
        f"base64 at alignment {n}": base64.b64encode(b"x" * n + around.encode()).decode()
        for n in range(3)
    }
    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff" + around.encode() + b"\xfe").decode()
    return {
        "raw": around,
        "upper case": around.upper(),
        "JSON": json.dumps({"message": around}),
        "URL-encoded": urllib.parse.quote(around),
        "URL-safe base64": urlsafe,
        **encoded,
    }


@pytest.mark.parametrize("secret", [value("db"), credential("token")])
def test_every_scanned_form_of_a_canary_is_flagged_and_masked(secret: str) -> None:
    """A canary raw, upper-cased, JSON-escaped, URL-encoded or base64 (any alignment, either
    alphabet) is flagged, naming where, and the report shows it masked, never in clear."""
    for form, text in _planted_forms(secret).items():
        with pytest.raises(AssertionError, match="leaked into the planted text") as caught:
            assert_clean(text, where="the planted text")
        report = str(caught.value)
        assert "CANARY_" in report, form
        assert leaks(report) == [], f"the report for {form} shows the canary: {report}"


def test_values_may_be_allowed_but_credentials_never() -> None:
    """allow_values lets a canary value through (a successful read), not a credential."""
    assert_clean(f"value: {value('db')}", allow_values=True)
    with pytest.raises(AssertionError, match="canary credential leaked into stdout"):
        assert_clean(f"token: {credential('t')}", allow_values=True, where="stdout")


def test_clean_text_passes_and_the_context_is_short() -> None:
    """Text without a canary passes; a leak's context is the canary's surroundings only."""
    assert_clean("nothing to see: canary-value-other, canary-cred-other")
    text = "a" * 500 + value("db") + "b" * 500
    (line,) = leaks(text)
    assert line.count("a") < 60
    assert "<CANARY_VALUE>" in line


def test_base64_forms_cover_every_alignment() -> None:
    """Each alignment's stable base64 part is a substring of the encoded canary there."""
    for n in range(3):
        encoded = base64.b64encode(b"\x00" * n + CANARY_VALUE.encode() + b"\x00").decode()
        assert any(form in encoded for form in base64_forms(CANARY_VALUE)), n


def test_planted_credential_is_scanned_and_masked() -> None:
    """A credential that cannot hold the canary is scanned once planted (until the next test)."""
    key = plant_credential("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "the test key")
    with pytest.raises(AssertionError, match="the test key"):
        assert_clean(f"key={key}", allow_values=True)
    assert mask(f"key={key}") == "key=<the test key>"


def test_exception_text_repr_and_chain_are_scanned() -> None:
    """A canary in an exception's str, its repr only, or a chained cause is flagged."""

    class Quiet(Exception):
        def __str__(self) -> str:
            return "nothing here"

    with pytest.raises(AssertionError, match=r"repr\(\) of Quiet"):
        assert_exception_clean(Quiet(CANARY_CREDENTIAL))
    try:
        try:
            raise KeyError(CANARY_VALUE)
        except KeyError as cause:
            raise RuntimeError("wrapped") from cause
    except RuntimeError as exc:
        with pytest.raises(AssertionError, match=r"str\(\) of KeyError"):
            assert_exception_clean(exc)
    suppressed = RuntimeError("clean")
    suppressed.__context__ = KeyError(CANARY_VALUE)
    suppressed.__suppress_context__ = True  # `raise ... from None`: never rendered
    assert_exception_clean(suppressed)


ROOT = Path(__file__).resolve().parents[2]  # the checkout: `tests` and `sidecar` import from it
PLANTED_TESTS = """
import logging, sys
from sidecar import logging as sidecar_logging
from tests.canary import value, credential

log = sidecar_logging.get_logger("planted")

def test_logs_value():
    log.info("planted.leak", detail=value("db"))

def test_logs_credential_in_setup(leaky_fixture):
    pass

def test_prints_credential():
    print("token", credential("t"))

def test_prints_value_on_stdout():
    print(value("db"))  # what `secret-sidecar resolve` does: allowed

def test_stdlib_logging_credential():
    logging.getLogger("botocore").warning("key %s", credential("aws"))

def test_logs_into_capsys_without_reading(capsys):
    sidecar_logging.configure()  # binds to capsys's stream, as an in-process CLI run would
    log.warning("planted.leak", detail=value("db"))

def test_redacted_field_is_clean():
    log.info("planted.redacted", token=credential("t"), value=value("db"))

def test_clean():
    log.info("planted.clean", secret_id="db")
"""

PLANTED_INI = """
[pytest]
filterwarnings = error
"""

PLANTED_CONFTEST = """
import pytest
from sidecar import logging as sidecar_logging
from tests.canary import credential
from tests.conftest import canary_scan

@pytest.fixture
def leaky_fixture():
    sidecar_logging.get_logger("fixture").info("setup", detail=credential("vault"))
"""


def test_autouse_scan_flags_leaks_in_captured_output(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real logging set-up, a canary in a log line (test or fixture), a
    credential on stdout or in a stdlib log record, and unread capsys output fail the
    test at teardown; a value on stdout, redacted fields and clean tests pass."""
    pytester.makeconftest(PLANTED_CONFTEST)
    pytester.makepyfile(test_planted=PLANTED_TESTS)
    pytester.makeini(PLANTED_INI)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # a subprocess: logging state stays its own
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # no plugin is needed: faster
    # --show-capture=no: the inner report must not print the planted output in clear
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--show-capture=no")
    result.assert_outcomes(passed=8, errors=5)
    output = result.stdout.str()
    where = dict(re.findall(r"ERROR at teardown of (\w+) _.*?leaked into (captured \w+ of \w+)",
                            output, flags=re.DOTALL))  # fmt: skip
    assert where == {
        "test_logs_value": "captured stderr of call",
        "test_logs_credential_in_setup": "captured stderr of setup",
        "test_prints_credential": "captured stdout of call",
        # stdlib records reach stderr as JSON (sidecar.logging) before pytest's log capture
        "test_stdlib_logging_credential": "captured stderr of call",
        "test_logs_into_capsys_without_reading": "captured stderr of call",
    }
    assert leaks(output + result.stderr.str()) == []  # the reports mask the canaries
