"""Who read what: the audit trail, at a cost that does not grow with cached reads.

A log line per read would be most of what a cached read costs (two JSON lines and a
write per request). What an auditor needs survives without it: every denial and
error at once, each peer's first read of a reference at once, and then one event per
(peer, reference, outcome) per ``log.audit_interval`` with the number of reads.
Events name the reference and the peer (uid, gid, pid; or the token's name for a
facade caller, as ``client``), never a value.
"""

from __future__ import annotations

import time

from sidecar.access import Peer
from sidecar.logging import get_logger

log = get_logger("sidecar.audit")

SERVED = frozenset({"hit", "miss", "stale"})  # outcomes that are counted, not logged each
MAX_KEYS = 100_000  # distinct (peer, reference, outcome) counted before an early flush

Who = tuple[int | None, int | None, int | None, str | None]  # uid, gid, pid, token name
Key = tuple[Who, str, str | None, str]  # who, reference, vault, outcome


class AuditTrail:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._counts: dict[Key, int] = {}
        self._seen: set[tuple[Who, str]] = set()
        self._since = time.monotonic()

    def record(self, peer: Peer, ref: str, vault: str | None, outcome: str) -> None:
        """One read; ``ref`` is what may be shown (the caller cuts unbound queries off)."""
        who = (peer.uid, peer.gid, peer.pid, peer.token)
        if outcome not in SERVED:
            self._log((who, ref, vault, outcome), 1)
            return
        first = (who, ref)
        if first not in self._seen:
            if len(self._seen) >= MAX_KEYS:
                self._seen.clear()
            self._seen.add(first)
            self._log((*first, vault, outcome), 1)
            return
        key = (*first, vault, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1
        if len(self._counts) >= MAX_KEYS:
            self.flush()

    def flush(self) -> None:
        """Log what was counted since the last flush (the daemon calls it every interval
        and when it stops)."""
        counts, self._counts = self._counts, {}
        now = time.monotonic()
        window, self._since = round(now - self._since, 3), now
        for key, count in counts.items():
            self._log(key, count, window)

    @staticmethod
    def _log(key: Key, count: int, window: float | None = None) -> None:
        (uid, gid, pid, client), ref, vault, outcome = key
        log.info("secret.read", ref=ref, vault=vault, uid=uid, gid=gid, pid=pid, client=client,
                 outcome=outcome, count=count, interval_seconds=window)  # fmt: skip
