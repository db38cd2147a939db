"""Who read what: the audit trail, at a cost that does not grow with cached reads.

A log line per read would be most of what a cached read costs (two JSON lines and a
write per request). What an auditor needs survives without it: every denial and
error at once, each peer's first read of a reference at once, and then one event per
(peer, reference, outcome) per ``log.audit_interval`` with the number of reads.
Events name the reference and the peer (uid, gid, pid), never a value.
"""

from __future__ import annotations

import time

from sidecar.access import Peer
from sidecar.logging import get_logger

log = get_logger("sidecar.audit")

SERVED = frozenset({"hit", "miss", "stale"})  # outcomes that are counted, not logged each
MAX_KEYS = 100_000  # distinct (peer, reference, outcome) counted before an early flush

Key = tuple[int | None, int | None, int | None, str, str | None, str]


class AuditTrail:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._counts: dict[Key, int] = {}
        self._seen: set[tuple[int | None, int | None, int | None, str]] = set()
        self._since = time.monotonic()

    def record(self, peer: Peer, ref: str, vault: str | None, outcome: str) -> None:
        """One read; ``ref`` is what may be shown (the caller cuts unbound queries off)."""
        if outcome not in SERVED:
            self._log((peer.uid, peer.gid, peer.pid, ref, vault, outcome), 1)
            return
        first = (peer.uid, peer.gid, peer.pid, ref)
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
        uid, gid, pid, ref, vault, outcome = key
        log.info("secret.read", ref=ref, vault=vault, uid=uid, gid=gid, pid=pid,
                 outcome=outcome, count=count, interval_seconds=window)  # fmt: skip
