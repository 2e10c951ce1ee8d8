"""The operator's glance (`GET /api/v1/admin/overview`): the numbers `/metrics` exports from
Redis (queue gauges, worker metrics), read the same way and summarised as JSON, plus this
month's spend from the jobs table."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric

from serving.ingress.schemas import AdminOverview, GeneratorReplicas

GENERATOR_DEPLOYMENT = "Generator"
TERMINAL = ("completed", "error", "canceled")


def _samples(families: Iterable[Metric], name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named `name` (a counter's samples carry `_total`)."""
    return [(s.labels, s.value) for family in families for s in family.samples if s.name == name]


def summarise(families: list[Metric], month_to_date_usd: float) -> AdminOverview:
    """An overview from the families `serving.observability.exporter.shared_families` reads."""
    up = [value for _, value in _samples(families, "svd_metrics_redis_up")]
    depth = {labels["priority"]: int(v) for labels, v in _samples(families, "svd_queue_depth_jobs")}
    oldest = {
        labels["priority"]: round(v, 3) for labels, v in _samples(families, "svd_queue_oldest_job_age_seconds")
    }
    states = {labels["state"]: int(v) for labels, v in _samples(families, "svd_queue_jobs")}

    def generators(name: str) -> int | None:
        values = [v for labels, v in _samples(families, name) if labels.get("deployment") == GENERATOR_DEPLOYMENT]
        return int(values[0]) if values else None

    breakers: dict[str, bool] = {}
    for labels, value in _samples(families, "svd_provider_breaker_open"):
        # One gauge per Dispatcher replica is summed into one series per provider: open if any is.
        breakers[labels["provider"]] = breakers.get(labels["provider"], False) or value > 0
    finished: dict[str, int] = dict.fromkeys(TERMINAL, 0)
    for labels, value in _samples(families, "svd_jobs_finished_total"):
        if labels["status"] in finished:
            finished[labels["status"]] += int(value)
    total = sum(finished.values())
    return AdminOverview(
        queue_depth=depth,
        oldest_wait_s=oldest,
        queue_states=states,
        generators=GeneratorReplicas(wanted=generators("svd_serve_replicas_wanted"),
                                     running=generators("svd_serve_replicas_running")),
        breakers_open=breakers,
        jobs_finished=finished,
        error_rate=round(finished["error"] / total, 4) if total else None,
        month_to_date_usd=round(month_to_date_usd, 6),
        metrics_available=bool(up and up[0] == 1.0),
    )
