"""Worker faults with real processes: duplicate delivery, a job that always crashes its worker, and SIGKILLs at
the two windows where store and database are written one after the other (checkpoint upload → record,
artifact upload → `succeeded`)."""

import threading

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

stacks = support.stacks  # the fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_same_job_delivered_twice_at_once_runs_once(stacks):
    stack = stacks(workers=2)
    for w in stack.workers:
        stack.wait_worker_ready(w)
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_spec(2, "twice")).json()["id"]
        stack.publish(job_id)  # the API published it once; two idle workers now hold one delivery each
        stack.publish(job_id)
        job = wait_status(client, job_id, timeout=180)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 1
        log = messages(client, job_id)
        assert sum(m.startswith("Attempt ") and " started on " in m for m in log) == 1, log
        assert log.count("data loaded") == 1, log  # one training run
        names = [a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]]
        assert names and len(names) == len(set(names))
        assert stack.artifact_folders(job_id) == ["attempt-1"]
        # Both workers saw the job; the one that lost the claim skipped it.
        wait_until(lambda: stack.queue_length() == 0, 30, "the duplicate deliveries to be consumed")
        logs = "".join(stack.worker_log(w) for w in stack.workers)
        assert logs.count(": 'skipped'") >= 2, logs[-4000:]


def test_claim_is_one_conditional_update_under_a_race(stacks):
    """Sixteen threads claim the same queued job at the same instant: exactly one gets it."""
    from sqlalchemy.orm import Session

    from app import repositories as repo

    stack = stacks(workers=0)
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=quick_spec("race")).json()["id"]
    barrier, won = threading.Barrier(16), []

    def claim(i: int) -> None:
        with Session(stack.engine) as session:
            barrier.wait()
            attempt = repo.claim_job(session, job_id=job_id, worker_id=f"racer-{i}", lease_seconds=60)
            session.commit()
            if attempt is not None:
                won.append((i, attempt))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0][1] == 1, won
    row = stack.job_row(job_id)
    assert row["status"] == "running" and row["attempts"] == 1 and row["worker_id"] == f"racer-{won[0][0]}"


def test_job_that_always_crashes_its_worker_fails_after_max_attempts(stacks):
    stack = stacks(workers=0)
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_spec(20, "crasher")).json()["id"]
        for attempt in (1, 2, 3):
            worker = stack.start_worker()
            # "Each time it starts running the job": as soon as this attempt holds the job, SIGKILL the worker.
            wait_status(
                client, job_id, {"running"}, timeout=120, check=lambda j, a=attempt: j["attempts"] == a
            )
            worker.kill()
            worker.wait()
        survivor = stack.start_worker()
        job = wait_status(client, job_id, timeout=60)
        assert job["status"] == "failed" and job["attempts"] == 3, job
        assert job["error"]["code"] == "max_attempts_exceeded" and "max_attempts=3" in job["error"]["message"]
        assert "Failed: out of attempts." in messages(client, job_id)
        # No endless loop: the surviving worker neither claims it again nor gets stuck; it runs the next job.
        quick = client.post("/v1/jobs", json=quick_spec("after-crasher")).json()["id"]
        assert wait_status(client, quick, timeout=90)["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 3
        assert survivor.poll() is None
        assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []


def test_kill_between_checkpoint_upload_and_its_record_resumes_from_the_recorded_epoch(stacks):
    """SIGKILL after epoch 2's checkpoint reached the store but before the database recorded it: the next
    attempt must resume from what the database says (epoch 1) and the metrics series must stay whole."""
    stack = stacks(workers=0)
    stack.start_worker(failpoint="before_checkpoint_record:2")
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_spec(4, "ckpt-window")).json()["id"]
        wait_until(lambda: stack.workers[0].poll() is not None, 180, "the failpoint to kill the worker")
        row = stack.job_row(job_id)
        assert row["checkpoint_epoch"] == 1, row
        stack.start_worker()
        job = wait_status(client, job_id, timeout=240)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2
        log = messages(client, job_id)
        assert any(m.startswith("Attempt 2") and m.endswith("resuming after epoch 1.") for m in log), log
        assert metric_epochs(client, job_id) == [1, 2, 3, 4]
        assert stack.artifact_folders(job_id) == ["attempt-2"]


def test_kill_between_artifact_upload_and_finish_leaves_one_set_of_artifacts(stacks):
    """SIGKILL after every artifact of attempt 1 is in the store but before `succeeded` is committed: attempt 2
    finishes the job, and the store keeps one set (attempt 1's orphaned uploads are removed)."""
    stack = stacks(workers=0)
    stack.start_worker(failpoint="before_finish")
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_spec(2, "finish-window")).json()["id"]
        wait_until(lambda: stack.workers[0].poll() is not None, 180, "the failpoint to kill the worker")
        assert stack.artifact_folders(job_id) == ["attempt-1"]  # uploaded, never recorded
        assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
        stack.start_worker()
        job = wait_status(client, job_id, timeout=240)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        assert sorted(a["name"] for a in artifacts) == sorted({a["name"] for a in artifacts})
        assert stack.artifact_folders(job_id) == ["attempt-2"]


def test_job_over_the_wall_clock_limit_fails_with_timeout(stacks):
    """JOB_TIMEOUT_S bounds one attempt: a long job is stopped by the worker and fails with `timeout`."""
    stack = stacks(workers=1, JOB_TIMEOUT_S=6)
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_spec(200, "too-long")).json()["id"]
        job = wait_status(client, job_id, timeout=120)
        assert job["status"] == "failed" and job["error"]["code"] == "timeout"
        assert "job_timeout_s" in job["error"]["message"]
        assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
        # The worker is free for the next job.
        assert wait_status(client, client.post("/v1/jobs", json=quick_spec()).json()["id"], timeout=90)[
            "status"] == "succeeded"  # fmt: skip
