"""Shared fixtures: real PostgreSQL, Redis, a uvicorn API process and Celery worker processes.

In CI (CI=true) a missing service is a failure, never a skip.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_service(what: str):
    if IN_CI:
        pytest.fail(f"{what} is required in CI but unavailable")
    pytest.skip(f"{what} unavailable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh database per test session, migrated by Alembic, dropped at the end."""
    import psycopg

    name = f"distill_test_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        missing_service("PostgreSQL at 127.0.0.1:5432")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    from app.db import upgrade_head

    upgrade_head(url)
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url():
    import redis

    db = int(os.environ.get("TEST_REDIS_DB", "7"))
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError:
        missing_service("Redis at 127.0.0.1:6379")
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client.flushdb()


class Service:
    """One running stack: API process plus any number of worker processes, sharing env."""

    def __init__(self, env: dict, data_dir: Path):
        self.env, self.data_dir = env, data_dir
        self.api_proc: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.base_url = ""
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start_api(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        log = open(self.logs / "api.log", "ab")
        self.api_proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_http(f"{self.base_url}/healthz", proc=self.api_proc)

    def start_worker(self) -> subprocess.Popen:
        n = len(self.workers)
        log = open(self.logs / f"worker-{n}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "-P", "solo",
             "-c", "1", "-Q", self.env.get("QUEUE", "cpu"), "--loglevel", "INFO", "-n", f"w{n}-{uuid.uuid4().hex[:6]}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def worker_log(self, proc: subprocess.Popen) -> str:
        return (self.logs / f"worker-{self.workers.index(proc)}.log").read_text(errors="replace")

    def stop_worker(self, proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 20) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        for proc in self.workers:
            self.stop_worker(proc, signal.SIGKILL)
        if self.api_proc is not None:
            self.api_proc.terminate()
            try:
                self.api_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.api_proc.kill()


def service_env(database_url: str, redis_url: str | None, data_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "STORAGE_URL"))}
    env.update({
        "DATA_DIR": str(data_dir), "DATABASE_URL": database_url, "STORAGE_URL": f"file://{data_dir / 'store'}",
        "LEASE_SECONDS": "4", "RECONCILE_INTERVAL_S": "1", "REQUEUE_AFTER_S": "5", "MAX_ATTEMPTS": "3",
        "MAX_UPLOAD_BYTES": str(64 * 1024 * 1024), "UPLOAD_TIMEOUT_S": "6", "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1", "WORKER_THREADS": "1",
    })  # fmt: skip
    if redis_url:
        env["REDIS_URL"] = redis_url
    else:
        env.pop("REDIS_URL", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def make_key(database_url: str, tenant: str) -> str:
    from sqlalchemy.orm import Session

    from app.auth import create_api_key
    from app.db import make_engine

    engine = make_engine(database_url)
    with Session(engine) as session:
        key = create_api_key(session, tenant_name=tenant)
        session.commit()
    engine.dispose()
    return key


@pytest.fixture(scope="session")
def service(postgres_url, redis_url, tmp_path_factory):
    """API + one worker on PostgreSQL + Redis + a local store."""
    data_dir = tmp_path_factory.mktemp("svc")
    svc = Service(service_env(postgres_url, redis_url, data_dir), data_dir)
    svc.start_api()
    svc.start_worker()
    yield svc
    svc.stop()
    if os.environ.get("KEEP_TEST_LOGS"):
        shutil.copytree(svc.logs, ROOT / "var" / "test-logs", dirs_exist_ok=True)


@pytest.fixture(scope="session")
def api_key(service, postgres_url):
    return make_key(postgres_url, "tenant-a")


@pytest.fixture(scope="session")
def other_api_key(service, postgres_url):
    return make_key(postgres_url, "tenant-b")


@pytest.fixture()
def client(service, api_key):
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        yield c


@pytest.fixture()
def other_client(service, other_api_key):
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {other_api_key}"},
                      timeout=30) as c:  # fmt: skip
        yield c
