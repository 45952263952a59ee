"""`distill jobs wait` and `client.events.stream` against the real API and worker: the wait ends as soon as the
job does, with its exit status, and a dropped connection resumes without a missed or repeated event."""

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from datetime import datetime

import pytest

from app.client import DistillClient
from tests.integration.faults_support import slow_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def quick_spec(epochs: int) -> dict:
    return {"name": "wait", "student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [32]}}},
            "train_file": "builtin:digits", "method": {"type": "supervised"},
            "hyperparameters": {"epochs": epochs}}  # fmt: skip


class DroppingProxy:
    """A TCP forwarder in front of the API whose open connections can be cut, as a flaky network would."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.pairs.append((downstream, upstream))
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def drop_all(self) -> None:
        for pair in self.pairs:
            for s in pair:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        self.drop_all()


def run_wait(service, api_key: str, job_id: str) -> subprocess.Popen:
    env = {**os.environ, "DISTILL_URL": service.base_url, "DISTILL_API_KEY": api_key, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "jobs", "wait", job_id],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_jobs_wait_returns_as_soon_as_the_job_ends(service, api_key, client):
    job_id = client.post("/v1/jobs", json=quick_spec(epochs=25)).json()["id"]
    proc = run_wait(service, api_key, job_id)
    _, stderr = proc.communicate(timeout=240)
    exited = time.time()
    assert proc.returncode == 0, stderr
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    finished = datetime.fromisoformat(job["finished_at"]).timestamp()
    # The stream reads the events table every 0.5 s; polling once a second would add up to a second more.
    assert exited - finished < 3.0, (exited, finished)
    assert "Attempt 1 started" in stderr and "Job succeeded." in stderr and f"{job_id} succeeded" in stderr
    assert "polling" not in stderr  # it followed the stream, no fallback


def test_jobs_wait_exits_non_zero_when_the_job_is_cancelled(service, api_key, client):
    job_id = client.post("/v1/jobs", json=slow_spec(epochs=30, name="to-cancel")).json()["id"]
    proc = run_wait(service, api_key, job_id)
    with DistillClient(service.base_url, api_key=api_key) as sdk:
        for event in sdk.events.stream(job_id):
            if event["type"] == "metrics":  # training is under way
                break
        sdk.jobs.cancel(job_id)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert f"{job_id} cancelled" in stderr


def test_a_dropped_stream_resumes_without_missing_or_repeating_events(service, api_key, client):
    proxy = DroppingProxy(int(service.base_url.rsplit(":", 1)[1]))
    job_id = client.post("/v1/jobs", json=slow_spec(epochs=3, name="drop")).json()["id"]
    seen, status_at_drop = [], None
    try:
        with DistillClient(f"http://127.0.0.1:{proxy.port}", api_key=api_key) as sdk:
            for event in sdk.events.stream(job_id):
                seen.append(event)
                if event["type"] == "metrics" and status_at_drop is None:
                    status_at_drop = client.get(f"/v1/jobs/{job_id}").json()["status"]
                    proxy.drop_all()
    finally:
        proxy.close()
    assert status_at_drop == "running"  # the drop happened mid-job, with events still to come
    assert len(proxy.pairs) >= 2  # it did reconnect
    assert seen[-1] == {"id": None, "type": "end", "data": {"status": "succeeded"}}
    logged = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert [e["id"] for e in seen[:-1]] == [e["id"] for e in logged]
    assert sum(e["type"] == "metrics" for e in seen) == 3
