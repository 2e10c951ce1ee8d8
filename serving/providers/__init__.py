"""Where a job runs: the local Ray pool or a managed provider (Runway, fal), and who decides
(issue #6, #14).

- `serving.provider_names`: provider names, defined once (`local`, `runway`, `fal`; `pika` = fal).
- `routed.RoutedBackend`: the one `VideoBackend` the runner sees: route, run, fall back,
  breaker bookkeeping, then the one post-processing stage.
- `router.ProviderRouter`: per-job routing (`local|runway|fal|auto`) with circuit breakers.
- `runway.RunwayBackend`, `fal.FalBackend`: managed providers on their official SDKs.
- `breaker.CircuitBreaker`, `health.LocalHealth`: the signals the router reads.
- `setup.build_providers`: what the Dispatcher builds (a managed provider only with its key).
- `video`: a provider's video probed (ffprobe JSON), remuxed, or decoded back to frames.
"""
