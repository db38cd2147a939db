"""The secrets and references every HTTP benchmark uses, for the daemon and the floor alike."""

from __future__ import annotations

import json
from urllib.parse import quote

JSON_SECRETS = 100  # of the secrets, how many are JSON documents read by key


def secrets_env(count: int) -> dict[str, str]:
    """Environment variables the env backend reads: plain values and JSON documents."""
    values = {f"BENCH_{i}": f"value-{i}-" + "x" * 24 for i in range(count)}
    for i in range(JSON_SECRETS):
        values[f"BENCH_JSON_{i}"] = json.dumps({"username": f"app{i}", "password": f"p-{i}"})
    return values


def plain_refs(count: int) -> list[str]:
    return [f"{{vault://env/bench-{i}}}" for i in range(count)]


def keyed_refs() -> list[str]:
    return [f"{{vault://env/bench-json-{i}/password}}" for i in range(JSON_SECRETS)]


def path(ref: str) -> str:
    return "/v1/secrets?ref=" + quote(ref, safe="")
