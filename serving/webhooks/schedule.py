"""When to try a delivery again: the fixed schedule, jitter, a time scale and `Retry-After`."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
from dataclasses import dataclass, field
from typing import Final

# Seconds before each attempt: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (eight in
# all, about 28 hours), the schedule Standard Webhooks senders use.
RETRY_SCHEDULE_S: Final = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
# A receiver may ask for a later retry, but not for one beyond the longest step we would wait.
MAX_RETRY_AFTER_S: Final = max(RETRY_SCHEDULE_S)


@dataclass
class RetryPolicy:
    """`time_scale` multiplies every wait (1.0 in production, 0.001 makes tests run in ms);
    `jitter` spreads each retry by up to that fraction either way so failed receivers are not
    hit by every sender at the same instant."""

    time_scale: float = 1.0
    jitter: float = 0.1
    schedule: tuple[float, ...] = RETRY_SCHEDULE_S
    rng: random.Random = field(default_factory=random.Random)

    @property
    def max_attempts(self) -> int:
        return len(self.schedule)

    def delay_before(self, attempt_index: int, retry_after_s: float | None = None) -> float | None:
        """Seconds to wait before attempt `attempt_index` (0 = the first), None once the
        schedule is exhausted. `retry_after_s` (the receiver's `Retry-After`) is a lower bound."""
        if attempt_index >= len(self.schedule):
            return None
        base = self.schedule[attempt_index]
        if base > 0 and self.jitter > 0:
            base *= 1 + self.rng.uniform(-self.jitter, self.jitter)
        if retry_after_s is not None:
            base = max(base, min(retry_after_s, MAX_RETRY_AFTER_S))
        return base * self.time_scale


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    now = now or dt.datetime.now(dt.timezone.utc)
    return max(0.0, (when - now).total_seconds())
