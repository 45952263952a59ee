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

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_distill_up_then_demo_end_to_end(tmp_path):
    """`distill up` on a bare folder, then `distill demo`: teacher, KD student and baseline, downloaded."""
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
        demo = subprocess.run(
            [sys.executable, "-m", "app.cli", "demo", "--out", str(tmp_path / "demo")], cwd=tmp_path,
            env={**env, "DISTILL_URL": f"http://127.0.0.1:{port}", "DISTILL_API_KEY": key},
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "KD gain over the baseline" in demo.stdout
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:  # fmt: skip
            jobs = client.get("/v1/jobs").json()["data"]
            kd = next(j for j in jobs if j["spec"]["method"]["type"] == "kd")
            assert kd["status"] == "succeeded" and kd["spec"]["teachers"][0]["from_job"]
            # The demo's promise: the distilled student beats the same-budget baseline.
            assert kd["metrics"]["kd_gain"] > 0, kd["metrics"]
        for who in ("teacher", "student"):
            assert {p.name for p in (tmp_path / "demo" / who).iterdir()} >= {"model.onnx", "model.safetensors",
                                                                            "metrics.json", "model_card.md"}  # fmt: skip
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
