"""Acceptance: upload data and a teacher, distil with `kd`, download, and check the ONNX student's accuracy."""

import hashlib
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import digits_arrays, digits_files, kd_spec, train_teacher, upload, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TEACHER_ARCH = {"name": "mlp", "config": {"hidden_sizes": [128, 128]}}


@pytest.fixture(scope="module")
def setup(service, api_key, tmp_path_factory):
    """Data and a teacher trained here, uploaded, and one succeeded kd job."""
    folder = tmp_path_factory.mktemp("e2e")
    train, val = digits_files(folder)
    x, y = digits_arrays()
    teacher_path = train_teacher(folder / "teacher.safetensors", TEACHER_ARCH, x[:1400], y[:1400], epochs=20)
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        ids = {name: upload(c, path, purpose).json()["id"]
               for name, path, purpose in [("train", train, "dataset"), ("val", val, "dataset"),
                                           ("teacher", teacher_path, "teacher")]}  # fmt: skip
        spec = kd_spec(ids["train"], {"architecture": TEACHER_ARCH, "weights_file": ids["teacher"]},
                       validation=ids["val"], epochs=8)  # fmt: skip
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        job = wait_job(c, r.json()["id"], timeout=240)
    return {"ids": ids, "job": job, "val": val, "folder": folder}


def test_kd_job_succeeds_and_onnx_matches_reported_accuracy(client, setup, tmp_path):
    job = setup["job"]
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"]["fraction"] == 1.0
    listing = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    names = {a["name"] for a in listing}
    assert {"model.safetensors", "model.onnx", "metrics.json", "model_card.md"} <= names
    onnx_meta = next(a for a in listing if a["name"] == "model.onnx")
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == onnx_meta["sha256"]
    (tmp_path / "model.onnx").write_bytes(r.content)

    import onnxruntime as ort

    data = np.load(setup["val"], allow_pickle=False)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
    onnx_accuracy = float((logits.argmax(1) == data["y"]).mean())
    reported = job["metrics"]["val_accuracy"]
    assert abs(onnx_accuracy - reported) <= 0.01, (onnx_accuracy, reported)
    assert reported > 0.75  # far above the 10% of chance after 8 short epochs


def test_training_curves_png_is_an_artifact_and_downloads(client, setup):
    job = setup["job"]
    listing = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    meta = listing["training_curves.png"]
    assert meta["content_type"] == "image/png"
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/training_curves.png")
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r.content) == meta["bytes"] and hashlib.sha256(r.content).hexdigest() == meta["sha256"]
    with Image.open(io.BytesIO(r.content)) as img:
        img.load()
        assert img.format == "PNG" and img.size == (1100, 420)
    card = client.get(f"/v1/jobs/{job['id']}/artifacts/model_card.md").text
    assert "](training_curves.png)" in card


def test_metrics_events_and_summary(client, setup):
    job = setup["job"]
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [m["epoch"] for m in metrics["data"]] == list(range(1, 9))
    row = metrics["data"][-1]["data"]
    assert {"train_loss", "losses", "val_accuracy", "seconds"} <= row.keys()
    summary = metrics["summary"]
    for key in ("val_accuracy", "teacher_accuracy", "student_params", "teacher_params", "agreement",
                "compression_ratio", "speedup", "student_latency_ms", "phases"):  # fmt: skip
        assert key in summary, key
    assert summary["compression_ratio"] > 1
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert events[0]["message"].startswith("Job created") and events[-1]["message"] == "Job succeeded."
    assert any(e["type"] == "metrics" for e in events)
    page = client.get(f"/v1/jobs/{job['id']}/events", params={"after": events[0]["id"], "limit": 2}).json()
    assert page["data"][0]["id"] == events[1]["id"] and page["has_more"]


def test_download_supports_range_and_etag(client, setup):
    job_id = setup["job"]["id"]
    full = client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors")
    etag = full.headers["etag"]
    part = client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers={"Range": "bytes=8-17"})
    assert part.status_code == 206 and part.content == full.content[8:18]
    assert part.headers["content-range"] == f"bytes 8-17/{len(full.content)}"
    assert client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors",
                      headers={"If-None-Match": etag}).status_code == 304  # fmt: skip
    bad = client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers={"Range": "bytes=999999999-"})
    assert bad.status_code == 416


def test_cancel_of_finished_job_is_409(client, setup):
    r = client.post(f"/v1/jobs/{setup['job']['id']}/cancel")
    assert r.status_code == 409 and r.json()["type"].endswith("job_finished")


def test_other_tenant_sees_nothing_of_the_job(other_client, setup):
    job_id = setup["job"]["id"]
    for path in ["", "/events", "/metrics", "/artifacts", "/artifacts/model.onnx"]:
        r = other_client.get(f"/v1/jobs/{job_id}{path}")
        assert r.status_code == 404, path
        assert "tenant" not in r.text
    assert other_client.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert job_id not in other_client.get("/v1/jobs").text
    spec = kd_spec("builtin:digits", {"from_job": job_id})
    assert other_client.post("/v1/jobs", json=spec).status_code == 404
    teacher_file = setup["ids"]["teacher"]
    spec = kd_spec("builtin:digits", {"architecture": TEACHER_ARCH, "weights_file": teacher_file})
    r = other_client.post("/v1/jobs", json=spec)
    assert r.status_code == 404 and "tenant" not in r.text
    for status in ("succeeded", "failed", "queued"):
        assert job_id not in other_client.get("/v1/jobs", params={"status": status}).text
    assert teacher_file not in other_client.get("/v1/files", params={"purpose": "teacher"}).text


def test_from_job_teacher_and_list_filters(client, setup):
    ids = setup["ids"]
    spec = kd_spec(ids["train"], {"from_job": setup["job"]["id"]}, validation=ids["val"], epochs=2)
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["teachers"][0]["architecture"]["name"] == "mlp"
    job = wait_job(client, r.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job["error"]
    succeeded = client.get("/v1/jobs", params={"status": "succeeded", "limit": 1}).json()
    assert succeeded["data"][0]["id"] == job["id"] and succeeded["has_more"] is True


def test_weights_that_do_not_match_the_architecture_fail_naming_the_key(client, setup):
    ids = setup["ids"]
    wrong = {"architecture": {"name": "mlp", "config": {"hidden_sizes": [64, 128]}}, "weights_file": ids["teacher"]}
    r = client.post("/v1/jobs", json=kd_spec(ids["train"], wrong, epochs=1))
    job = wait_job(client, r.json()["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "weights_mismatch"
    assert "weight" in job["error"]["message"] and "'" in job["error"]["message"]
    assert client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"] == []


def test_non_finite_loss_fails_cleanly(client, setup, tmp_path):
    x, y = digits_arrays()
    x = x[:300].copy()
    x[::7, 3] = np.inf  # in the training rows whatever the validation split
    path = tmp_path / "inf.npz"
    np.savez(path, x=x, y=y[:300])
    data_id = upload(client, path, "dataset").json()["id"]
    spec = {"student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [16]}}}, "train_file": data_id,
            "method": {"type": "supervised"}, "hyperparameters": {"epochs": 3}}  # fmt: skip
    job = wait_job(client, client.post("/v1/jobs", json=spec).json()["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "non_finite_loss"
