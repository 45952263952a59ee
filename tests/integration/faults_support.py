"""Support for the fault tests and the soak: private Redis and PostgreSQL servers, a service stack on them,
failpoint workers and small helpers.

The shared PostgreSQL on 5432 and the shared Redis on 6379 are never stopped or flushed here: a fault that
restarts or flushes a server gets its own server (`PrivateRedis`, `PrivatePostgres`). Every stack also has its
own database and its own Celery queue, so its workers never take another stack's messages.

Run as a module, it is a worker with a failpoint (`python -m tests.integration.faults_support worker ...`) or
a writer that the checkpoint test kills mid-write (`... write-checkpoint ...`, `... put-store ...`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    PG_ADMIN_URL,
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    Service,
    free_port,
    make_key,
    service_env,
)

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll `check` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---- private servers -----------------------------------------------------------------------------


class PrivateRedis:
    """A throw-away redis-server on a free port, no persistence: a restart loses every message."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=5)

    def start(self) -> None:
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 (the server keeps it)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ping, 20, f"redis on port {self.port}", 0.05)

    def _ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {self.proc.returncode}; see {self.folder / 'redis.log'}"
            )
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001 (not up yet)
            return False

    def stop(self) -> None:
        """A crash: SIGKILL, so nothing is saved (there is no persistence anyway)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def flush(self) -> None:
        self.client().flushall()


class PrivatePostgres:
    """A private PostgreSQL 15 cluster (initdb) on a free port; `stop`/`start` restart it under the service.

    initdb refuses to run as root, so as root every server command runs as the `postgres` user in a folder it
    owns.
    """

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="distill-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")

    def _run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [str(PG_BIN / cmd[0]), *cmd[1:]]
        if self.as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}"
            )
        return result

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200 -c full_page_writes=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.folder / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """`fast` (what a restart does: sessions are terminated) or `immediate` (a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, down_s: float = 0.0, mode: str = "fast") -> None:
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def is_ready(self) -> bool:
        return (
            self._run(
                "pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1", check=False
            ).returncode
            == 0
        )

    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- databases -----------------------------------------------------------------------------------


def create_database(admin_url: str) -> str:
    """A new, migrated database; returns its SQLAlchemy URL."""
    import psycopg

    from app.db import upgrade_head

    name = f"distill_faults_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    upgrade_head(url)
    return url


def drop_database(url: str, admin_url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with (
        contextlib.suppress(Exception),
        psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn,
    ):
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- the stack -----------------------------------------------------------------------------------


class Stack(Service):
    """API + workers on their own database, queue and data folder; optionally private Redis/PostgreSQL."""

    def __init__(
        self,
        folder: Path,
        *,
        redis: PrivateRedis | None = None,
        postgres: PrivatePostgres | None = None,
        **settings,
    ):
        self.redis, self.postgres = redis, postgres
        self.admin_url = postgres.admin_url() if postgres else PG_ADMIN_URL
        self.database_url = create_database(self.admin_url)
        if redis is not None:
            self.redis_url = redis.url(0)
        else:
            self.redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{int(os.environ.get('TEST_REDIS_DB', '7'))}"
        self.queue = f"faults-{uuid.uuid4().hex[:8]}"
        env = service_env(self.database_url, self.redis_url, folder, QUEUE=self.queue, **settings)
        super().__init__(env, folder)
        self._engine = None
        self._celery = None
        self._key: str | None = None

    # -- workers
    def start_worker(self, failpoint: str | None = None) -> subprocess.Popen:
        """A Celery worker, or with `failpoint` the same worker with a fault armed (see `_arm_failpoint`)."""
        if failpoint is None:
            return super().start_worker()
        n = len(self.workers)
        log = open(self.logs / f"worker-{n}.log", "ab")  # noqa: SIM115 (the worker keeps it)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.faults_support",
                "worker",
                "-P",
                "solo",
                "-c",
                "1",
                "-Q",
                self.queue,
                "--loglevel",
                "INFO",
                "-n",
                f"w{n}-{uuid.uuid4().hex[:6]}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env={**self.env, "FAULTS_FAILPOINT": failpoint},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def live_workers(self) -> list[subprocess.Popen]:
        return [w for w in self.workers if w.poll() is None]

    def kill_workers(self) -> None:
        for w in self.live_workers():
            w.kill()
            w.wait()

    def wait_worker_ready(self, proc: subprocess.Popen, timeout: float = 60) -> None:
        wait_until(
            lambda: "ready." in self.worker_log(proc) or proc.poll() is not None, timeout, "worker ready"
        )
        assert proc.poll() is None, self.worker_log(proc)[-3000:]

    # -- clients
    @property
    def api_key(self) -> str:
        if self._key is None:
            self._key = make_key(self.database_url, f"faults-{uuid.uuid4().hex[:6]}")
        return self._key

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=timeout
        )

    # -- direct looks at the truth
    @property
    def engine(self):
        if self._engine is None:
            from app.db import make_engine

            self._engine = make_engine(self.database_url)
        return self._engine

    def job_row(self, job_id: str) -> dict:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()
        return dict(row)

    def sql(self, query: str, **params) -> list[dict]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(query), params).mappings()]

    # -- the broker
    def publish(self, job_id: str) -> None:
        """Deliver the job id once more, exactly as `app.queue.publish_job` does, on this stack's queue."""
        if self._celery is None:
            from app.queue import make_celery
            from app.settings import Settings

            self._celery = make_celery(Settings(_env_file=None, redis_url=self.redis_url, queue=self.queue))
        from app.queue import RUN_JOB

        self._celery.send_task(RUN_JOB, args=[job_id], queue=self.queue)

    def queue_length(self) -> int:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        try:
            return int(client.llen(self.queue))
        finally:
            client.close()

    # -- the store
    def artifact_folders(self, job_id: str) -> list[str]:
        """Upload folders (`attempt-N`) of a job that hold at least one file."""
        root = self.data_dir / "store" / "jobs" / job_id
        return sorted(p.name for p in root.glob("attempt-*") if any(f.is_file() for f in p.rglob("*")))

    def stop(self) -> None:
        super().stop()
        if self._engine is not None:
            self._engine.dispose()
        if self._celery is not None:
            with contextlib.suppress(Exception):
                self._celery.close()
        if self.redis is None:
            import redis

            with contextlib.suppress(Exception):
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
                client.delete(self.queue, f"_kombu.binding.{self.queue}")
                client.close()
        drop_database(self.database_url, self.admin_url)


class StackFactory:
    """Builds stacks (and their private servers) for one test and tears all of it down afterwards."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.stacks: list[Stack] = []
        self.servers: list[PrivateRedis | PrivatePostgres] = []

    def private_redis(self) -> PrivateRedis:
        server = PrivateRedis(self.folder / f"redis-{len(self.servers)}")
        self.servers.append(server)
        server.start()
        return server

    def private_postgres(self) -> PrivatePostgres:
        server = PrivatePostgres()
        self.servers.append(server)
        server.init()
        server.start()
        return server

    def __call__(
        self,
        *,
        workers: int = 1,
        api: bool = True,
        redis: PrivateRedis | None = None,
        postgres: PrivatePostgres | None = None,
        **settings,
    ) -> Stack:
        stack = Stack(self.folder / f"stack-{len(self.stacks)}", redis=redis, postgres=postgres, **settings)
        self.stacks.append(stack)
        if api:
            stack.start_api()
        for _ in range(workers):
            stack.start_worker()
        return stack

    def close(self, keep_logs_to: Path | None = None) -> None:
        for stack in self.stacks:
            with contextlib.suppress(Exception):
                stack.stop()
            if keep_logs_to is not None:
                shutil.copytree(stack.logs, keep_logs_to / stack.data_dir.name, dirs_exist_ok=True)
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop() if isinstance(server, PrivateRedis) else server.destroy()


@pytest.fixture()
def stacks(tmp_path, request):
    """A `StackFactory` for one test; everything it started is stopped afterwards (KEEP_TEST_LOGS keeps logs)."""
    factory = StackFactory(tmp_path)
    yield factory
    keep = ROOT / "var" / "test-logs" / request.node.name if os.environ.get("KEEP_TEST_LOGS") else None
    factory.close(keep_logs_to=keep)


# ---- small specs and API helpers -----------------------------------------------------------------


def slow_spec(epochs: int, name: str = "slow") -> dict:
    """A supervised job of a few seconds per epoch on a 2-core machine (the same as test_faults.slow_spec)."""
    return {
        "name": name,
        "student": {"architecture": {"name": "cnn1d", "config": {"channels": 48}}},
        "train_file": "builtin:mnist1d",
        "method": {"type": "supervised"},
        "hyperparameters": {"epochs": epochs, "batch_size": 32, "seed": 1},
    }


def quick_spec(name: str = "quick") -> dict:
    return {
        "name": name,
        "student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [8]}}},
        "train_file": "builtin:digits",
        "method": {"type": "supervised"},
        "hyperparameters": {"epochs": 1},
    }


def messages(client: httpx.Client, job_id: str) -> list[str]:
    out, after = [], None
    while True:
        params = {"limit": 100} | ({"after": after} if after is not None else {})
        page = client.get(f"/v1/jobs/{job_id}/events", params=params).json()
        out += [e["message"] for e in page["data"]]
        if not page["has_more"] or not page["data"]:
            return out
        after = page["data"][-1]["id"]


def metric_epochs(client: httpx.Client, job_id: str) -> list[int]:
    return [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]


def wait_status(
    client: httpx.Client,
    job_id: str,
    statuses=TERMINAL,
    timeout: float = 180,
    check: Callable[[dict], bool] | None = None,
) -> dict:
    def poll():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job.get("status") in statuses and (check is None or check(job)) else None

    return wait_until(poll, timeout, f"{job_id} in {sorted(statuses)}", 0.25)


# ---- processes run by the tests ------------------------------------------------------------------


def _arm_failpoint(spec: str) -> None:
    """Make this worker SIGKILL itself at a precise point of a job, to test the window around it.

    - `before_checkpoint_record:E`: epoch E's checkpoint is in the store, its database record not yet written.
    - `before_finish`: every artifact is uploaded, the `succeeded` transaction not yet run.
    """
    from app import repositories as repo

    name, _, arg = spec.partition(":")

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if name == "before_checkpoint_record":
        real_set_checkpoint = repo.set_checkpoint

        def set_checkpoint(session, **kw):
            if kw["epoch"] == int(arg):
                die()
            return real_set_checkpoint(session, **kw)

        repo.set_checkpoint = set_checkpoint
    elif name == "before_finish":
        real_finish = repo.finish_job

        def finish_job(session, **kw):
            if kw["status"] == "succeeded":
                die()
            return real_finish(session, **kw)

        repo.finish_job = finish_job
    else:
        raise SystemExit(f"unknown failpoint {spec!r}")


def _write_checkpoint(path: str, version: int, megabytes: int) -> None:
    """Write a checkpoint of `megabytes` MB whose every value is `version`, with the engine's atomic writer."""
    import torch

    from worker.engine.trainer import CHECKPOINT_FORMAT, save_checkpoint

    n = megabytes * 1024 * 1024 // 4
    payload = {
        "format": CHECKPOINT_FORMAT,
        "job_id": "job_ckpt",
        "epoch": version,
        "student": {"weight": torch.full((n,), float(version))},
    }
    print("writing", flush=True)
    save_checkpoint(Path(path), payload)
    print("done", flush=True)


def _put_store(root: str, key: str, source: str) -> None:
    from app.storage import LocalStore

    print("writing", flush=True)
    LocalStore(Path(root)).put_file(key, Path(source))
    print("done", flush=True)


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "worker":
        from worker.celery_app import celery_app

        _arm_failpoint(os.environ["FAULTS_FAILPOINT"])
        celery_app.worker_main(["worker", *args])
    elif command == "write-checkpoint":
        _write_checkpoint(args[0], int(args[1]), int(args[2]))
    elif command == "put-store":
        _put_store(*args)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
