"""The broker loses its messages (a private Redis restarted without persistence, or flushed) while jobs are
queued and running: the database still knows every job, the reconciler re-publishes the stranded ones, and
every job reaches a terminal state, each trained once."""

import time

import pytest

from tests.integration import faults_support as support
from tests.integration.faults_support import messages, quick_spec, slow_spec, wait_status, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
stacks = support.stacks  # the fixture


@pytest.mark.parametrize("fault", ["restart", "flush"])
def test_redis_lost_with_jobs_queued_and_running(stacks, fault):
    redis = stacks.private_redis()
    stack = stacks(workers=1, redis=redis)
    stack.wait_worker_ready(stack.workers[0])
    with stack.client() as client:
        running = client.post("/v1/jobs", json=slow_spec(3, f"running-{fault}")).json()["id"]
        wait_status(client, running, {"running"}, timeout=60)
        queued = [
            client.post("/v1/jobs", json=quick_spec(f"queued-{fault}-{i}")).json()["id"] for i in range(2)
        ]
        assert stack.queue_length() == 2
        if fault == "restart":
            redis.stop()
            # While the broker is down the API still takes jobs (201): the job is in the database, and the
            # reconciler publishes it once the broker is back.
            t0 = time.monotonic()
            r = client.post("/v1/jobs", json=quick_spec("submitted-while-down"))
            assert r.status_code == 201, r.text
            assert time.monotonic() - t0 < 10
            queued.append(r.json()["id"])
            time.sleep(2)
            redis.start()
        else:
            redis.flush()
        assert stack.queue_length() == 0  # every message is gone
        for job_id in [running, *queued]:
            job = wait_status(client, job_id, timeout=180)
            assert job["status"] == "succeeded", (job_id, job["error"])
            assert job["attempts"] == 1, job_id  # the running job was not disturbed; none ran twice
            assert sum(" started on " in m for m in messages(client, job_id)) == 1
            assert stack.artifact_folders(job_id) == ["attempt-1"]
        logs = "".join(stack.worker_log(w) for w in stack.workers)
        assert "reconciler re-published" in logs
        # The worker is still consuming: a new job runs straight away.
        last = client.post("/v1/jobs", json=quick_spec("after")).json()["id"]
        assert wait_status(client, last, timeout=60)["status"] == "succeeded"
        wait_until(lambda: stack.live_workers() == stack.workers, 1, "the worker to stay up")
