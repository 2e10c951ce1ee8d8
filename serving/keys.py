"""Every Redis key svd-serve writes, in one place. All start with the configured prefix.

- `{prefix}:job:{id}:progress`  hash {step, steps, progress, stage}; written by the Generator
  while it denoises, read by the status endpoint; expires a day after the last write.
- `{prefix}:job:{id}:cancel`    "1" once a cancel was requested; checked every denoising step.
- `{prefix}:job:{id}:events`    stream of the job's live events (SSE/WebSocket), fields {type, data};
  capped in length, expires `events_ttl_s` after the last event (`serving.events`).
- `{prefix}:webhooks:due`       zset of outbound webhook delivery ids, score = when the next attempt
  is due (ms); a claimed delivery's score is pushed out by a lease (`serving.webhooks.scheduler`).
- `{prefix}:inbound:{provider}:{delivery id}`  "1" for a provider webhook already processed (SET NX).
- `{prefix}:job:{id}:provider_wake`  list: a verified provider callback for the job pushes one
  entry; the Dispatcher polling that provider pops it to poll at once (`serving.providers.callbacks`).
- `{prefix}:ratelimit:{key id}`  hash {tokens, ts}: the request token bucket of one API key
  (`serving.security.rate_limits`); expires once the bucket would be full again.
- `{prefix}:authfail:{client address}`  hash {tokens, ts}: the bucket of failed authentications
  from one address (`serving.security.rate_limits.AuthFailures`); expires once full again.
- `{prefix}:quota:{owner}:jobs:{YYYYMMDD}`  jobs accepted for the owner that UTC day; expires
  two days later (`serving.security.quotas`).
- `{prefix}:idem:{owner}:{sha256(key)}`  "1" while a request with that Idempotency-Key is being
  accepted (`serving.ingress.idempotency`); deleted when it ends, expires after 2 min regardless.
- `{prefix}:drain:{queue}`  hash {ts -> jobs finished}: per-second completion counts of the queue,
  the measured drain rate behind Retry-After and start estimates (`serving.backpressure`).
- `{prefix}:metrics:{metric name}`  hash {sample suffix + label values -> number}: worker-side
  Prometheus metrics aggregated across replicas (HINCRBYFLOAT), exported once by
  `svd-serve exporter` (`serving.metrics`); gauge hashes expire when no replica refreshes them.
- `{prefix}:metrics:{metric name}:ts`  hash {gauge field -> epoch s}: when each gauge label set was
  last written; the reader drops stale ones (a gone node's GPU gauges).
- BullMQ keeps its own keys under `bull:{queue_name}:*` (its format, readable by Node tooling).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PROGRESS_TTL_S = 24 * 3600
CANCEL_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Keys:
    prefix: str = "svd"

    def progress(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:progress"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:cancel"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def provider_wake(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:provider_wake"

    def webhooks_due(self) -> str:
        return f"{self.prefix}:webhooks:due"

    def inbound_webhook(self, provider: str, delivery_id: str) -> str:
        return f"{self.prefix}:inbound:{provider}:{delivery_id}"

    def rate_bucket(self, key_id: str) -> str:
        return f"{self.prefix}:ratelimit:{key_id}"

    def auth_failures(self, address: str) -> str:
        return f"{self.prefix}:authfail:{address}"

    def jobs_per_day(self, owner_id: str, day: str) -> str:
        return f"{self.prefix}:quota:{owner_id}:jobs:{day}"

    def budget_lock(self, owner_id: str) -> str:
        return f"{self.prefix}:budget:{owner_id}"

    def budget_alert(self, owner_id: str, month: str, level: str) -> str:
        """Set once the `budget.threshold` webhook of one owner, month and level was sent."""
        return f"{self.prefix}:budget-alert:{month}:{level}:{owner_id}"

    def idempotency_lock(self, owner_id: str, key: str) -> str:
        # Hashed: the key is client text of up to 255 characters.
        return f"{self.prefix}:idem:{owner_id}:{hashlib.sha256(key.encode()).hexdigest()}"

    def drain_rate(self, queue_name: str) -> str:
        return f"{self.prefix}:drain:{queue_name}"

    def metric(self, name: str) -> str:
        return f"{self.prefix}:metrics:{name}"

    def metric_stamps(self, name: str) -> str:
        return f"{self.prefix}:metrics:{name}:ts"
