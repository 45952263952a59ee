"""API read throughput: job status reads against a bare endpoint on the same server, in one run.

Starts PostgreSQL-backed uvicorn (workers from the core count) on loopback, seeds one tenant with jobs,
then drives 32 concurrent connections from a separate load-generator process — `wrk` when installed
(Debian package `wrk`), else an asyncio httpx client — at
  GET /v1/jobs/{id}   (auth lookup + indexed primary-key read + serialisation)
  GET /v1/jobs?limit=20  (auth + one indexed page)
  GET /healthz        (the bare FastAPI endpoint: the ceiling on this machine)
and prints requests/s, p50 and p99 latency, and the ratio of each to the bare endpoint. The endpoints take
turns in short rounds (bare, job, list, bare, job, list, ...), so a change in the machine's speed during the
run hits all three alike. req/s is the median over rounds, each ratio the median of the per-round ratios (job
and bare measured seconds apart); p50 and p99 are over every request of every round (each round's latency
distribution as 999 quantiles, weighted by its request count). `p99_max_ms` is the worst single round's p99.

    python -m bench.api [--seconds 12] [--rounds 4] [--connections 32] [--workers 0] [--json]

Needs PostgreSQL at 127.0.0.1:5432 (trust auth). Writes docs/bench/api.json.
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench" / "api.json"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(url: str, jobs: int) -> tuple[str, str]:
    from sqlalchemy.orm import Session

    from app.auth import create_api_key
    from app.db import make_engine, upgrade_head
    from app.ids import new_id
    from app.models import Job

    upgrade_head(url)
    engine = make_engine(url)
    with Session(engine) as session:
        key = create_api_key(session, tenant_name="bench")
        session.flush()
        from app import repositories as repo

        tenant_id = repo.get_api_key_by_hash(session, key_hash=__import__("app.auth").auth.hash_key(key)).tenant_id
        ids = []
        for i in range(jobs):
            job = Job(id=new_id("job"), tenant_id=tenant_id, name=f"bench-{i}", status="succeeded", progress={
                "epoch": 30, "epochs": 30, "fraction": 1.0}, spec={"method": {"type": "kd"}, "student": {}},
                summary={"val_accuracy": 0.9}, job_metadata={}, max_attempts=3)  # fmt: skip
            session.add(job)
            ids.append(job.id)
        session.commit()
    engine.dispose()
    # Statistics, as a running database has them (autovacuum analyses a table after enough writes; PostgreSQL's
    # docs say to ANALYZE after a bulk load). Without them the planner reads a job through the
    # (tenant_id, status, id) index, walking every index entry of the tenant: 24 buffers a read instead of 3.
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("ANALYZE")
    return key, ids[len(ids) // 2]


# wrk reports fixed percentiles; this prints 999 quantiles (0.1 % to 99.9 %, in µs) so rounds can be pooled.
WRK_QUANTILES = """done = function(summary, latency, requests)
  for i = 1, 999 do io.write(string.format("q %d\\n", latency:percentile(i / 10))) end
end
"""
QUANTILE_POINTS = 999


def run_wrk(url: str, key: str, seconds: int, connections: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_QUANTILES)
        script.flush()
        out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s",
                              script.name, "-H", f"Authorization: Bearer {key}", url],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50%"),
            "p99_ms": ms("99%"), "non_2xx": int(errors.group(1)) if errors else 0, "tool": "wrk",
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "quantiles_ms": [int(v) / 1000 for v in re.findall(r"^q (\d+)$", out, re.M)]}  # fmt: skip


async def _httpx_load(url: str, key: str, seconds: int, connections: int) -> dict:
    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=10) as client:
        deadline = time.perf_counter() + seconds

        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                r = await client.get(url)
                latencies.append((time.perf_counter() - t) * 1000)
                errors += r.status_code >= 300

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {"rps": n / elapsed, "p50_ms": latencies[n // 2], "p99_ms": latencies[int(n * 0.99)], "non_2xx": errors,
            "tool": "httpx", "requests": n,
            "quantiles_ms": [latencies[min(n - 1, n * i // (QUANTILE_POINTS + 1))] for i in range(1, QUANTILE_POINTS + 1)]}  # fmt: skip


def pooled_percentile(runs: list[dict], q: float) -> float:
    """The q-quantile of all requests of several runs, each run's latency distribution given by its quantiles."""
    points = sorted((v, r["requests"] / len(r["quantiles_ms"])) for r in runs for v in r["quantiles_ms"])
    target, seen = q * sum(w for _, w in points), 0.0
    for value, weight in points:
        seen += weight
        if seen >= target:
            return value
    return points[-1][0]


def load(url: str, key: str, seconds: int, connections: int) -> dict:
    if shutil.which("wrk"):
        return run_wrk(url, key, seconds, connections)
    # A separate process, so the load generator's CPU is not the server's.
    code = (f"import asyncio, json; from bench.api import _httpx_load; "
            f"print(json.dumps(asyncio.run(_httpx_load({url!r}, {key!r}, {seconds}, {connections}))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12, help="load time per endpoint, split over the rounds")
    parser.add_argument("--rounds", type=int, default=4, help="turns each endpoint takes (>= 2 s each)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="uvicorn workers; 0 = CPU count")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workers = args.workers or os.cpu_count() or 1
    name = f"distill_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    tmp = Path(tempfile.mkdtemp())
    server = None
    try:
        key, job_id = seed(url, 2000)
        port = free_port()
        env = {**os.environ, "DATABASE_URL": url, "DATA_DIR": str(tmp), "STORAGE_URL": f"file://{tmp}/store",
               "REDIS_URL": "redis://127.0.0.1:6379/15"}  # fmt: skip
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", str(workers), "--log-level", "warning",
                                   "--no-access-log"], cwd=ROOT, env=env)  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        targets = {"bare /healthz": f"{base}/healthz", "GET /v1/jobs/{id}": f"{base}/v1/jobs/{job_id}",
                   "GET /v1/jobs?limit=20": f"{base}/v1/jobs?limit=20"}  # fmt: skip
        for target in targets.values():  # warm every worker's pools and caches
            load(target, key, 2, args.connections)
        per_round = max(2, round(args.seconds / args.rounds))
        rounds = [{label: load(target, key, per_round, args.connections) for label, target in targets.items()}
                  for _ in range(args.rounds)]  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    results = {}
    for label in targets:
        runs = [r[label] for r in rounds]
        results[label] = {
            "rps": med(r["rps"] for r in runs), "p50_ms": pooled_percentile(runs, 0.50),
            "p99_ms": pooled_percentile(runs, 0.99), "p99_max_ms": max(r["p99_ms"] for r in runs),
            "ratio_to_bare": med(r[label]["rps"] / r["bare /healthz"]["rps"] for r in rounds),
            "non_2xx": sum(r["non_2xx"] for r in runs), "tool": runs[0]["tool"],
            "rounds": [{k: v for k, v in r.items() if k != "quantiles_ms"} for r in runs],  # the pooled figures say it
        }  # fmt: skip
    print(f"{'endpoint':<24}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p99 max':>9}{'vs bare':>9}{'non-2xx':>9}")
    for label, r in results.items():
        print(f"{label:<24}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['p99_max_ms']:>9.2f}"
              f"{r['ratio_to_bare']:>9.2f}{r['non_2xx']:>9}")  # fmt: skip
    report = {"connections": args.connections, "seconds": args.seconds, "rounds": args.rounds,
              "seconds_per_round": per_round, "uvicorn_workers": workers, "cpus": os.cpu_count(),
              "results": results}  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    if args.json:
        status = results["GET /v1/jobs/{id}"]
        print(json.dumps({"job_read_rps": status["rps"], "job_read_p99_ms": status["p99_ms"],
                          "job_read_over_bare": status["ratio_to_bare"]}))  # fmt: skip


if __name__ == "__main__":
    main()
