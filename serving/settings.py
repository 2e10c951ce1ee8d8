"""One settings object, built at start-up and passed down (never read at import time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.options import parse_warmup_buckets
from serving.provider_names import FAL, RUNWAY, ManagedProvider

PLACEHOLDER = "changeme"


class Settings(BaseSettings):
    """svd-serve configuration. Every field can be set as `SVD_SERVE_<NAME>` or in `.env`;
    secrets may also be files named after the field in `secrets_dir`."""

    model_config = SettingsConfigDict(
        env_prefix="SVD_SERVE_",
        env_file=".env",
        extra="ignore",
        secrets_dir=None,
    )

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(".svd-serve")

    # HTTP ingress
    host: str = "127.0.0.1"
    port: int = 8000
    public_base_url: str | None = None  # how clients reach the ingress; default http://host:port
    max_upload_bytes: int = 20 * 1024 * 1024
    # Static API keys: "owner:key,owner2:key2" (scopes submit+read). Keys made with
    # `svd-serve keys create` (any scope, admin included) live in the database. In production the
    # ingress starts only when one of the two holds a key (docs/production.md).
    api_keys: SecretStr = SecretStr("")
    url_signing_secret: SecretStr = SecretStr(PLACEHOLDER)
    # Security (issue #7)
    auth_disabled: bool = False  # development only: no keys checked, every caller is owner "local"
    cors_allow_origins: list[str] = []  # CORS stays off unless origins are listed
    # Request rate per API key (token bucket) and per-owner quotas; 0 means unlimited.
    rate_limit_per_s: float = 10.0
    rate_limit_burst: int = 50
    # Requests without a valid key per client address: a burst, then one per 1/rate seconds (429).
    auth_failure_rate_per_s: float = 0.2
    auth_failure_burst: int = 20
    max_concurrent_jobs: int = 50  # queued + processing, per owner
    max_jobs_per_day: int = 5000  # per owner, UTC days
    max_gpu_seconds_per_month: float = 0.0  # per owner, UTC calendar months
    # User-supplied URLs (imageUrl, webhookUrl), see serving.netguard
    allow_http_urls: bool | None = None  # None: http allowed in development only, https always
    allow_private_urls: bool = False  # loopback/private targets; tests and local experiments only
    outbound_allowed_networks: list[str] = []  # CIDRs trusted despite being private
    url_fetch_timeout_s: float = 15.0

    # Job store; default: SQLite file under data_dir
    database_url: str | None = None

    # Queue / events. REDIS_URL (unprefixed) is honoured too, see `redis_url_env`.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    queue_name: str = "svd-jobs"
    key_prefix: str = "svd"
    job_attempts: int = 3
    job_backoff_ms: int = 5000
    # Jobs one dispatcher drives at once. Above 1, compatible jobs meet in the Generator's batches
    # (set it to at least max_batch_size on GPU nodes); 1 keeps strict queue order on small machines.
    dispatcher_concurrency: int = 1
    max_batch_size: int = 4  # requests per denoising loop (Generator @serve.batch)
    batch_wait_timeout_s: float = 0.05  # how long a lone request waits for batch-mates
    # Batch budget in frames x pixels: two SVD-XT videos at 576x1024; larger requests run alone.
    batch_max_frame_pixels: int = 2 * 25 * 576 * 1024
    lock_duration_ms: int = 30000  # queue lease; renewed while a job runs
    # Reliability (issue #5)
    idempotency_ttl_s: int = 24 * 3600  # an Idempotency-Key names its job this long
    max_queued_per_priority: int = 10000  # waiting jobs per priority; past it 429 (never unbounded)
    max_queued_total: int = 20000  # waiting jobs in all; past it the service is saturated: 503
    drain_rate_window_s: int = 300  # completions counted over this window give the drain rate
    drain_grace_s: float = 25.0  # on SIGTERM, finish jobs expected to end within this; hand back the rest
    # `svd-serve spot-watch` (an optional sidecar of GPU pods, docs/scaling.md): which instance
    # metadata to poll for the spot notice, and how often.
    preemption_watcher: Literal["none", "aws", "gcp"] = "none"
    preemption_poll_s: float = 2.0
    # Ray resources the Dispatcher asks for, to pin it to the stable (on-demand) head node, e.g.
    # {"svd-dispatcher": 0.01} with the head started with `--resources '{"svd-dispatcher": 1}'`.
    dispatcher_resources: dict[str, float] = {}
    job_deadline_s: float = 3600.0  # wall-clock limit of one attempt
    watchdog_stall_s: float = 300.0  # a running generation without progress this long is stuck
    # Generator autoscaling on queue depth (serving.autoscaling)
    autoscale_min_replicas: int = 1  # 0 lets an idle Generator scale to zero (GPU nodes freed)
    autoscale_max_replicas: int = 1  # raise on a GPU cluster; 1 keeps one replica on a laptop
    autoscale_jobs_per_replica_per_min: float = 2.0  # throughput of one Generator replica
    autoscale_target_wait_s: float = 60.0  # how long a waiting job may wait before we add capacity
    autoscale_upscale_delay_s: float = 30.0
    autoscale_downscale_delay_s: float = 600.0
    autoscale_metrics_interval_s: float = 10.0  # how often each Generator reports the queue to Serve

    # Object storage
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None  # default: data_dir/storage
    s3_bucket: str = "svd-serve"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    presign_ttl_s: int = 900  # short-lived: the status answer signs fresh URLs on every read
    # Outputs (issue #4). With a CDN in front of the bucket, output URLs are cdn_base_url + key
    # (no signature) and outputs are stored `Cache-Control: public`; otherwise presigned URLs.
    cdn_base_url: str | None = None
    interpolation_method: Literal["motion", "blend"] = "motion"  # ffmpeg minterpolate | framerate
    # An identical earlier request of the same owner with a fixed seed completes from its outputs.
    result_cache_enabled: bool = True

    # Models / GPU execution
    default_model: str = "tiny-random"
    models_dir: Path | None = None  # local weights; default data_dir/models
    model_revision: str = "main"  # what `svd-serve models download` fetches; pin a commit hash in production
    offline: bool = False
    device: Literal["auto", "cuda", "cpu"] = "auto"
    ray_address: str | None = None  # None: start a local Ray
    ray_num_cpus: int | None = None
    generator_num_gpus: float = 0.0  # set 1 on GPU nodes
    # Inference engine (issue #3, pipelines.options): preset reference|quality|fast; memory mode
    # auto (picked from the card's free memory) |normal|low_vram; where torch.compile keeps its cache.
    engine_preset: Literal["reference", "quality", "fast"] = "reference"
    engine_memory_mode: Literal["auto", "normal", "low_vram"] = "auto"
    compile_cache_dir: Path | None = None
    # Loaded (and, under a compiling preset, compiled) at start-up besides default_model's native
    # size: "MODEL:WIDTHxHEIGHTxFRAMES" entries; every model named gets its native size too.
    warmup_buckets: list[str] = []
    serve_app_name: str = "svd-serve"

    # Live events (SSE / WebSocket), kept per job in a Redis stream
    events_ttl_s: int = 24 * 3600  # a job's events expire this long after its last one
    events_max_len: int = 2000  # events kept per job (progress events are the bulk)
    events_heartbeat_s: float = 15.0  # an idle stream gets a heartbeat this often
    # Outbound webhooks (Standard Webhooks). Signing secrets `whsec_...`, space-separated: during
    # a rotation list the new and the old one and every delivery carries both signatures.
    webhook_secrets: SecretStr = SecretStr("")
    # Per-owner default webhook URL for jobs submitted without `webhookUrl` (JSON: {"owner": "https://..."}).
    owner_webhook_urls: dict[str, str] = {}
    webhook_timeout_s: float = 15.0
    webhook_time_scale: float = 1.0  # multiplies the retry schedule and Retry-After (tests: 0.001)
    webhook_jitter: float = 0.1  # each retry delay varies by up to this fraction either way
    webhook_concurrency: int = 8  # deliveries one dispatcher replica sends at once
    webhook_poll_interval_s: float = 0.5  # how often the delivery loop looks for due deliveries
    # Inbound provider webhooks: "provider=whsec_new whsec_old,other=whsec_x" (Standard Webhooks)
    provider_webhook_secrets: SecretStr = SecretStr("")
    provider_webhook_tolerance_s: int = 300  # signed timestamps further off than this are refused

    # Providers and cost (issue #6). Runway is a fallback: used only with a key and fallback on.
    runway_api_key: SecretStr = SecretStr("")
    runway_base_url: str = "https://api.dev.runwayml.com"
    runway_model: str = "gen4_turbo"
    runway_timeout_s: float = 60.0  # one HTTP call to Runway
    runway_poll_interval_s: float = 5.0  # Runway asks for polls no faster than every 5 s
    runway_poll_max_interval_s: float = 30.0  # backoff ceiling while a task is THROTTLED/PENDING
    runway_task_timeout_s: float = 1800.0  # give up on a task (and delete it) after this long
    runway_output_max_bytes: int = 200 * 1024 * 1024
    # fal (issue #14): its queue API through `fal-client`; the model a setting, Pika by default
    # (Kling or Veo on fal work the same way). docs/providers.md maps our parameters onto it.
    fal_api_key: SecretStr = SecretStr("")
    fal_queue_url: str = "https://queue.fal.run"
    fal_model: str = "fal-ai/pika/v2.2/image-to-video"
    fal_resolution: str = "720p"
    fal_default_prompt: str = ""  # used when a job has none; empty: a fal job without a prompt gets 422
    fal_timeout_s: float = 60.0
    fal_poll_interval_s: float = 2.0
    fal_task_timeout_s: float = 1800.0  # give up on a request (and cancel it) after this long
    fal_output_max_bytes: int = 200 * 1024 * 1024
    fal_webhook_base_url: str = ""  # our public base URL: set, fal calls back when a request ends
    fal_price_per_second_usd: float = 0.04  # Pika v2.2 720p on fal: $0.20 per 5 s clip (docs/providers.md)
    fallback_enabled: bool = False
    fallback_provider: ManagedProvider = "runway"  # where `auto` falls back to
    # `auto` goes to Runway when the local pool was unhealthy this long, or when the estimated
    # local wait exceeds the SLA (0: no SLA rule), or when the job failed locally on every attempt.
    local_unhealthy_threshold_s: float = 60.0
    # A Generator on its way up (scale from zero, a new spot node: boot, image pull, weights,
    # compile) is not "unhealthy" for routing until it has taken longer than this.
    local_cold_start_allowance_s: float = 900.0
    routing_sla_s: float = 0.0
    local_job_seconds_estimate: float = 60.0  # one local job, for queue-wait estimates
    breaker_failure_threshold: int = 5  # consecutive failures that open a provider's breaker
    breaker_reset_s: float = 60.0  # an open breaker lets one probe through after this long
    # Prices: a GPU-hour (spot or on-demand) and a Runway credit, in USD.
    gpu_hour_price_usd: float = 2.50
    gpu_hour_spot_price_usd: float = 1.00
    gpu_pricing: Literal["on_demand", "spot"] = "on_demand"
    runway_credit_price_usd: float = 0.01
    runway_credits_per_second: float = 5.0  # gen4_turbo: 5 credits per output second
    # Monthly budget per owner in USD (0: none); "owner=amount,..." overrides it per owner.
    budget_monthly_usd: float = 0.0
    owner_budgets_usd: str = ""
    budget_soft_fraction: float = 0.8  # past this share of the budget: alert metric and log
    # Optional: a signed `budget.threshold` webhook when an owner reaches the soft limit or the budget.
    budget_webhook_url: str = ""

    # Observability (issue #8). Logs: JSON lines, or console text; `auto` = console only in
    # development on a terminal, JSON everywhere else (files, Ray replicas, containers).
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    metrics_replicas_interval_s: float = 15.0  # how often a Dispatcher reports Serve replica counts
    # The ingress's /metrics also serves the Redis-held metrics (one machine). Off on Kubernetes,
    # where `svd-serve exporter` serves them once (serving.observability.exporter).
    metrics_shared_on_ingress: bool = True
    # Tracing (OpenTelemetry, OTLP/HTTP) stays off unless an endpoint is set; needs the
    # `observability` extra. Sentry error reporting starts only with a DSN.
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "svd-serve"
    sentry_dsn: SecretStr = SecretStr("")
    sentry_traces_sample_rate: float = 0.0

    @field_validator("warmup_buckets")
    @classmethod
    def _check_warmup_buckets(cls, value: list[str]) -> list[str]:
        parse_warmup_buckets(value)  # a malformed entry stops the start-up with its reason
        return value

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> "Settings":
        if self.environment == "production":
            if self.url_signing_secret.get_secret_value() in ("", PLACEHOLDER):
                raise ValueError("SVD_SERVE_URL_SIGNING_SECRET must be set in production")
            if self.auth_disabled:
                raise ValueError("SVD_SERVE_AUTH_DISABLED is refused in production: every request needs a key")
            for name in type(self).model_fields:
                value = getattr(self, name)
                if isinstance(value, SecretStr) and value.get_secret_value() == PLACEHOLDER:
                    raise ValueError(f"SVD_SERVE_{name.upper()} is left at a placeholder in production")
        return self

    # Derived values -------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'svd-serve.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "storage").resolve()

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models").resolve()

    @property
    def resolved_public_base_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    def configured_providers(self) -> frozenset[str]:
        """The managed providers this server holds an API key for (serving.provider_names)."""
        keys = {RUNWAY: self.runway_api_key, FAL: self.fal_api_key}
        return frozenset(name for name, key in keys.items() if key.get_secret_value())

    def api_key_owners(self) -> dict[str, str]:
        """Map of API key -> owner id."""
        owners: dict[str, str] = {}
        raw = self.api_keys.get_secret_value().strip()
        for item in filter(None, (part.strip() for part in raw.split(","))):
            owner, sep, key = item.partition(":")
            if not sep or not owner or not key:
                raise ValueError("SVD_SERVE_API_KEYS entries must look like owner:key")
            owners[key] = owner
        return owners


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, `.env` and `SVD_SERVE_SECRETS_DIR`."""
    import os

    secrets_dir = os.environ.get("SVD_SERVE_SECRETS_DIR")
    if secrets_dir:
        return Settings(_secrets_dir=secrets_dir, **overrides)
    return Settings(**overrides)
