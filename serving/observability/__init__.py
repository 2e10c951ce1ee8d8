"""Operations signals: queue and replica gauges, GPU probes, job metrics, optional tracing/Sentry."""
