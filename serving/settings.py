"""One settings object, built at start-up and passed down (never read at import time)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    # Static bootstrap API keys: "owner:key,owner2:key2" (scopes submit+read). Keys made with
    # `svd-serve keys create` live in the database; without any key every request answers 401.
    api_keys: SecretStr = SecretStr("")
    url_signing_secret: SecretStr = SecretStr(PLACEHOLDER)
    # Security (issue #7)
    auth_disabled: bool = False  # development only: no keys checked, every caller is owner "local"
    cors_allow_origins: list[str] = []  # CORS stays off unless origins are listed
    # Request rate per API key (token bucket) and per-owner quotas; 0 means unlimited.
    rate_limit_per_s: float = 10.0
    rate_limit_burst: int = 50
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
    dispatcher_concurrency: int = 1  # jobs one dispatcher drives at once
    lock_duration_ms: int = 30000  # queue lease; renewed while a job runs

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
    offline: bool = False
    device: str = "auto"  # auto|cuda|cpu
    ray_address: str | None = None  # None: start a local Ray
    ray_num_cpus: int | None = None
    generator_num_gpus: float = 0.0  # set 1 on GPU nodes
    serve_app_name: str = "svd-serve"

    # Live events (SSE / WebSocket), kept per job in a Redis stream
    events_ttl_s: int = 24 * 3600  # a job's events expire this long after its last one
    events_max_len: int = 2000  # events kept per job (progress events are the bulk)
    events_heartbeat_s: float = 15.0  # an idle stream gets a heartbeat this often
    # Outbound webhooks (Standard Webhooks). Signing secrets `whsec_...`, space-separated: during
    # a rotation list the new and the old one and every delivery carries both signatures.
    webhook_secrets: SecretStr = SecretStr("")
    webhook_timeout_s: float = 15.0
    webhook_time_scale: float = 1.0  # multiplies the retry schedule and Retry-After (tests: 0.001)
    webhook_jitter: float = 0.1  # each retry delay varies by up to this fraction either way
    webhook_concurrency: int = 8  # deliveries one dispatcher replica sends at once
    webhook_poll_interval_s: float = 0.5  # how often the delivery loop looks for due deliveries
    # Inbound provider webhooks: "provider=whsec_new whsec_old,other=whsec_x" (Standard Webhooks)
    provider_webhook_secrets: SecretStr = SecretStr("")
    provider_webhook_tolerance_s: int = 300  # signed timestamps further off than this are refused

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> "Settings":
        if self.environment == "production":
            if self.url_signing_secret.get_secret_value() in ("", PLACEHOLDER):
                raise ValueError("SVD_SERVE_URL_SIGNING_SECRET must be set in production")
            if not self.api_keys.get_secret_value():
                raise ValueError("SVD_SERVE_API_KEYS must be set in production")
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


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, `.env` and `SVD_SERVE_SECRETS_DIR`."""
    import os

    secrets_dir = os.environ.get("SVD_SERVE_SECRETS_DIR")
    if secrets_dir:
        return Settings(_secrets_dir=secrets_dir, **overrides)  # type: ignore[call-arg]
    return Settings(**overrides)  # type: ignore[arg-type]
