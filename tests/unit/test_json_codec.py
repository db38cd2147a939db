"""What orjson refuses still round-trips through the stdlib; what is not JSON stays an error."""

from __future__ import annotations

import json

import pytest

from sidecar.json_codec import decode_json, encode_json


@pytest.mark.parametrize(
    "document",
    [{"refs": ["{vault://env/a}"]}, {"version": 2**70}, {"ref": "{vault://env/lone-\udc80}"}],
)
def test_encoded_is_what_the_stdlib_reads_back(document: object) -> None:
    assert json.loads(encode_json(document)) == document


@pytest.mark.parametrize(
    ("raw", "charset", "expected"),
    [
        (b'{"refs": ["a"]}', "utf-8", {"refs": ["a"]}),
        ('{"refs": ["caf\u00e9"]}'.encode("latin-1"), "latin-1", {"refs": ["caf\u00e9"]}),
    ],
)
def test_bodies_orjson_refuses_are_read_by_the_stdlib(
    raw: bytes, charset: str, expected: object
) -> None:
    assert decode_json(raw, charset) == expected


def test_nan_orjson_refuses_is_the_stdlibs_float() -> None:
    value = decode_json(b'{"n": NaN}')["n"]
    assert value != value


@pytest.mark.parametrize(
    ("raw", "charset"), [(b"{not json", "utf-8"), (b"\xff\xfe{", "utf-8"), (b"{bad", "no-such")]
)
def test_what_is_not_json_is_a_value_error(raw: bytes, charset: str) -> None:
    with pytest.raises(ValueError):
        decode_json(raw, charset)
