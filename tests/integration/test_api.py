"""The REST contract over real HTTP against uvicorn + PostgreSQL + Redis: auth, files, validation, idempotency."""

import json
import struct

import numpy as np
import pytest

from tests.helpers import digits_files, upload

pytestmark = pytest.mark.integration
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_files(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def dataset_id(service, api_key, digits):
    import httpx

    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {api_key}"}) as c:
        r = upload(c, digits[0], "dataset")
        assert r.status_code == 201, r.text
        return r.json()["id"]


def supervised_spec(train: str, **overrides) -> dict:
    spec = {"student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [16]}}}, "train_file": train,
            "method": {"type": "supervised"}, "hyperparameters": {"epochs": 1}}  # fmt: skip
    spec.update(overrides)
    return spec


def test_missing_and_invalid_key_are_401_problems(service):
    import httpx

    r = httpx.get(f"{service.base_url}/v1/jobs")
    assert r.status_code == 401 and r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["status"] == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(f"{service.base_url}/v1/jobs", headers={"Authorization": "Bearer dsk_not-a-real-key"})
    assert r.status_code == 401 and r.json()["detail"] == "Invalid API key."


def test_upload_dataset_then_read_list_delete(client, digits):
    r = upload(client, digits[1], "dataset")
    assert r.status_code == 201, r.text
    file = r.json()
    assert file["object"] == "file" and file["id"].startswith("file_") and file["format"] == "npz"
    assert file["bytes"] == digits[1].stat().st_size and len(file["sha256"]) == 64
    import hashlib

    assert file["sha256"] == hashlib.sha256(digits[1].read_bytes()).hexdigest()
    assert client.get(f"/v1/files/{file['id']}").json() == file
    assert file["id"] in [f["id"] for f in client.get("/v1/files", params={"limit": 100}).json()["data"]]
    assert client.delete(f"/v1/files/{file['id']}").status_code == 204
    assert client.get(f"/v1/files/{file['id']}").status_code == 404


def test_file_pagination_is_newest_first_with_cursor(client, digits):
    ids = [upload(client, digits[1], "dataset").json()["id"] for _ in range(3)]
    page = client.get("/v1/files", params={"limit": 2, "purpose": "dataset"}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    rest = client.get("/v1/files", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert rest["data"][0]["id"] == ids[0]


def test_teacher_must_be_safetensors(client, digits, tmp_path):
    r = upload(client, digits[1], "teacher")
    assert r.status_code == 422 and "safetensors" in r.json()["detail"]
    assert r.json()["errors"][0]["loc"] == ["body", "file"]


@pytest.mark.parametrize("case", ["truncated", "header_too_long", "offsets_out_of_range", "overlap", "dtype_size"])
def test_malformed_safetensors_rejected(client, tmp_path, case):
    def file_with(header: dict, data: bytes, declared_len: int | None = None) -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", declared_len if declared_len is not None else len(raw)) + raw + data

    w = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    blobs = {
        "truncated": file_with({"w": w}, b"\0" * 8),
        "header_too_long": file_with({"w": w}, b"\0" * 16, declared_len=10**9),
        "offsets_out_of_range": file_with({"w": {**w, "data_offsets": [0, 4096]}}, b"\0" * 16),
        "overlap": file_with({"a": w, "b": {**w, "data_offsets": [8, 24]}}, b"\0" * 24),
        "dtype_size": file_with({"w": {**w, "dtype": "F64"}}, b"\0" * 16),
    }
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blobs[case])
    r = upload(client, path, "teacher")
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)


def test_npz_with_objects_is_refused_and_never_unpickled(client, tmp_path):
    marker = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([Bomb()], dtype=object), y=np.array([0]))
    r = upload(client, path, "dataset")
    assert r.status_code == 422 and "objects" in r.json()["detail"]
    assert not marker.exists()


def test_pickle_renamed_safetensors_refused(client, tmp_path):
    import pickle

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    r = upload(client, path, "teacher")
    assert r.status_code == 422 and "pickle" in r.json()["detail"]


def test_dataset_x_y_length_mismatch_rejected(client, tmp_path):
    path = tmp_path / "mismatch.npz"
    np.savez(path, x=np.zeros((10, 4), np.float32), y=np.zeros(9, np.int64))
    r = upload(client, path, "dataset")
    assert r.status_code == 422 and "'y' has 9 rows" in r.json()["detail"]


def test_oversized_upload_is_413_with_and_without_content_length(client, service, tmp_path):
    limit = int(service.env["MAX_UPLOAD_BYTES"])
    path = tmp_path / "big.npz"
    path.write_bytes(b"\0" * (limit + 200_000))
    r = upload(client, path, "dataset")
    assert r.status_code == 413 and r.json()["status"] == 413

    boundary = "XyZboundary"

    def chunked_body():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\ndataset\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\n'.encode()
        for _ in range(limit // (1 << 20) + 2):
            yield b"\0" * (1 << 20)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/files", content=chunked_body(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert r.status_code == 413
    leftovers = list((service.data_dir / "tmp").glob("upload-*"))
    assert leftovers == []


def test_other_tenant_gets_404_for_files(client, other_client, dataset_id):
    assert other_client.get(f"/v1/files/{dataset_id}").status_code == 404
    assert other_client.delete(f"/v1/files/{dataset_id}").status_code == 404
    assert dataset_id not in json.dumps(other_client.get("/v1/files").json())
    r = other_client.post("/v1/jobs", json=supervised_spec(dataset_id))
    assert r.status_code == 404 and dataset_id in r.json()["detail"]


def test_unknown_method_and_unknown_field_are_422_naming_them(client, dataset_id):
    r = client.post("/v1/jobs", json=supervised_spec(dataset_id, method={"type": "telepathy"}))
    assert r.status_code == 422
    assert any(e["loc"][:2] == ["body", "method"] for e in r.json()["errors"])
    assert "telepathy" in json.dumps(r.json())
    spec = supervised_spec(dataset_id)
    spec["hyperparameters"]["epoks"] = 3
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "hyperparameters", "epoks"]
    r = client.post("/v1/jobs", json=supervised_spec("builtin:imagenet"))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "train_file"]
    r = client.post("/v1/jobs", json=supervised_spec(dataset_id, teachers=[{"from_job": "job_" + "0" * 22}]))
    assert r.status_code == 422 and "takes no teachers" in r.json()["detail"]


def test_idempotency_key_same_body_same_job_other_body_422(client, dataset_id):
    spec = supervised_spec(dataset_id, name="idem")
    first = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k-123"})
    assert first.status_code == 201, first.text
    again = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k-123"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = client.post("/v1/jobs", json={**spec, "name": "different"}, headers={"Idempotency-Key": "k-123"})
    assert other.status_code == 422 and other.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]


def test_job_defaults_are_filled_and_ids_prefixed(client, dataset_id):
    r = client.post("/v1/jobs", json=supervised_spec(dataset_id))
    assert r.status_code == 201
    job = r.json()
    assert job["id"].startswith("job_") and job["object"] == "distillation.job"
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["spec"]["hyperparameters"]["batch_size"] == 128 and job["spec"]["validation_file"] is None
    assert job["created_at"].endswith("Z") or job["created_at"].endswith("+00:00")


def test_openapi_lists_every_route(service):
    import httpx

    paths = httpx.get(f"{service.base_url}/openapi.json").json()["paths"]
    for path in ["/v1/files", "/v1/files/{file_id}", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                 "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/artifacts",
                 "/v1/jobs/{job_id}/artifacts/{name}", "/healthz", "/readyz"]:  # fmt: skip
        assert path in paths
    assert "multipart/form-data" in paths["/v1/files"]["post"]["requestBody"]["content"]


def test_readyz_checks_database_broker_store(service):
    import httpx

    r = httpx.get(f"{service.base_url}/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}


def test_prometheus_metrics_report_jobs_and_http_latency(client, service, dataset_id):
    import httpx

    client.get("/v1/jobs")
    text = httpx.get(f"{service.base_url}/metrics").text
    assert 'distill_jobs{status="queued"}' in text and "distill_queue_depth" in text
    assert 'distill_http_request_duration_seconds_count{method="GET",route="/v1/jobs",status="200"}' in text


def test_async_reads_match_the_orm_view(client, postgres_url):
    """GET /v1/jobs/{id} and list pages go through the async pool on PostgreSQL; they must show what the ORM shows."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.api.routes.jobs import job_public
    from app.db import make_engine
    from app.ids import new_id
    from app.models import Job, Tenant, utcnow

    engine = make_engine(postgres_url)
    with Session(engine) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == "tenant-a"))
        # Terminal jobs written directly, so no worker changes them between the two reads.
        jobs = [Job(id=new_id("job"), tenant_id=tenant_id, name=f"parity-{i}", status=status,
                    spec={"method": {"type": "kd"}, "n": i}, job_metadata={"team": "ml", "i": str(i)},
                    started_at=utcnow(), finished_at=utcnow(), attempts=1, progress={"epoch": 2},
                    summary={"student": {"accuracy": 0.5}} if status == "succeeded" else None,
                    error={"code": "oom", "message": "x"} if status == "failed" else None)
                for i, status in enumerate(["succeeded", "failed", "succeeded"])]  # fmt: skip
        session.add_all(jobs)
        session.commit()
        orm_view = {j.id: job_public(session.get(Job, j.id)).model_dump(mode="json") for j in jobs}
    engine.dispose()

    for job_id, view in orm_view.items():
        assert client.get(f"/v1/jobs/{job_id}").json() == view
    # No job of this tenant is newer than these three: the first page is exactly them, newest first.
    page = client.get("/v1/jobs", params={"limit": 3}).json()["data"]
    assert page == [orm_view[j] for j in sorted(orm_view, reverse=True)]
    newest = max(orm_view)
    r = client.get("/v1/jobs", params={"status": "succeeded", "limit": 1, "after": newest}).json()
    succeeded_older = sorted((j for j in orm_view if orm_view[j]["status"] == "succeeded" and j < newest), reverse=True)
    assert r["data"][0] == orm_view[succeeded_older[0]]
    assert client.get("/v1/jobs/job_doesnotexist").status_code == 404

    # Those reads went through the API's async pool, not the ORM sessions: its named connections ran them.
    import psycopg

    from app.db import READ_POOL_NAME

    with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
        last = [r[0] for r in conn.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            (READ_POOL_NAME,))]  # fmt: skip
    assert any("FROM jobs" in q for q in last), last
