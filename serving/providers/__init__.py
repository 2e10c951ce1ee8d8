"""Where a job runs: the local Ray pool or a managed provider (Runway), and who decides (issue #6).

- `runway.RunwayBackend`: a `VideoBackend` on the official `runwayml` SDK (polled, outputs copied).
- `router.ProviderRouter`: per-job routing (`local|runway|auto`) with circuit breakers.
- `breaker.CircuitBreaker`, `health.LocalHealth`: the signals the router reads.
- `setup.build_providers`: what the Dispatcher builds (Runway only with an API key).
- `video.decode_video`: a provider's MP4 back to frames, for our post-processing.
"""
