"""One validated settings object, read from the environment (and `.env`)."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Where the embedded defaults keep their files (SQLite database, broker, store, worker scratch).
    data_dir: Path = Path("var")
    # SQLAlchemy URL; PostgreSQL in production, a SQLite file under data_dir when unset.
    database_url: str | None = None
    # Redis broker URL; an embedded SQLite-backed Celery transport when unset.
    redis_url: str | None = None
    # Object store: "file:///abs/path" (local folder) or "s3://bucket/prefix"; data_dir/store when unset.
    storage_url: str | None = None
    # S3-compatible endpoint (MinIO, moto, ...); None means AWS itself.
    s3_endpoint_url: str | None = None
    # Largest accepted upload, in bytes (413 above it).
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    # Seconds an upload may take before the server gives up on a slow body.
    upload_timeout_s: float = Field(default=600.0, gt=0)
    # Seconds a worker's claim on a job stays valid without a heartbeat.
    lease_seconds: int = Field(default=60, ge=2)
    # Deliveries of one job before it is failed for good.
    max_attempts: int = Field(default=3, ge=1)
    # Seconds between reconciler passes (re-publish stranded jobs).
    reconcile_interval_s: float = Field(default=15.0, gt=0)
    # A queued job not picked up for this long is published again.
    requeue_after_s: float = Field(default=60.0, gt=0)
    # Seconds an API process remembers a key → tenant lookup (a revoked key stops working within this).
    auth_cache_ttl_s: float = Field(default=5.0, ge=0)
    # Queued plus running jobs one tenant may have at once (429 above it).
    max_active_jobs_per_tenant: int = Field(default=20, ge=1)
    # Wall-clock seconds one attempt of a job may run before the worker fails it with `timeout`.
    job_timeout_s: float = Field(default=24 * 3600.0, gt=0)
    # torch threads per worker process (0 = the cores this process may use, by affinity and cgroup quota).
    worker_threads: int = Field(default=0, ge=0)
    # Celery queue the API publishes to and workers consume ("cpu" or "gpu").
    queue: str = "cpu"
    # Log one JSON object per line (job_id and tenant_id included where known).
    json_logs: bool = False
    # PostgreSQL connections per API process for the async hot reads (job status and job pages). A read holds one
    # for a single round trip, so a few serve thousands of reads a second; more only add backends competing for
    # the cores (docs/performance.md: on 2 cores the job read's p99 fell from 37-51 ms at 10 to 34-40 ms at 4).
    read_pool_size: int = Field(default=4, ge=1, le=100)
    # Uvicorn worker processes for `distill api` (0 = from the CPU count).
    api_workers: int = Field(default=0, ge=0)
    # Job webhooks (README "Webhooks"). Private, loopback and link-local targets are refused unless this is set
    # (a local receiver in development and tests); it guards the network the workers sit in (SSRF).
    webhook_allow_private: bool = False
    # Hosts a webhook_url may reach over plain http (comma-separated, e.g. "127.0.0.1,localhost"); https otherwise.
    webhook_http_hosts: str = ""
    # Delivery attempts before giving up, the first retry's delay (doubling after each failure) and its ceiling.
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_retry_base_s: float = Field(default=10.0, gt=0)
    webhook_retry_max_s: float = Field(default=3600.0, gt=0)
    # Seconds one delivery attempt may take (connect, send, and the receiver's answer).
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # After a secret is rotated, deliveries carry a signature with the previous one too, for this many seconds.
    webhook_secret_grace_s: float = Field(default=24 * 3600.0, ge=0)
    # The API's public base URL (e.g. "https://distill.example.com"): webhook bodies link to it; paths when unset.
    public_base_url: str | None = None

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'distill.db'}"

    @property
    def broker_url(self) -> str:
        return self.redis_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def webhook_http_host_set(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.webhook_http_hosts.split(",") if h.strip())

    @property
    def store_url(self) -> str:
        return self.storage_url or f"file://{self.data_dir / 'store'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
