"""Soak: jobs submitted by concurrent clients while a chaos loop kills workers and restarts Redis and PostgreSQL.

Everything runs on private servers (a redis-server and an initdb'd PostgreSQL 15 cluster on free ports), so
the shared ones are never touched: the API (uvicorn), `--workers` Celery workers, `--clients` client threads
(one tenant each) that submit `--jobs` jobs in all (each POST with an Idempotency-Key, retried on 5xx and
transport errors), poll them until they end, then keep reading their job list until the chaos is over (so
every outage meets traffic). Meanwhile the chaos loop runs `--chaos` events at random:

  kill_worker      SIGKILL a worker mid-whatever, start a replacement
  term_worker      SIGTERM a worker (warm shutdown: the job is handed back), start a replacement
  restart_redis    SIGKILL redis-server (no persistence: every message is lost), start it again 1–3 s later
  flush_redis      FLUSHALL
  restart_postgres pg_ctl stop (fast or immediate), start it again 2–5 s later

At the end it reads the truth from the database and the store and checks: every acknowledged job is terminal
(lost = 0), no job was created twice, no artifact was recorded twice and no job keeps more than one artifact
set in the store, no 5xx or transport error outside the PostgreSQL outage windows, and a job submitted after
the chaos succeeds.

    python bench/soak.py [--jobs 30] [--clients 10] [--chaos 12] [--workers 2] [--seed 1] [--json PATH]

Prints a table; writes JSON to docs/bench/soak.json (or --json PATH); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    # Run as a script: bench/ must not shadow the standard library (bench/queue.py is not `queue`).
    sys.path[0] = str(ROOT)

import httpx

from tests.conftest import make_key
from tests.integration.faults_support import StackFactory

OUT = ROOT / "docs" / "bench" / "soak.json"
TERMINAL = {"succeeded", "failed", "cancelled"}
KINDS = ["kill_worker", "term_worker", "restart_redis", "flush_redis", "restart_postgres"]
# A 503 that starts within this many seconds after PostgreSQL is back counts as part of the outage: the API
# keeps no pre-ping, so the first request on each connection pooled before the restart finds it dead (503) and
# the pool is then invalidated. They are counted separately ("after_db_back").
DB_GRACE_S = 5.0


def job_spec(seed: int) -> dict:
    """About 4–6 s of work on a 2-core machine: a small 1-D CNN, 4 epochs of the built-in MNIST-1D."""
    return {
        "name": f"soak-{seed}",
        "student": {"architecture": {"name": "cnn1d", "config": {"channels": 16}}},
        "train_file": "builtin:mnist1d",
        "method": {"type": "supervised"},
        "hyperparameters": {"epochs": 4, "batch_size": 64, "seed": seed},
    }


class Recorder:
    """Every HTTP exchange the clients make: start, end, status (or the transport error)."""

    def __init__(self, t0: float):
        self.t0, self.rows, self.lock = t0, [], threading.Lock()

    def request(self, client: httpx.Client, method: str, path: str, **kw) -> httpx.Response | None:
        start = time.monotonic() - self.t0
        try:
            r = client.request(method, path, **kw)
            row = {
                "start": start,
                "end": time.monotonic() - self.t0,
                "method": method,
                "status": r.status_code,
                "code": _problem_code(r) if r.status_code >= 500 else None,
            }
        except httpx.HTTPError as e:
            r = None
            row = {
                "start": start,
                "end": time.monotonic() - self.t0,
                "method": method,
                "status": None,
                "code": type(e).__name__,
            }
        with self.lock:
            self.rows.append(row)
        return r


def _problem_code(r: httpx.Response) -> str | None:
    try:
        return r.json().get("type", "").rsplit("/", 1)[-1]
    except ValueError:
        return None


class Chaos(threading.Thread):
    def __init__(
        self, stack, redis, pg, *, events: int, gap: tuple[float, float], rng: random.Random, t0: float
    ):
        super().__init__(name="chaos", daemon=True)
        self.stack, self.redis, self.pg, self.rng, self.t0, self.gap = stack, redis, pg, rng, t0, gap
        # Every kind equally often (as far as the count allows), in a random order.
        kinds = [KINDS[i % len(KINDS)] for i in range(events)]
        rng.shuffle(kinds)
        self.schedule = kinds
        self.log: list[dict] = []
        self.db_windows: list[tuple[float, float]] = []
        self.error: str | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        try:
            for kind in self.schedule:
                time.sleep(self.rng.uniform(*self.gap))
                start = self.now()
                detail = getattr(self, kind)()
                self.log.append(
                    {
                        "kind": kind,
                        "at_s": round(start, 2),
                        "took_s": round(self.now() - start, 2),
                        "detail": detail,
                    }
                )
        except Exception as e:  # noqa: BLE001  (reported, and the soak fails)
            self.error = f"{type(e).__name__}: {e}"

    def _victim(self):
        live = self.stack.live_workers()
        return self.rng.choice(live) if live else None

    def kill_worker(self) -> str:
        victim = self._victim()
        if victim is not None:
            victim.kill()
            victim.wait()
        self.stack.start_worker()
        return f"SIGKILL pid {victim.pid if victim else '-'}"

    def term_worker(self) -> str:
        victim = self._victim()
        code = None
        if victim is not None:
            victim.send_signal(signal.SIGTERM)
            try:
                code = victim.wait(60)
            except Exception:  # noqa: BLE001
                victim.kill()
                code = victim.wait()
        self.stack.start_worker()
        return f"SIGTERM pid {victim.pid if victim else '-'}, exit {code}"

    def restart_redis(self) -> str:
        down = self.rng.uniform(1, 3)
        self.redis.restart(down_s=down)
        return f"down {down:.1f}s"

    def flush_redis(self) -> str:
        self.redis.flush()
        return "FLUSHALL"

    def restart_postgres(self) -> str:
        down, mode = self.rng.uniform(2, 5), self.rng.choice(["fast", "immediate"])
        start = self.now()
        try:
            self.pg.restart(down_s=down, mode=mode)
        finally:
            self.db_windows.append((start, self.now()))
        return f"stop -m {mode}, down {down:.1f}s"


def client_main(
    idx: int,
    n_jobs: int,
    key: str,
    base_url: str,
    rec: Recorder,
    rng: random.Random,
    submit_window: float,
    deadline: float,
    out: dict,
    chaos_done: threading.Event,
) -> None:
    ids: list[str] = []
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=20) as client:
        for k in range(n_jobs):
            time.sleep(rng.uniform(0, 2 * submit_window / max(n_jobs, 1)))
            body, headers = job_spec(1000 * idx + k), {"Idempotency-Key": f"soak-{idx}-{k}"}
            while time.monotonic() < deadline:
                r = rec.request(client, "POST", "/v1/jobs", json=body, headers=headers)
                if r is not None and r.status_code in (200, 201):
                    ids.append(r.json()["id"])
                    break
                if r is not None and r.status_code < 500 and r.status_code != 429:
                    out.setdefault("client_errors", []).append(f"POST {r.status_code}: {r.text[:200]}")
                    break
                time.sleep(1.0)
        out["acknowledged"] = list(ids)
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for job_id in sorted(pending):
                r = rec.request(client, "GET", f"/v1/jobs/{job_id}")
                if r is not None and r.status_code == 200 and r.json()["status"] in TERMINAL:
                    pending.discard(job_id)
            time.sleep(1.0)
        out["pending"] = sorted(pending)
        # Like a dashboard, keep looking at the job list until the chaos is over: the service always has traffic.
        # (An outage that no request sees is `test_faults_database.py::test_first_request_after_an_idle_restart`.)
        while not chaos_done.is_set() and time.monotonic() < deadline:
            rec.request(client, "GET", "/v1/jobs", params={"limit": 5})
            chaos_done.wait(1.0)


def run_soak(
    *,
    jobs: int = 30,
    clients: int = 10,
    chaos: int = 12,
    workers: int = 2,
    seed: int = 1,
    gap: tuple[float, float] = (4.0, 9.0),
    timeout_s: float = 900,
    folder: Path | None = None,
) -> dict:
    folder = Path(folder or tempfile.mkdtemp(prefix="distill-soak-"))
    factory = StackFactory(folder)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        redis = factory.private_redis()
        pg = factory.private_postgres()
        stack = factory(workers=workers, redis=redis, postgres=pg)
        for w in stack.workers:
            stack.wait_worker_ready(w, timeout=120)
        keys = [make_key(stack.database_url, f"soak-client-{i}") for i in range(clients)]
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        rec = Recorder(t0)
        chaos_thread = Chaos(stack, redis, pg, events=chaos, gap=gap, rng=random.Random(seed + 1), t0=t0)
        per_client = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
        # Submissions are spread over about the first half of the chaos.
        submit_window = max(10.0, 0.5 * chaos * sum(gap) / 2)
        outs = [{} for _ in range(clients)]
        chaos_done = threading.Event()
        threads = [
            threading.Thread(
                target=client_main,
                name=f"client-{i}",
                args=(
                    i,
                    per_client[i],
                    keys[i],
                    stack.base_url,
                    rec,
                    random.Random(seed * 100 + i),
                    submit_window,
                    deadline,
                    outs[i],
                    chaos_done,
                ),
            )
            for i in range(clients)
        ]
        chaos_thread.start()
        for t in threads:
            t.start()
        chaos_thread.join(max(0.0, deadline - time.monotonic()))
        chaos_done.set()
        for t in threads:
            t.join()
        duration = time.monotonic() - t0
        # After the storm: one more job must go through at once (the service recovered, not just drained).
        recovered = _one_more_job(
            stack.base_url, keys[0], rec, timeout=min(120.0, max(10.0, deadline - time.monotonic()))
        )
        return _verdict(
            stack,
            rec,
            chaos_thread,
            outs,
            {
                "jobs": jobs,
                "clients": clients,
                "chaos": chaos,
                "workers": workers,
                "seed": seed,
                "gap_s": list(gap),
            },
            started_at,
            duration,
            recovered,
        )
    finally:
        factory.close()


def _one_more_job(base_url: str, key: str, rec: Recorder, timeout: float) -> float | None:
    """Seconds from submission to `succeeded` for one job after the chaos, or None if it did not succeed."""
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=20) as client:
        t0 = time.monotonic()
        r = rec.request(client, "POST", "/v1/jobs", json=job_spec(999_999))
        if r is None or r.status_code != 201:
            return None
        while time.monotonic() - t0 < timeout:
            job = rec.request(client, "GET", f"/v1/jobs/{r.json()['id']}")
            if job is not None and job.status_code == 200 and job.json()["status"] in TERMINAL:
                return round(time.monotonic() - t0, 1) if job.json()["status"] == "succeeded" else None
            time.sleep(0.5)
    return None


def _verdict(
    stack,
    rec: Recorder,
    chaos: Chaos,
    outs: list[dict],
    config: dict,
    started_at: str,
    duration: float,
    recovered: float | None,
) -> dict:
    acknowledged = [j for o in outs for j in o.get("acknowledged", [])]
    rows = stack.sql("SELECT id, status, attempts, error FROM jobs WHERE name <> 'soak-999999'")
    by_id = {r["id"]: r for r in rows}
    terminal = [j for j in acknowledged if j in by_id and by_id[j]["status"] in TERMINAL]
    lost = [j for j in acknowledged if j not in terminal]
    duplicated_rows = stack.sql(
        "SELECT job_id, name, count(*) AS n FROM artifacts GROUP BY job_id, name HAVING count(*) > 1"
    )
    succeeded = [j for j in acknowledged if by_id.get(j, {}).get("status") == "succeeded"]
    with_model = {
        r["job_id"] for r in stack.sql("SELECT job_id FROM artifacts WHERE name = 'model.safetensors'")
    }
    store_sets = {j: stack.artifact_folders(j) for j in by_id}
    extra_sets = {j: f for j, f in store_sets.items() if len(f) > 1}
    unrecorded_sets = {j: f for j, f in store_sets.items() if f and by_id[j]["status"] != "succeeded"}

    windows = chaos.db_windows

    def in_outage(row, grace: float = 0.0) -> bool:
        return any(row["start"] <= b + grace and row["end"] >= a for a, b in windows)

    bad = [r for r in rec.rows if r["status"] is None or r["status"] >= 500]
    during = [r for r in bad if in_outage(r)]
    after_back = [
        r
        for r in bad
        if not in_outage(r)
        and in_outage(r, DB_GRACE_S)
        and r["status"] == 503
        and r["code"] == "database_unavailable"
    ]
    outside = [r for r in bad if r not in during and r not in after_back]
    outage_s = sum(b - a for a, b in windows)
    errors = Counter(
        (by_id[j]["error"] or {}).get("code")
        for j in acknowledged
        if by_id.get(j, {}).get("status") == "failed"
    )
    result = {
        "command": "python bench/soak.py "
        + " ".join(f"--{k} {v}" for k, v in config.items() if k != "gap_s"),
        "config": config,
        "started_at": started_at,
        "duration_s": round(duration, 1),
        "chaos": {
            "events": len(chaos.log),
            "by_kind": dict(Counter(e["kind"] for e in chaos.log)),
            "log": chaos.log,
            "error": chaos.error,
            "db_outage_s": round(outage_s, 1),
        },
        "jobs": {
            "submitted": config["jobs"],
            "acknowledged": len(acknowledged),
            "in_database": len(rows),
            "duplicated_jobs": len(rows) - len(set(acknowledged)),
            "terminal": len(terminal),
            "lost": len(lost),
            "lost_ids": lost,
            "by_status": dict(Counter(by_id[j]["status"] for j in acknowledged if j in by_id)),
            "failed_by_code": {str(k): v for k, v in errors.items()},
            "attempts": {
                str(k): v for k, v in sorted(Counter(by_id[j]["attempts"] for j in terminal).items())
            },
            "succeeded_without_model": len([j for j in succeeded if j not in with_model]),
            "client_errors": [e for o in outs for e in o.get("client_errors", [])],
        },
        "post_chaos_job_s": recovered,
        "artifacts": {
            "duplicated_rows": len(duplicated_rows),
            "jobs_with_more_than_one_set_in_store": len(extra_sets),
            "unfinished_jobs_with_uploads_in_store": len(unrecorded_sets),
        },
        "http": {
            "requests": len(rec.rows),
            "by_status": dict(Counter(str(r["status"] or r["code"]) for r in rec.rows)),
            "errors_during_db_outage": len(during),
            "db_unavailable_503_just_after_db_back": len(after_back),
            "5xx_outside_db_outage": len(outside),
            "outside_examples": outside[:10],
            "max_latency_s_outside_db_outage": round(
                max((r["end"] - r["start"] for r in rec.rows if not in_outage(r, DB_GRACE_S)), default=0.0), 2
            ),
        },
    }
    checks = {
        "every job terminal (lost = 0)": not lost and len(acknowledged) == config["jobs"],
        "no job created twice": result["jobs"]["duplicated_jobs"] == 0,
        "no artifact recorded twice": not duplicated_rows,
        "at most one artifact set per job in the store": not extra_sets,
        "every succeeded job has its model": result["jobs"]["succeeded_without_model"] == 0,
        "no 5xx outside the DB outage": not outside,
        f"{config['chaos']} chaos events ran": len(chaos.log) == config["chaos"] and chaos.error is None,
        "a job submitted after the chaos succeeds": recovered is not None,
    }
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


def print_table(result: dict) -> None:
    j, a, h, c = result["jobs"], result["artifacts"], result["http"], result["chaos"]
    rows = [
        ("duration", f"{result['duration_s']} s"),
        ("chaos events", f"{c['events']}  {c['by_kind']}"),
        ("PostgreSQL down", f"{c['db_outage_s']} s in all"),
        ("jobs submitted / acknowledged", f"{j['submitted']} / {j['acknowledged']}"),
        ("jobs terminal", f"{j['terminal']}  {j['by_status']}"),
        ("jobs lost", j["lost"]),
        ("jobs created twice", j["duplicated_jobs"]),
        ("attempts per job", j["attempts"]),
        ("failed, by error code", j["failed_by_code"] or "-"),
        ("artifact rows recorded twice", a["duplicated_rows"]),
        ("jobs with >1 artifact set in store", a["jobs_with_more_than_one_set_in_store"]),
        ("HTTP requests", f"{h['requests']}  {h['by_status']}"),
        ("errors during DB outage", h["errors_during_db_outage"]),
        (f"503 within {DB_GRACE_S:g} s after DB back", h["db_unavailable_503_just_after_db_back"]),
        ("5xx outside DB outage", h["5xx_outside_db_outage"]),
        ("max latency outside DB outage", f"{h['max_latency_s_outside_db_outage']} s"),
        (
            "job after the chaos",
            f"succeeded in {result['post_chaos_job_s']} s"
            if result["post_chaos_job_s"]
            else "did not succeed",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"soak: {result['command']}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for name, ok in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--chaos", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=OUT)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="distill-soak-"))
    result = run_soak(
        jobs=args.jobs,
        clients=args.clients,
        chaos=args.chaos,
        workers=args.workers,
        seed=args.seed,
        folder=folder,
    )
    print_table(result)
    if result["passed"]:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"logs and store kept in {folder}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
