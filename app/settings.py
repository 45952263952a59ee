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
    # Uvicorn worker processes for `distill api` (0 = from the CPU count).
    api_workers: int = Field(default=0, ge=0)

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
    def store_url(self) -> str:
        return self.storage_url or f"file://{self.data_dir / 'store'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
