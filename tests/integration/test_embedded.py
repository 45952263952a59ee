"""Acceptance on the embedded default: SQLite + local store + the SQLite Celery transport, via `distill up`."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_http
from tests.helpers import kd_spec, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_distill_up_runs_a_kd_job_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "STORAGE_URL", "DATA_DIR", "DISTILL_API_KEY")}  # fmt: skip
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    port = free_port()
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=proc)
        key_file = tmp_path / "var" / "local-api-key"
        deadline = time.monotonic() + 10
        while not key_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        key = key_file.read_text().strip()
        assert (tmp_path / "var" / "distill.db").exists()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:  # fmt: skip
            teacher_spec = {"student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [64]}}},
                            "train_file": "builtin:digits", "method": {"type": "supervised"},
                            "hyperparameters": {"epochs": 5}}  # fmt: skip
            teacher = wait_job(client, client.post("/v1/jobs", json=teacher_spec).json()["id"], timeout=120)
            assert teacher["status"] == "succeeded", teacher["error"]
            spec = kd_spec("builtin:digits", {"from_job": teacher["id"]}, epochs=3)
            job = wait_job(client, client.post("/v1/jobs", json=spec).json()["id"], timeout=120)
            assert job["status"] == "succeeded", job["error"]
            names = [a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]]
            assert "model.onnx" in names
            onnx = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx")
            assert onnx.status_code == 200 and len(onnx.content) > 1000
        assert list(Path(tmp_path / "var" / "store" / "jobs").iterdir())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
