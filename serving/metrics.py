"""Every Prometheus metric of svd-serve, in one module (names follow Prometheus conventions:
base units as suffixes, `_total` for counters).

Two kinds live here, because the processes that see an event are not the one that is scraped:

- **Ingress metrics** are ordinary prometheus-client objects in the ingress process's default
  registry (submissions, cancels, request latency).
- **Worker metrics** are observed in Ray Serve replicas (Dispatcher, Generator), whose own
  registries no scraper of the ingress can see. They are aggregated in Redis instead: one hash
  per metric (`Keys.metric`), one field per label set and sample, updated with HINCRBYFLOAT
  (counters, histogram buckets, sums, counts) or HSET (gauges). HINCRBYFLOAT is atomic, so any
  number of replicas on any number of nodes may write at once: this is the multiprocess-safe
  registry. Histogram fields hold per-bucket (not cumulative) counts; the reader accumulates
  them. Counters only ever grow (a Redis flush resets them, which Prometheus' `rate()` treats
  like a process restart). A gauge field carries its write time (`Keys.metric_stamps`): a label
  set nobody refreshed for `GAUGE_TTL_S` (a reclaimed spot node's GPU) is dropped on read, so
  writers refresh their gauges periodically.

Those Redis-held families (worker metrics and the queue gauges of
`serving.observability.queue_gauges`) are exported **once**, by `svd-serve exporter` (one
replica on Kubernetes), not by every ingress pod: a scrape of each of N ingress pods would
multiply every `sum()` by N. The ingress's `/metrics` carries its own process metrics, plus the
shared families only where it is the one process that serves them (`svd-serve up`,
`metrics_shared_on_ingress`). See `serving.observability.exporter`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from serving.keys import Keys

log = structlog.get_logger(__name__)

# Ingress metrics (this process) -----------------------------------------------------------------
SUBMISSIONS = Counter(
    "svd_submissions_total", "Job submissions by HTTP status code and model", ["status_code", "model"]
)
CANCELS = Counter("svd_cancellations_total", "Cancel requests accepted", ["from_status"])
for _status in ("queued", "processing"):  # exported as 0 from the start, so rate() sees the first cancel
    CANCELS.labels(_status)
REQUEST_LATENCY = Histogram(
    "svd_http_request_duration_seconds", "Ingress request latency", ["method", "route"]
)


# Worker metrics (aggregated in Redis) -----------------------------------------------------------
class Kind(str, Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class WorkerMetric:
    """A metric observed in a replica and exported by the ingress from its Redis hash."""

    name: str
    kind: Kind
    help: str
    labelnames: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # Label sets exported as 0 before anything happened, so that dashboards and alerts see the
    # series (and `rate()` its first increase) from the start.
    initial: tuple[tuple[str, ...], ...] = field(default=())


# Seconds: a tiny CPU job takes ~1 s end to end, a 25-frame SVD-XT job on an H100 ~1-2 min,
# a queue on a cold spot cluster can wait many minutes.
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)
COST_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WEBHOOK_OUTCOMES = ("succeeded", "retry", "failed", "disabled")

JOB_STAGE_SECONDS = WorkerMetric(
    "svd_job_stage_duration_seconds",
    Kind.HISTOGRAM,
    "Job latency per stage: queue_wait, inference, postprocessing (encode), upload, end_to_end",
    ("stage", "model"),
    STAGE_BUCKETS,
)
JOBS_FINISHED = WorkerMetric(
    "svd_jobs_finished_total",
    Kind.COUNTER,
    "Jobs that reached a terminal state (or failed an attempt: status=retrying), by model",
    ("status", "model"),
)
DENOISING_STEP_SECONDS = WorkerMetric(
    "svd_denoising_step_duration_seconds",
    Kind.HISTOGRAM,
    "Wall time of one denoising step of the Generator (a whole batch)",
    ("model", "device"),
    STEP_BUCKETS,
)
BATCH_SIZE = WorkerMetric(
    "svd_generator_batch_size", Kind.HISTOGRAM, "Requests denoised together in one loop", ("model",), BATCH_BUCKETS
)
GPU_MEMORY_USED = WorkerMetric(
    "svd_gpu_memory_used_bytes", Kind.GAUGE, "Accelerator memory held by the Generator (0 on CPU)", ("node", "device")
)
GPU_MEMORY_TOTAL = WorkerMetric(
    "svd_gpu_memory_total_bytes", Kind.GAUGE, "Accelerator memory of the device (0 on CPU)", ("node", "device")
)
GPU_UTILIZATION = WorkerMetric(
    "svd_gpu_utilization_ratio", Kind.GAUGE, "Accelerator utilisation 0..1 (NVML; 0 on CPU)", ("node", "device")
)
REPLICAS_WANTED = WorkerMetric(
    "svd_serve_replicas_wanted", Kind.GAUGE, "Ray Serve target replicas per deployment", ("deployment",)
)
REPLICAS_RUNNING = WorkerMetric(
    "svd_serve_replicas_running", Kind.GAUGE, "Ray Serve replicas in RUNNING state per deployment", ("deployment",)
)
PROVIDER_ROUTING = WorkerMetric(
    "svd_provider_routing_decisions_total",
    Kind.COUNTER,
    "Which backend a job attempt was routed to, and why",
    ("provider", "reason"),
)
WEBHOOK_ATTEMPTS = WorkerMetric(
    "svd_webhook_delivery_attempts_total",
    Kind.COUNTER,
    "Outbound webhook attempts by outcome (retry and failed are failures)",
    ("outcome",),
    initial=tuple((outcome,) for outcome in WEBHOOK_OUTCOMES),
)
WEBHOOK_FAILURES = WorkerMetric(
    "svd_webhook_delivery_failures_total",
    Kind.COUNTER,
    "Outbound webhook deliveries given up (schedule exhausted or endpoint gone)",
    ("reason",),
    initial=(("exhausted",), ("gone",)),
)
WEBHOOK_ATTEMPT_SECONDS = WorkerMetric(
    "svd_webhook_attempt_duration_seconds", Kind.HISTOGRAM, "Latency of one webhook attempt", (), STAGE_BUCKETS,
    initial=((),),
)
JOB_COST_USD = WorkerMetric(
    "svd_job_cost_usd", Kind.HISTOGRAM, "Estimated cost of one completed job", ("provider", "model"), COST_BUCKETS
)
OWNER_COST_USD = WorkerMetric(
    "svd_owner_cost_usd_total", Kind.COUNTER, "Estimated cost of ended jobs per owner, failed ones included", ("owner", "provider")
)
OWNER_GPU_SECONDS = WorkerMetric(
    "svd_owner_gpu_seconds_total", Kind.COUNTER, "GPU (accelerator) seconds of ended jobs per owner", ("owner",)
)

APP_RUNNING = WorkerMetric(
    "svd_serve_application_running", Kind.GAUGE, "1 while the Ray Serve application is RUNNING", ("application",)
)
BREAKER_OPEN = WorkerMetric(
    "svd_provider_breaker_open", Kind.GAUGE, "1 while a provider's circuit breaker is open (per Dispatcher)",
    ("provider",),
)

WORKER_METRICS: tuple[WorkerMetric, ...] = (
    JOB_STAGE_SECONDS,
    JOBS_FINISHED,
    DENOISING_STEP_SECONDS,
    BATCH_SIZE,
    GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL,
    GPU_UTILIZATION,
    REPLICAS_WANTED,
    REPLICAS_RUNNING,
    APP_RUNNING,
    BREAKER_OPEN,
    PROVIDER_ROUTING,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_FAILURES,
    WEBHOOK_ATTEMPT_SECONDS,
    JOB_COST_USD,
    OWNER_COST_USD,
    OWNER_GPU_SECONDS,
)
# A gauge label set nobody refreshed for this long belongs to replicas (or nodes) that are gone;
# writers refresh theirs well within it (replica counts every 15 s, GPU gauges on every health check).
GAUGE_TTL_S = 120

_SEP = "\t"  # between the sample suffix and the label JSON; never in a suffix


def _labels_field(metric: WorkerMetric, labels: Mapping[str, str]) -> str:
    if set(labels) != set(metric.labelnames):
        raise ValueError(f"{metric.name} takes labels {metric.labelnames}, got {sorted(labels)}")
    return json.dumps([str(labels[name]) for name in metric.labelnames])


def _bucket_for(metric: WorkerMetric, value: float) -> str:
    for bound in metric.buckets:
        if value <= bound:
            return repr(float(bound))
    return "+Inf"


class MetricsPipeline(Protocol):
    """The part of a Redis pipeline (sync or asyncio; both buffer commands) a batch writes to."""

    def hincrbyfloat(self, name: str, key: str, amount: float = ...) -> Any: ...
    def hset(self, name: str, key: str, value: str) -> Any: ...
    def expire(self, name: str, time: int) -> Any: ...


class MetricBatch:
    """Observations of worker metrics, sent to Redis in one pipeline (`flush` / `aflush`).
    Writing never raises into the job: a lost observation is logged, the job goes on."""

    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._ops: list[tuple[str, str, str, float]] = []  # (op, key, field, value)

    def __len__(self) -> int:
        return len(self._ops)

    def inc(self, metric: WorkerMetric, labels: Mapping[str, str], amount: float = 1.0) -> None:
        if metric.kind is not Kind.COUNTER:
            raise TypeError(f"{metric.name} is a {metric.kind.value}, not a counter")
        if amount < 0:
            raise ValueError("counters only go up")
        self._ops.append(("incr", self._keys.metric(metric.name), _SEP + _labels_field(metric, labels), amount))

    def observe(self, metric: WorkerMetric, labels: Mapping[str, str], value: float) -> None:
        if metric.kind is not Kind.HISTOGRAM:
            raise TypeError(f"{metric.name} is a {metric.kind.value}, not a histogram")
        key, labels_json = self._keys.metric(metric.name), _labels_field(metric, labels)
        self._ops.append(("incr", key, _bucket_for(metric, value) + _SEP + labels_json, 1.0))
        self._ops.append(("incr", key, "sum" + _SEP + labels_json, float(value)))

    def set(self, metric: WorkerMetric, labels: Mapping[str, str], value: float) -> None:
        if metric.kind is not Kind.GAUGE:
            raise TypeError(f"{metric.name} is a {metric.kind.value}, not a gauge")
        self._ops.append(("set", metric.name, _SEP + _labels_field(metric, labels), value))

    def apply(self, pipe: MetricsPipeline) -> None:
        """Queue the batch's commands on `pipe` (the caller executes it)."""
        now = repr(time.time())
        gauges: set[str] = set()
        for op, key, field_, value in self._ops:
            if op == "incr":
                pipe.hincrbyfloat(key, field_, value)
            else:  # a gauge: `key` is the metric's name; its value and its write time
                pipe.hset(self._keys.metric(key), field_, repr(float(value)))
                pipe.hset(self._keys.metric_stamps(key), field_, now)
                gauges.add(key)
        for name in gauges:
            pipe.expire(self._keys.metric(name), GAUGE_TTL_S)
            pipe.expire(self._keys.metric_stamps(name), GAUGE_TTL_S)

    def flush(self, client: redis.Redis) -> None:
        """Send with a synchronous client (Generator, PostProcessor threads)."""
        if not self._ops:
            return
        try:
            with client.pipeline(transaction=False) as pipe:
                self.apply(pipe)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics_write_failed", error=repr(exc), observations=len(self._ops))
        self._ops.clear()

    async def aflush(self, client: aioredis.Redis) -> None:
        """Send with an asyncio client (Dispatcher)."""
        if not self._ops:
            return
        try:
            async with client.pipeline(transaction=False) as pipe:
                self.apply(pipe)
                await pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics_write_failed", error=repr(exc), observations=len(self._ops))
        self._ops.clear()


# Reading them back (ingress, on scrape) ---------------------------------------------------------
async def read_worker_metrics(client: aioredis.Redis, keys: Keys) -> list[Metric]:
    """Every worker metric as a prometheus family, read from Redis in one round trip."""
    async with client.pipeline(transaction=False) as pipe:
        for metric in WORKER_METRICS:
            pipe.hgetall(keys.metric(metric.name))
            pipe.hgetall(keys.metric_stamps(metric.name))
        replies: list[dict[bytes | str, bytes | str]] = await pipe.execute()
    now = time.time()
    families = []
    for index, metric in enumerate(WORKER_METRICS):
        fields, stamps = _decode(replies[2 * index]), _decode(replies[2 * index + 1])
        if metric.kind is Kind.GAUGE:
            fields = {k: v for k, v in fields.items() if now - stamps.get(k, now) <= GAUGE_TTL_S}
        families.append(to_family(metric, fields))
    return families


def _decode(raw: Mapping[bytes | str, bytes | str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in raw.items():
        k = key.decode() if isinstance(key, bytes) else key
        v = value.decode() if isinstance(value, bytes) else value
        try:
            out[k] = float(v)
        except ValueError:
            log.warning("metrics_field_unreadable", field=k)
    return out


def _split(field_: str) -> tuple[str, tuple[str, ...]] | None:
    suffix, sep, labels_json = field_.partition(_SEP)
    if not sep:
        return None
    try:
        values = json.loads(labels_json)
    except json.JSONDecodeError:
        return None
    return suffix, tuple(str(v) for v in values)


def to_family(metric: WorkerMetric, fields: Mapping[str, float]) -> Metric:
    """One metric's Redis hash as a prometheus family (histogram buckets made cumulative)."""
    labels = list(metric.labelnames)
    parsed: list[tuple[str, tuple[str, ...], float]] = []
    for field_, value in fields.items():
        split = _split(field_)
        if split is not None and len(split[1]) == len(labels):  # a relabelled metric's old fields drop out
            parsed.append((split[0], split[1], value))
    if metric.kind is Kind.HISTOGRAM:
        return _histogram_family(metric, parsed)
    family: CounterMetricFamily | GaugeMetricFamily
    if metric.kind is Kind.COUNTER:
        family = CounterMetricFamily(metric.name, metric.help, labels=labels)
    else:
        family = GaugeMetricFamily(metric.name, metric.help, labels=labels)
    seen: dict[tuple[str, ...], float] = {initial: 0.0 for initial in metric.initial}
    for _suffix, label_values, value in parsed:
        seen[label_values] = value
    for label_values, value in sorted(seen.items()):
        family.add_metric(list(label_values), value)
    return family


def _histogram_family(metric: WorkerMetric, parsed: Sequence[tuple[str, tuple[str, ...], float]]) -> Metric:
    family = HistogramMetricFamily(metric.name, metric.help, labels=list(metric.labelnames))
    bounds = [repr(float(b)) for b in metric.buckets] + ["+Inf"]
    per_series: dict[tuple[str, ...], dict[str, float]] = {initial: {} for initial in metric.initial}
    for suffix, label_values, value in parsed:
        per_series.setdefault(label_values, {})[suffix] = value
    for label_values, samples in sorted(per_series.items()):
        cumulative, buckets = 0.0, []
        for bound in bounds:
            cumulative += samples.get(bound, 0.0)
            buckets.append((bound, cumulative))  # repr(float) is how prometheus writes `le` too
        family.add_metric(list(label_values), buckets, samples.get("sum", 0.0))
    return family


class StaticCollector:
    """A collector that yields families built beforehand (read asynchronously, before the
    synchronous prometheus renderer runs)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)
