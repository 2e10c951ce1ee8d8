"""Webhooks: outbound deliveries signed per Standard Webhooks, and inbound provider callbacks.

- `signing`: `whsec_` secrets and the three `webhook-*` headers (two signatures during a rotation).
- `schedule`: the retry schedule (with jitter and a time scale) and `Retry-After`.
- `store`: delivery records, their attempts and disabled endpoints (the DB is the system of record).
- `scheduler`: the Redis sorted set of due deliveries, claimed with a lease.
- `outbox`: turns a job's terminal state into one delivery (a `JobEventSink`).
- `delivery`: the loop that sends due deliveries (runs inside the Dispatcher replica).
- `urlpolicy`: which receiver URLs are allowed (delegates to `serving.netguard`).
- `inbound`: verification of provider callbacks (signed, or a per-job secret in the URL).
"""
