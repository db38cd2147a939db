"""Vault reference parsing must match Kong's parser, quirks included."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import SidecarError
from sidecar.reference import InvalidReference, Reference, is_reference, parse

R = Reference

VALID: list[tuple[str, Reference]] = [
    # name / secret id / key
    ("{vault://env/foo}", R("env", "foo")),
    ("{vault://env/foo/bar}", R("env", "foo", "bar")),
    ("{vault://aws/a/b/c}", R("aws", "a/b", "c")),
    ("{vault://aws/a/b/c/d}", R("aws", "a/b/c", "d")),
    ("{vault://env//foo//bar}", R("env", "foo", "bar")),
    ("{vault://ENV/Foo/Bar}", R("ENV", "Foo", "Bar")),
    ("{vault://env/a b}", R("env", "a b")),
    ("{vault://env/a}b}", R("env", "a}b")),
    ("{vault://env/ключ/é}", R("env", "ключ", "é")),
    # trailing slash: the whole path is the secret id
    ("{vault://aws/a/b/}", R("aws", "a/b")),
    ("{vault://aws/a/}", R("aws", "a")),
    ("{vault://aws/a/b//}", R("aws", "a/b")),
    ("{vault://aws/a/b/?region=eu#2}", R("aws", "a/b", None, 2, {"region": "eu"})),
    # authority: userinfo, port, IPv6 brackets
    ("{vault://user@env/foo}", R("env", "foo")),
    ("{vault://user:pw@env:8200/foo}", R("env", "foo")),
    ("{vault://a@b@env/foo}", R("b@env", "foo")),
    ("{vault://env:8200/foo}", R("env", "foo")),
    ("{vault://env:/foo}", R("env", "foo")),
    ("{vault://[::1]/foo}", R("::1", "foo")),
    ("{vault://[::1]:8200/foo}", R("::1", "foo")),
    ("{vault://u@[::1]:8200/foo}", R("::1", "foo")),
    ("{vault://[]/foo}", R("[]", "foo")),
    ("{vault://env;x/foo}", R("env;x", "foo")),
    # ;params are dropped from the path
    ("{vault://env/foo;bar}", R("env", "foo")),
    ("{vault://env/foo/bar;x/y}", R("env", "foo", "bar")),
    ("{vault://aws/a/b/;v=1}", R("aws", "a/b")),
    ("{vault://env/foo;x?a=1#3}", R("env", "foo", None, 3, {"a": "1"})),
    # percent-decoding: %2F does not split, segments are decoded twice
    ("{vault://aws/a%2Fb/c}", R("aws", "a/b", "c")),
    ("{vault://aws/a%2Fb}", R("aws", "a/b")),
    ("{vault://aws/a%2fb/c%2F}", R("aws", "a/b", "c/")),
    ("{vault://aws/a%252Fb/c}", R("aws", "a/b", "c")),
    ("{vault://env/a+b}", R("env", "a b")),
    ("{vault://env/a%2Bb}", R("env", "a b")),
    ("{vault://env/a%252Bb}", R("env", "a+b")),
    ("{vault://env/100%2525}", R("env", "100%")),
    ("{vault://env/%C3%A9}", R("env", "é")),
    ("{vault://env/%25C3%25A9}", R("env", "é")),
    ("{vault://env/%C3%25A9}", R("env", "é")),
    ("{vault://env/%zz%4}", R("env", "%zz%4")),
    ("{vault://env/%FF}", R("env", "\ufffd")),
    # version: the fragment, decimal digits only
    ("{vault://env/foo#1}", R("env", "foo", None, 1)),
    ("{vault://env/foo#007}", R("env", "foo", None, 7)),
    ("{vault://env/foo/bar#0}", R("env", "foo", "bar", 0)),
    ("{vault://env/foo?a=b#12}", R("env", "foo", None, 12, {"a": "b"})),
    # query: per-reference config
    ("{vault://env/foo?a=b}", R("env", "foo", config={"a": "b"})),
    ("{vault://env/foo?a}", R("env", "foo", config={"a": True})),
    ("{vault://env/foo?a=}", R("env", "foo", config={"a": ""})),
    ("{vault://env/foo?a=1&a=2&a}", R("env", "foo", config={"a": ["1", "2", True]})),
    ("{vault://env/foo?a=1&b=2}", R("env", "foo", config={"a": "1", "b": "2"})),
    ("{vault://env/foo?a=1&%61=2}", R("env", "foo", config={"a": ["1", "2"]})),
    ("{vault://env/foo?a=b=c}", R("env", "foo", config={"a": "b=c"})),
    ("{vault://env/foo?a=b?c}", R("env", "foo", config={"a": "b?c"})),
    ("{vault://env/foo?ttl=60}", R("env", "foo", config={"ttl": "60"})),
    ("{vault://env/foo?a%20b=c%2Bd+e%26}", R("env", "foo", config={"a b": "c+d e&"})),
    ("{vault://env/foo?=v}", R("env", "foo")),
    ("{vault://env/foo?=v&b=1}", R("env", "foo", config={"b": "1"})),
    ("{vault://env/foo?a&&b}", R("env", "foo", config={"a": True, "b": True})),
    ("{vault://env/foo?}", R("env", "foo")),
    ("{vault://env/foo?&}", R("env", "foo")),
    ("{vault://env/foo/?a}", R("env", "foo", config={"a": True})),
]

INVALID: list[tuple[str, str]] = [
    # not a reference: exact prefix and suffix, case-sensitive, no trimming
    ("", "not a reference []"),
    ("foo", "not a reference [foo]"),
    (" {vault://env/foo}", "not a reference [ {vault://env/foo}]"),
    ("{vault://env/foo} ", "not a reference [{vault://env/foo} ]"),
    ("{vault://env/foo}\n", "not a reference [{vault://env/foo}\n]"),
    ("{VAULT://env/foo}", "not a reference [{VAULT://env/foo}]"),
    ("{Vault://env/foo}", "not a reference [{Vault://env/foo}]"),
    ("{vault:/env/foo}", "not a reference [{vault:/env/foo}]"),
    ("{vault//env/foo}", "not a reference [{vault//env/foo}]"),
    ("vault://env/foo", "not a reference [vault://env/foo]"),
    ("{vault://env/foo", "not a reference [{vault://env/foo]"),
    ("{vault://", "not a reference [{vault://]"),
    ("{env://env/foo}", "not a reference [{env://env/foo}]"),
    # missing host
    ("{vault://}", "reference url is missing host [{vault://}]"),
    ("{vault:///foo}", "reference url is missing host [{vault:///foo}]"),
    ("{vault://user@/foo}", "reference url is missing host [{vault://user@/foo}]"),
    ("{vault://:8200/foo}", "reference url is missing host [{vault://:8200/foo}]"),
    ("{vault://u@:1/foo}", "reference url is missing host [{vault://u@:1/foo}]"),
    ("{vault://?a/foo}", "reference url is missing host [{vault://?a/foo}]"),
    ("{vault://#1/foo}", "reference url is missing host [{vault://#1/foo}]"),
    # missing path
    ("{vault://env}", "reference url is missing path [{vault://env}]"),
    ("{vault://env?x=1}", "reference url is missing path [{vault://env?x=1}]"),
    ("{vault://env#1}", "reference url is missing path [{vault://env#1}]"),
    ("{vault://env;x}", "reference url is missing path [{vault://env;x}]"),
    ("{vault://env?x/foo}", "reference url is missing path [{vault://env?x/foo}]"),
    ("{vault://env#1/foo}", "reference url is missing path [{vault://env#1/foo}]"),
    # empty path (checked before the version, as Kong does)
    ("{vault://env/}", "reference url has empty path [{vault://env/}]"),
    ("{vault://env/?x=1}", "reference url has empty path [{vault://env/?x=1}]"),
    ("{vault://env/;p}", "reference url has empty path [{vault://env/;p}]"),
    ("{vault://env/#1}", "reference url has empty path [{vault://env/#1}]"),
    ("{vault://env/#x}", "reference url has empty path [{vault://env/#x}]"),
    # invalid path: only slashes
    ("{vault://env//}", "reference url has invalid path [{vault://env//}]"),
    ("{vault://env/////}", "reference url has invalid path [{vault://env/////}]"),
    ("{vault://env//;x/a}", "reference url has invalid path [{vault://env//;x/a}]"),
    ("{vault://env//?a=1}", "reference url has invalid path [{vault://env//?a=1}]"),
    # invalid version (checked before the only-slashes path, as Kong does)
    ("{vault://env//#x}", "reference url has invalid version [{vault://env//#x}]"),
    ("{vault://env/foo#}", "reference url has invalid version [{vault://env/foo#}]"),
    ("{vault://env/foo#x}", "reference url has invalid version [{vault://env/foo#x}]"),
    ("{vault://env/foo#1?x=y}", "reference url has invalid version [{vault://env/foo#1?x=y}]"),
    ("{vault://env/foo#1.5}", "reference url has invalid version [{vault://env/foo#1.5}]"),
    ("{vault://env/foo#0x10}", "reference url has invalid version [{vault://env/foo#0x10}]"),
    ("{vault://env/foo#inf}", "reference url has invalid version [{vault://env/foo#inf}]"),
    ("{vault://env/foo#nan}", "reference url has invalid version [{vault://env/foo#nan}]"),
    ("{vault://env/foo#1e3}", "reference url has invalid version [{vault://env/foo#1e3}]"),
    ("{vault://env/foo#-1}", "reference url has invalid version [{vault://env/foo#-1}]"),
    ("{vault://env/foo#+1}", "reference url has invalid version [{vault://env/foo#+1}]"),
    ("{vault://env/foo# 1}", "reference url has invalid version [{vault://env/foo# 1}]"),
    ("{vault://env/foo#1 }", "reference url has invalid version [{vault://env/foo#1 }]"),
    ("{vault://env/foo#1_0}", "reference url has invalid version [{vault://env/foo#1_0}]"),
    ("{vault://env/foo#\u0661}", "reference url has invalid version [{vault://env/foo#\u0661}]"),
    ("{vault://env/foo#1#2}", "reference url has invalid version [{vault://env/foo#1#2}]"),
    ("{vault://env/foo#%31}", "reference url has invalid version [{vault://env/foo#%31}]"),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_parse_valid(text: str, expected: Reference) -> None:
    """A valid reference parses to exactly the expected name, id, key, version and config."""
    assert parse(text) == expected


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_parse_invalid(text: str, message: str) -> None:
    """An invalid reference raises InvalidReference with Kong's message and the input."""
    with pytest.raises(InvalidReference) as caught:
        parse(text)
    assert str(caught.value) == message
    assert caught.value.message == message


def test_parse_huge_version_is_invalid() -> None:
    """A version with more digits than int() converts is an invalid version, not a crash."""
    text = "{vault://env/foo#" + "9" * 5000 + "}"
    with pytest.raises(InvalidReference, match=r"^reference url has invalid version \["):
        parse(text)


def test_parse_non_str_is_not_a_reference() -> None:
    """A value that is not a string is rejected as not a reference."""
    with pytest.raises(InvalidReference, match=r"^not a reference \[None\]$"):
        parse(None)  # type: ignore[arg-type]


def test_invalid_reference_is_api_error() -> None:
    """The re-exported error is the API's invalid_reference (HTTP 400) and a ValueError."""
    err = InvalidReference("x")
    assert isinstance(err, SidecarError)
    assert isinstance(err, ValueError)
    assert (err.code, err.status) == ("invalid_reference", 400)


def test_reference_is_frozen() -> None:
    """A parsed reference cannot be modified after parsing."""
    ref = parse("{vault://env/foo}")
    with pytest.raises(AttributeError):
        ref.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{vault://env/foo}", True),
        ("{vault://}", True),
        ("{vault://env}", True),
        ("{vault://env/foo#x}", True),
        ("", False),
        ("foo", False),
        ("{vault://", False),
        ("{vault:/env/foo}", False),
        ("{VAULT://env/foo}", False),
        (" {vault://env/foo}", False),
        ("{vault://env/foo} ", False),
        ("vault://env/foo", False),
    ],
)
def test_is_reference(text: str, expected: bool) -> None:
    """Only text starting with exactly '{vault://' and ending with '}' has the reference shape."""
    assert is_reference(text) is expected


def test_is_reference_non_str() -> None:
    """A value that is not a string is not a reference, and asking does not raise."""
    assert is_reference(None) is False  # type: ignore[arg-type]
    assert is_reference(b"{vault://env/foo}") is False  # type: ignore[arg-type]


def _check_total(text: str) -> None:
    assert isinstance(is_reference(text), bool)
    try:
        ref = parse(text)
    except InvalidReference:
        return
    assert is_reference(text)
    assert ref.name
    assert ref.resource


URLISH = st.text(st.sampled_from("/?#;@:[]%+=&25Fa0 é") | st.characters())
ANY_CHAR = st.text(st.characters(exclude_categories=()))


@given(st.text())
def test_parse_any_text_raises_only_invalid_reference(text: str) -> None:
    """For any text, parse raises nothing but InvalidReference and is_reference never raises."""
    _check_total(text)


@given(st.text() | URLISH | ANY_CHAR)
def test_parse_any_braced_text_raises_only_invalid_reference(body: str) -> None:
    """For '{vault://' + any text + '}', parse raises nothing but InvalidReference."""
    _check_total("{vault://" + body + "}")


WORD = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
CONFIG = st.dictionaries(WORD, WORD | st.just(True), min_size=1, max_size=3)


@given(
    name=WORD,
    path=st.lists(WORD, min_size=1, max_size=4),
    key=st.none() | WORD,
    version=st.none() | st.integers(min_value=0, max_value=10**12),
    config=st.none() | CONFIG,
)
def test_round_trip(
    name: str,
    path: list[str],
    key: str | None,
    version: int | None,
    config: dict[str, str | bool] | None,
) -> None:
    """A reference built from simple parts parses back to the same parts."""
    text = "{vault://" + name + "/" + "/".join(path) + ("/" + key if key else "/")
    if config:
        text += "?" + "&".join(k if v is True else f"{k}={v}" for k, v in config.items())
    if version is not None:
        text += f"#{version}"
    text += "}"
    expected = Reference(name, "/".join(path), key, version, dict(config) if config else None)
    assert parse(text) == expected


@given(resource=st.text(min_size=1), key=st.text(min_size=1))
def test_round_trip_double_quoted(resource: str, key: str) -> None:
    """Any id and key, quoted twice, survive Kong's two decodes, even with '/', '?', '#', '+'."""

    def twice(part: str) -> str:
        return quote(quote(part, safe=""), safe="")

    assert parse("{vault://env/" + twice(resource) + "/" + twice(key) + "}") == Reference(
        "env", resource, key
    )
