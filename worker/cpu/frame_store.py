"""Where the reusable objects of a job live (frames, still images, ETag records) and which stored
ones a job may still pick up, so that the sweeper never deletes an object under a running job.

Scope: unless ``share_frames_across_tenants`` is on, each tenant's objects live under a prefix of
its own. Shared content keys would let a tenant learn from a result's timings that someone else
already sent the same bytes.

Periods: content keys carry the retention period they were written in (a quarter of the
retention long), so an object is only ever written while it is young. A job reuses an object of
this period or the last one, and only while it is at most half the retention old; the settings
make a task's time limit at most a quarter of the retention. What a job picked is therefore
younger than the retention until its record names it (from then on the sweeper keeps it because
the job is live), and the sweeper, which deletes only objects older than the retention, never
deletes one that a running ingest is writing or has just chosen. docs/retention.md has the rest.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from common.settings import Settings
from common.storage import ObjectStore

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
TENANTS_PREFIX = "tenants/"


def tenant_scope(tenant: str) -> str:
    """The key prefix of a tenant's own objects; names that are not plain become a hash."""
    if _PLAIN_NAME.fullmatch(tenant):
        return f"{TENANTS_PREFIX}{tenant}/"
    # "~" is outside plain names, so a hashed scope never meets a tenant's own.
    return f"{TENANTS_PREFIX}~{hashlib.sha256(tenant.encode()).hexdigest()[:32]}/"


@dataclass(frozen=True)
class ContentKeys:
    """The keys one ingest writes and looks up, fixed when it starts."""

    scope: str
    retention_s: float
    now: float

    @classmethod
    def for_job(cls, tenant: str, settings: Settings, now: float | None = None) -> ContentKeys:
        return cls(
            scope="" if settings.share_frames_across_tenants else tenant_scope(tenant),
            retention_s=float(settings.storage_retention_s),
            now=time.time() if now is None else now,
        )

    @classmethod
    def shared(cls, retention_s: float, now: float | None = None) -> ContentKeys:
        return cls(scope="", retention_s=retention_s, now=time.time() if now is None else now)

    @property
    def period(self) -> int:
        return int(self.now // (self.retention_s / 4))

    def candidates(self, key_of_period: Callable[[int], str]) -> list[str]:
        """Where to look for a stored object: this period's key, then the last one's."""
        return [key_of_period(self.period), key_of_period(self.period - 1)]

    def reusable(self, store: ObjectStore, keys: Iterable[str]) -> str | None:
        """The first of ``keys`` stored and young enough to be picked up."""
        for key in keys:
            modified = store.modified(key)
            if modified is not None and self.now - modified <= self.retention_s / 2:
                return key
        return None
