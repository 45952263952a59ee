"""Queue pickup and per-job overhead on a warm worker, with Redis and PostgreSQL.

Starts uvicorn and one Celery worker on a fresh PostgreSQL database and Redis, submits small jobs one
after another and reads, from each job's own timestamps and metrics:
  pickup    = started_at − created_at   (commit → publish → broker → claim)
  overhead  = (finished_at − started_at) − train seconds   (load, teacher pass, evaluation, export, upload)

    python -m bench.queue [--jobs 50] [--json]

Needs PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379). Writes docs/bench/queue.json.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench" / "queue.json"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SPEC = {"student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [32]}}},
        "train_file": "builtin:digits", "method": {"type": "supervised"},
        "hyperparameters": {"epochs": 2, "batch_size": 128}}  # fmt: skip


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from sqlalchemy.orm import Session

    from app.auth import create_api_key
    from app.db import make_engine, upgrade_head

    name = f"distill_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    tmp = Path(tempfile.mkdtemp())
    procs: list[subprocess.Popen] = []
    try:
        upgrade_head(url)
        engine = make_engine(url)
        with Session(engine) as session:
            key = create_api_key(session, tenant_name="bench")
            session.commit()
        engine.dispose()
        import redis

        redis.Redis(db=args.redis_db).flushdb()
        env = {**os.environ, "DATABASE_URL": url, "DATA_DIR": str(tmp), "STORAGE_URL": f"file://{tmp}/store",
               "REDIS_URL": f"redis://127.0.0.1:6379/{args.redis_db}", "MAX_ACTIVE_JOBS_PER_TENANT": "1000"}  # fmt: skip
        port = 8900 + os.getpid() % 90
        log = open(tmp / "stack.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port),
                                       "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=log))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app",
                                       "worker", "-P", "solo", "-c", "1", "-Q", "cpu", "--loglevel", "WARNING",
                                       "--without-gossip", "--without-mingle", "--without-heartbeat"],
                                      cwd=ROOT, env=env, stdout=log, stderr=log))  # fmt: skip
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                              timeout=30)  # fmt: skip
        for _ in range(150):
            try:
                client.get("/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.2)

        def run_one() -> dict:
            job = client.post("/v1/jobs", json=SPEC).json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.05)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            return job

        warm = run_one()  # the first job pays for imports, the digits load and the ONNX exporter's warm-up
        assert warm["status"] == "succeeded", warm
        pickups, overheads, walls = [], [], []
        for _ in range(args.jobs):
            job = run_one()
            assert job["status"] == "succeeded", job
            pickup = (parse(job["started_at"]) - parse(job["created_at"])).total_seconds()
            wall = (parse(job["finished_at"]) - parse(job["started_at"])).total_seconds()
            train = job["metrics"]["phases"].get("train", 0.0)
            pickups.append(pickup * 1000)
            overheads.append(wall - train)
            walls.append(wall)
        phases = {k: round(v, 3) for k, v in job["metrics"]["phases"].items()}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "jobs": args.jobs, "pickup_ms_median": statistics.median(pickups), "pickup_ms_p95": percentile(pickups, 0.95),
        "overhead_s_median": statistics.median(overheads), "overhead_s_p95": percentile(overheads, 0.95),
        "wall_s_median": statistics.median(walls), "last_job_phases_s": phases,
    }  # fmt: skip
    print(f"{'jobs':>5}{'pickup p50':>12}{'pickup p95':>12}{'overhead p50':>14}{'overhead p95':>14}{'wall p50':>10}")
    print(f"{args.jobs:>5}{report['pickup_ms_median']:>10.1f}ms{report['pickup_ms_p95']:>10.1f}ms"
          f"{report['overhead_s_median']:>13.2f}s{report['overhead_s_p95']:>13.2f}s{report['wall_s_median']:>9.2f}s")  # fmt: skip
    print("phases of the last job (s):", phases)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
