"""Faults with real processes: a worker killed (SIGKILL) or stopped (SIGTERM) mid-job resumes from its
checkpoint on the next worker; cancellation is prompt. More faults: the other test_faults_*.py files."""

import signal
import time

import pytest

from tests.helpers import wait_job
from tests.integration import faults_support as support

stacks = support.stacks  # the fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def slow_spec(epochs: int, name: str = "slow") -> dict:
    """A supervised job of a few seconds per epoch on this 2-core machine."""
    return {"name": name, "student": {"architecture": {"name": "cnn1d", "config": {"channels": 48}}},
            "train_file": "builtin:mnist1d", "method": {"type": "supervised"},
            "hyperparameters": {"epochs": epochs, "batch_size": 32, "seed": 1}}  # fmt: skip


def wait_epochs(client, job_id: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]) >= n:
            return
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.2)
    raise TimeoutError(f"{job_id} did not reach epoch {n}")


def test_kill_9_mid_job_resumes_from_checkpoint_with_one_set_of_artifacts(client, service):
    job_id = client.post("/v1/jobs", json=slow_spec(6, "kill-9")).json()["id"]
    wait_epochs(client, job_id, 2)
    victim = next(w for w in service.workers if w.poll() is None)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = len(client.get(f"/v1/jobs/{job_id}/metrics").json()["data"])
    service.start_worker()
    job = wait_job(client, job_id, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    events = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]]
    resumed = [m for m in events if m.startswith("Attempt 2") and "resuming after epoch" in m]
    assert resumed, events
    resume_epoch = int(resumed[0].rsplit(" ", 1)[1].rstrip("."))
    assert resume_epoch >= min(done_before, 2) - 1 and resume_epoch >= 1
    assert [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]] == list(range(1, 7))
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert sorted(a["name"] for a in artifacts) == sorted(set(a["name"] for a in artifacts))
    stored = list((service.data_dir / "store" / "jobs" / job_id).glob("attempt-*"))
    assert [p.name for p in stored] == ["attempt-2"]


def test_cancel_queued_and_running(client, service):
    running = client.post("/v1/jobs", json=slow_spec(30, "cancel-running")).json()["id"]
    wait_job(client, running, until={"running"}, timeout=120)
    queued = client.post("/v1/jobs", json=slow_spec(30, "cancel-queued")).json()["id"]
    r = client.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    wait_epochs(client, running, 1)
    t0 = time.monotonic()
    assert client.post(f"/v1/jobs/{running}/cancel").status_code == 200
    job = wait_job(client, running, timeout=30)
    assert job["status"] == "cancelled" and time.monotonic() - t0 < 10
    assert client.get(f"/v1/jobs/{running}/artifacts").json()["data"] == []
    # The worker is free again: a tiny job runs next.
    quick = {"student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [8]}}},
             "train_file": "builtin:digits", "method": {"type": "supervised"}, "hyperparameters": {"epochs": 1}}  # fmt: skip
    assert wait_job(client, client.post("/v1/jobs", json=quick).json()["id"], timeout=60)["status"] == "succeeded"


def test_sigterm_mid_job_hands_the_job_back_and_the_next_worker_resumes(stacks):
    """Warm shutdown: the worker stops the job at its next step, hands it back (queued, lease cleared,
    re-published, attempt not charged) and exits; the next worker resumes from the last checkpoint."""
    stack = stacks(workers=1)
    first = stack.workers[0]
    stack.wait_worker_ready(first)
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_spec(5, "sigterm")).json()["id"]
        wait_epochs(client, job_id, 2)
        support.wait_until(lambda: (stack.job_row(job_id)["checkpoint_epoch"] or 0) >= 2, 60, "checkpoint 2")
        # A message the reconciler published before the worker claimed the job would still wait in the queue.
        queued_before = stack.queue_length()
        t0 = time.monotonic()
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, stack.worker_log(first)[-3000:]
        stopped_s = time.monotonic() - t0
        assert stopped_s < 15, stopped_s  # within a step or two, not at the end of the job
        row = stack.job_row(job_id)
        assert row["status"] == "queued" and row["lease_until"] is None and row["worker_id"] is None, row
        assert row["attempts"] == 1 and row["max_attempts"] == 4  # a shutdown is not a failed attempt
        checkpoint_epoch = row["checkpoint_epoch"]
        assert checkpoint_epoch >= 2
        assert stack.queue_length() == queued_before + 1  # re-published once, by the hand-back alone
        log = support.messages(client, job_id)
        assert any(m.startswith("Attempt 1 handed back") for m in log), log
        assert "Job cancelled." not in log and client.get(f"/v1/jobs/{job_id}").json()["error"] is None

        stack.start_worker()
        job = wait_job(client, job_id, timeout=240)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2 and job["error"] is None
        log = support.messages(client, job_id)
        assert f"resuming after epoch {checkpoint_epoch}." in next(m for m in log if m.startswith("Attempt 2")), log
        assert support.metric_epochs(client, job_id) == [1, 2, 3, 4, 5]
        assert stack.artifact_folders(job_id) == ["attempt-2"]
