"""What ``/v1/status`` and the gauges show per vault: counts, ages, schedule, last error.

Never a value: only how many entries are fresh, stale or failed, how old the oldest
is, when the newest was fetched and the next refresh is due, and the last error.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sidecar.cache import Cache
from sidecar.schedule import NEVER
from sidecar.vaults import VaultRegistry


def vault_status(vaults: VaultRegistry, cache: Cache) -> dict[str, Any]:
    """Per-vault counts, ages and schedule for ``/v1/status`` and the gauges; never values.

    ``last_refresh_at`` is the wall-clock time of the vault's newest successful fetch
    (``last_refresh_age_seconds`` the same as an age), so an operator sees a vault
    whose refreshes stopped landing.
    """
    now = cache.clock()
    rows: dict[str, dict[str, Any]] = {
        v.prefix: {"backend": v.backend_name, "started": v.started, "entries": 0,
                   "fresh": 0, "stale": 0, "failed": 0, "oldest_age_seconds": None,
                   "last_refresh_at": None, "last_refresh_age_seconds": None,
                   "next_refresh_in_seconds": None, "last_error": None}
        for v in vaults
    }  # fmt: skip
    newest: dict[str, float] = {}
    for key, entry in cache.items():
        row = rows.get(key.vault)
        if row is None:
            continue
        row["entries"] += 1
        row[entry.health.value] += 1
        if entry.fetched is not None:
            age = round(now - entry.fetched_at, 3)
            row["oldest_age_seconds"] = max(row["oldest_age_seconds"] or 0.0, age)
            newest[key.vault] = max(newest.get(key.vault, -NEVER), entry.fetched_at)
        if entry.refresh_at != NEVER:
            due = round(max(entry.refresh_at - now, 0.0), 3)
            row["next_refresh_in_seconds"] = min(row["next_refresh_in_seconds"] or due, due)
        if entry.failure is not None:
            row["last_error"] = {"code": entry.failure.code, "message": entry.failure.message}
    wall = datetime.now(UTC)
    for prefix, fetched_at in newest.items():
        age = max(now - fetched_at, 0.0)
        rows[prefix]["last_refresh_age_seconds"] = round(age, 3)
        at = wall - timedelta(seconds=age)
        rows[prefix]["last_refresh_at"] = at.isoformat(timespec="milliseconds")
    summary = {"entries": len(cache), "max_entries": cache.max_entries}
    return {"cache": summary, "vaults": rows}
