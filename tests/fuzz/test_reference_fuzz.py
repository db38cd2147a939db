"""The reference parser under fuzzing, in process (design.md section 1).

Beyond tests/unit/test_reference.py (any text raises only InvalidReference; simple
parts round-trip): the message of every refusal is one of Kong's and ends with the
input in brackets; ``is_reference`` is exactly the prefix/suffix rule; inputs with lone
surrogates, NUL and hundreds of kilobytes; references built from arbitrary parts with
userinfo, ports, IPv6 brackets, empty segments, ``;params``, each segment encoded in
any of the ways Kong decodes back, queries with repeated and bare keys; and mutations
of valid references.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.reference import ConfigValue, InvalidReference, Reference, is_reference, parse
from tests.fuzz import budget
from tests.fuzz.oracle import count

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(120)]

PREFIX, SUFFIX = "{vault://", "}"
KONG_REASONS = frozenset(
    {
        "reference url is missing host",
        "reference url is missing path",
        "reference url has empty path",
        "reference url has invalid path",
        "reference url has invalid version",
    }
)
SPECIALS = "/?#;@:[]%+=&{}\x00 \t\n\u00e9\ud800"
ALL_CHARS = st.characters(exclude_categories=())  # lone surrogates included
HUGE = [
    PREFIX + "a" * 1_000_000 + SUFFIX,
    PREFIX + "env/" + "%" * 200_000 + SUFFIX,
    PREFIX + "env/" + "%25" * 100_000 + SUFFIX,
    PREFIX + "env/" + "/" * 200_000 + SUFFIX,
    PREFIX + "env/a/" + "b/" * 100_000 + SUFFIX,
    PREFIX + "env/a?" + "&k" * 100_000 + SUFFIX,
    PREFIX + "env/a#" + "9" * 5000 + SUFFIX,
    PREFIX + "env/a#" + "0" * 100_000 + "1" + SUFFIX,
    PREFIX + "\ud800" * 100_000 + "/x" + SUFFIX,
    PREFIX + "env/" + "\x00" * 100_000 + SUFFIX,
    "\x00" * 100_000,
    PREFIX * 50_000,
    SUFFIX * 100_000,
]


def check_total(text: str) -> Reference | None:
    """Whatever the text: a Reference, or InvalidReference with Kong's message."""
    shape = text.startswith(PREFIX) and text.endswith(SUFFIX)
    assert is_reference(text) is shape
    refused: InvalidReference | None = None
    try:
        ref = parse(text)
    except InvalidReference as exc:  # anything else propagates and fails the test
        refused = exc
    if refused is not None:
        assert isinstance(refused, ValueError)
        message = str(refused)
        assert refused.message == message
        assert message.endswith(f" [{text}]"), message[-200:]
        reason = message[: -len(text) - 3]
        assert reason == "not a reference" if not shape else reason in KONG_REASONS, reason
        return None
    assert shape
    assert isinstance(ref.name, str)
    assert ref.name
    assert isinstance(ref.resource, str)
    assert ref.resource
    assert ref.key is None or (isinstance(ref.key, str) and ref.key)
    assert ref.version is None or (isinstance(ref.version, int) and ref.version >= 0)
    if ref.config is not None:
        assert ref.config
        for key, value in ref.config.items():
            assert isinstance(key, str)
            assert key
            assert isinstance(value, (str, bool, list))
    assert parse(text) == ref  # deterministic
    return ref


texts = st.one_of(
    st.text(ALL_CHARS),
    st.text(SPECIALS + "vaultenv"),
    st.builds(lambda body: PREFIX + body + SUFFIX, st.text(ALL_CHARS)),
    st.builds(lambda body: PREFIX + body + SUFFIX, st.text(SPECIALS + "aenv0129")),
    st.builds(lambda a, b: a + PREFIX + b, st.text(SPECIALS, max_size=3), st.text(SPECIALS)),
    st.sampled_from(HUGE),
)


@settings(budget.FUZZ, max_examples=budget.PARSER_ANY_TEXT)
@given(text=texts)
def test_any_text_parses_or_raises_kong_message(text: str) -> None:
    """Any str, lone surrogates, NUL and huge inputs included, parses to a sane
    Reference or raises InvalidReference (a ValueError) with one of Kong's messages
    ending in ``[<input>]``; ``is_reference`` is exactly the prefix/suffix rule."""
    count("parser: any text")
    check_total(text)


# --- references built from parts -----------------------------------------------------

# Encodable as UTF-8, so no lone surrogates: those cannot round-trip (they decode to U+FFFD).
NAME_CHARS = st.characters(codec="utf-8", exclude_characters="/?#@:[]")
BRACKETED_CHARS = st.characters(codec="utf-8", exclude_characters="/?#@[]")
USER_CHARS = st.characters(codec="utf-8", exclude_characters="/?#@")
SEGMENT_CHARS = st.characters(codec="utf-8")
QUERY_KEYS = st.sampled_from(["ttl", "a", "base64_decode"]) | st.text(SEGMENT_CHARS, min_size=1)
QUERY_VALUES = st.none() | st.text(SEGMENT_CHARS, max_size=12)
RAW_UNSAFE = set("/?#;%+")


@dataclass(frozen=True)
class Built:
    text: str
    expected: Reference


def every_byte(text: str, lower: bool) -> str:
    """Percent-encode every byte, in upper- or lower-case hex."""
    encoded = "".join(f"%{b:02X}" for b in text.encode())
    return encoded.lower() if lower else encoded


def encode_segment(text: str, choice: int) -> str:
    """One path segment written so that Kong's two decodes give ``text`` back."""
    ways = ["twice", "every-byte-twice"]
    if not set(text) & {"%", "+"}:
        ways += ["once", "every-byte"]  # a single decode is exact only without % and +
    if not set(text) & RAW_UNSAFE:
        ways.append("raw")
    way, lower = ways[choice % len(ways)], choice >= 8
    if way == "twice":
        return quote(quote(text, safe=""), safe="")
    if way == "every-byte-twice":
        return quote(every_byte(text, lower), safe="")
    if way == "once":
        return quote(text, safe="")
    if way == "every-byte":
        return every_byte(text, lower)
    return text


def expected_config(drawn: dict[str, list[str | None]]) -> dict[str, ConfigValue] | None:
    """What Kong reads from the drawn query, stated per key: a bare key is true, one value is
    itself, repeated values are a list in order (the parser merges pairs; this does not)."""
    config: dict[str, ConfigValue] = {}
    for field, values in drawn.items():
        read: list[str | bool] = [True if value is None else value for value in values]
        config[field] = read[0] if len(read) == 1 else read
    return config or None


class Knobs:
    """The small choices of a built reference, taken bit by bit from one drawn integer
    (each Hypothesis draw costs more than the parse under test)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def take(self, bits: int) -> int:
        taken = self.value & ((1 << bits) - 1)
        self.value >>= bits
        return taken


KNOBS = st.integers(0, 2**80 - 1)
NAMES = st.text(NAME_CHARS, min_size=1, max_size=10)
BRACKETED_NAMES = st.text(BRACKETED_CHARS, min_size=1, max_size=10)  # IPv6-like: ":" too
USERS = st.text(USER_CHARS, max_size=8)
SEGMENT_TEXTS = st.lists(st.text(SEGMENT_CHARS, min_size=1, max_size=12), min_size=1, max_size=4)
PARAMS = st.text(st.characters(exclude_characters="?#"), max_size=8)
QUERIES = st.dictionaries(QUERY_KEYS, st.lists(QUERY_VALUES, min_size=1, max_size=3), max_size=4)


@st.composite
def built_references(draw: st.DrawFn) -> Built:
    """A valid reference and the Reference Kong reads from it."""
    knobs = Knobs(draw(KNOBS))
    # authority: [user@]name or [user@][name], then :port (Kong keeps only the name)
    bracketed = knobs.take(1)
    name = draw(BRACKETED_NAMES if bracketed else NAMES)
    authority = f"[{name}]" if bracketed else name
    port = knobs.take(2)
    if port:
        authority += ":" + ("" if port == 1 else str(knobs.take(17)))
    if knobs.take(1):
        authority = draw(USERS) + "@" + authority
    # path: segments, maybe extra slashes, maybe a trailing slash, maybe ;params
    texts = draw(SEGMENT_TEXTS)
    path = ""
    for text in texts:
        path += "//" if knobs.take(2) == 0 else "/"
        path += encode_segment(text, knobs.take(4))
    trailing = knobs.take(2) >= 2
    if trailing:
        path += "/" * knobs.take(1) + "/"
    if knobs.take(2) == 0:
        path += ";" + draw(PARAMS)
    text = PREFIX + authority + path
    # query: quote or quote_plus per pair, and pairs Kong drops ("", "=v")
    drawn = draw(QUERIES)
    parts = []
    for field, value in ((field, value) for field, values in drawn.items() for value in values):
        encode = quote_plus if knobs.take(1) else quote
        parts.append(
            encode(field, safe="") + ("" if value is None else "=" + encode(value, safe=""))
        )
        if knobs.take(2) == 0:
            parts.append("=ignored" if knobs.take(1) else "")
    if parts or knobs.take(1):
        text += "?" + "&".join(parts)
    # version: decimal, maybe with leading zeros
    version = knobs.take(40) if knobs.take(1) else None
    if version is not None:
        text += "#" + "0" * knobs.take(2) + str(version)
    decoded = list(texts)
    key = decoded.pop() if len(decoded) > 1 and not trailing else None
    expected = Reference(name, "/".join(decoded), key, version, expected_config(drawn))
    return Built(text + SUFFIX, expected)


@settings(budget.FUZZ, max_examples=budget.PARSER_ROUND_TRIP)
@given(built=built_references())
def test_built_references_parse_back_to_their_parts(built: Built) -> None:
    """A reference built from any name (with userinfo, port, IPv6 brackets), any
    segments (encoded so Kong's two decodes give them back, split by extra slashes,
    ``;params`` after), a trailing slash or not, any query and version parses back to
    exactly the parts it was built from."""
    count("parser: built references")
    assert parse(built.text) == built.expected
    assert check_total(built.text) == built.expected


# --- mutations -------------------------------------------------------------------------

INSERTED = SPECIALS + "vault:/env\ud800\udfff\U0001f600"


def mutate(text: str, program: bytes) -> str:
    """Each 4 bytes of ``program``: an operation, a position (two bytes), a character."""
    for i in range(0, len(program) - 3, 4):
        operation, high, low, pick = program[i : i + 4]
        at, char = (high << 8 | low) % (len(text) + 1), INSERTED[pick % len(INSERTED)]
        if operation % 4 == 0:
            text = text[:at] + char + text[at:]
        elif operation % 4 == 1:
            text = text[:at] + text[at + 1 :]
        elif operation % 4 == 2:
            text = text[:at] + char + text[at + 1 :]
        else:
            text = text[:at] + text[at : at + 8] + text[at:]
    return text


@settings(budget.FUZZ, max_examples=budget.PARSER_MUTATIONS)
@given(built=built_references(), program=st.binary(min_size=4, max_size=16))
def test_mutated_references_parse_or_raise_kong_message(built: Built, program: bytes) -> None:
    """A valid reference with characters inserted, deleted, replaced or duplicated
    still parses to a sane Reference or raises InvalidReference with Kong's message."""
    count("parser: mutated references")
    check_total(mutate(built.text, program))


NOT_STR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(),
    st.builds(lambda b: PREFIX.encode() + b + SUFFIX.encode(), st.binary()),
    st.lists(st.text(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)


@settings(budget.FUZZ, max_examples=budget.PARSER_NOT_STR)
@given(value=NOT_STR)
def test_non_str_is_not_a_reference(value: object) -> None:
    """A value that is not a str (bytes of a reference included) is not a reference:
    ``is_reference`` says False and ``parse`` raises InvalidReference, nothing else."""
    count("parser: not a str")
    assert is_reference(value) is False  # type: ignore[arg-type]
    with pytest.raises(InvalidReference, match=r"^not a reference \["):
        parse(value)  # type: ignore[arg-type]
