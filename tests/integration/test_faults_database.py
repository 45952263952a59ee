"""PostgreSQL (a private cluster) restarted mid-job: while it is down the API answers 503 problem+json at once
(not a hang), the worker keeps training and retries its writes, and the job finishes once it is back."""

import time

import pytest

from tests.integration import faults_support as support
from tests.integration.faults_support import (
    messages,
    metric_epochs,
    quick_spec,
    slow_spec,
    wait_status,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
stacks = support.stacks  # the fixture
OUTAGE_S = 8  # longer than the 4 s lease: the worker's lease lapses while nobody can write


def _assert_503(r, elapsed: float) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert (
        body["status"] == 503
        and body["title"] == "Service Unavailable"
        and body["type"].endswith("database_unavailable")
    )
    assert r.headers.get("retry-after")
    assert elapsed < 5, elapsed  # a quick answer, not a hang


def test_postgres_restart_mid_job(stacks):
    pg = stacks.private_postgres()
    stack = stacks(workers=1, postgres=pg)
    with stack.client(timeout=30) as client:
        job_id = client.post("/v1/jobs", json=slow_spec(4, "pg-restart")).json()["id"]
        wait_until(lambda: len(metric_epochs(client, job_id)) >= 1, 120, "epoch 1")

        down_at = time.monotonic()
        pg.stop("fast")
        for method, path, body in [
            ("GET", f"/v1/jobs/{job_id}", None),
            ("GET", "/v1/jobs", None),
            ("GET", f"/v1/jobs/{job_id}/events", None),
            ("POST", "/v1/jobs", quick_spec()),
            ("GET", "/v1/files", None),
        ]:
            t0 = time.monotonic()
            r = client.request(method, path, json=body)
            _assert_503(r, time.monotonic() - t0)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        pg.start()

        # The API answers again as soon as the server does (stale pooled connections are replaced).
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").status_code == 200, 10, "the API to recover")
        job = wait_status(client, job_id, timeout=240)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] in (1, 2)  # finished by its worker, or retried from the checkpoint
        assert metric_epochs(client, job_id) == [1, 2, 3, 4]
        assert len(stack.artifact_folders(job_id)) == 1
        log = "".join(stack.worker_log(w) for w in stack.workers)
        assert "will retry" in log or "retrying in" in log  # the worker rode out the outage
        assert sum(" started on " in m for m in messages(client, job_id)) == job["attempts"]
        # Jobs submitted after the outage run normally.
        quick = client.post("/v1/jobs", json=quick_spec("after-outage"))
        assert quick.status_code == 201
        assert wait_status(client, quick.json()["id"], timeout=90)["status"] == "succeeded"


def test_first_request_after_an_idle_restart(stacks):
    """PostgreSQL restarts while nobody calls the API: once it is back, the next request must succeed."""
    pg = stacks.private_postgres()
    stack = stacks(workers=0, postgres=pg)
    with stack.client() as client:
        for _ in range(3):  # the pool now holds connections to the old server process
            assert client.get("/v1/jobs").status_code == 200
        pg.restart(down_s=1.0)
        assert pg.is_ready()
        r = client.get("/v1/jobs")
        assert r.status_code == 200, (r.status_code, r.text)
