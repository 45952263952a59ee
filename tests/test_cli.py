"""The `distill` CLI and the SDK, without a running service.

Database commands run against a temporary SQLite file; HTTP is an httpx.MockTransport (the real-HTTP tests
live in tests/integration). Process supervision is exercised with tiny Python child processes.
"""

import hashlib
import json
import os
import stat
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from app import cli
from app.client import DistillAPIError, DistillClient, DistillIntegrityError, StreamUnavailable

runner = CliRunner()
JOB_ID = "job_" + "a" * 22


def _clear_caches() -> None:
    from app.db import get_engine, get_sessionmaker
    from app.settings import get_settings

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_sessionmaker.cache_clear()
    get_engine.cache_clear()
    get_settings.cache_clear()


@pytest.fixture()
def sqlite_db(tmp_path, monkeypatch):
    """Point Settings at a fresh SQLite file in a temporary data dir, migrated to head."""
    from app.db import upgrade_head

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    _clear_caches()
    upgrade_head(url)
    yield url
    _clear_caches()


def _mock(handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def _problem(status: int, detail: str, errors=None, code="invalid_request") -> httpx.Response:
    body = {"type": f"https://distill.dev/problems/{code}", "title": "Unprocessable Content", "status": status,
            "detail": detail}  # fmt: skip
    if errors is not None:
        body["errors"] = errors
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


def _job(status: str, **extra) -> dict:
    job = {"id": JOB_ID, "object": "distillation.job", "name": "t", "status": status,
           "spec": {"method": {"type": "kd"}, "student": {"architecture": {"name": "mlp"}}},
           "created_at": "2026-01-01T00:00:00Z", "started_at": None, "finished_at": None, "attempts": 1,
           "progress": {"epoch": 3, "epochs": 10, "fraction": 0.3}, "metrics": None, "error": None,
           "metadata": {}}  # fmt: skip
    job.update(extra)
    return job


# ---- help and database commands -------------------------------------------------------------------


def test_help_lists_every_command():
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0, result.output
    for name in ("up", "api", "worker", "migrate", "keys", "files", "jobs", "demo", "convert"):
        assert name in result.output
    for group, subs in {"jobs": ("create", "list", "get", "cancel", "wait", "download", "events"),
                        "files": ("upload", "list"), "keys": ("create",)}.items():  # fmt: skip
        result = runner.invoke(cli.app, [group, "--help"])
        assert result.exit_code == 0, result.output
        for sub in subs:
            assert sub in result.output
            assert runner.invoke(cli.app, [group, sub, "--help"]).exit_code == 0


def test_keys_create_makes_a_working_key(sqlite_db):
    from app.auth import tenant_for_key
    from app.db import session_scope

    first = runner.invoke(cli.app, ["keys", "create", "--tenant", "acme"])
    second = runner.invoke(cli.app, ["keys", "create", "--tenant", "acme"])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    key1, key2 = first.stdout.strip(), second.stdout.strip()
    assert key1.startswith("dsk_") and key1 != key2
    with session_scope() as session:
        tenant1 = tenant_for_key(session, key=key1)
        tenant2 = tenant_for_key(session, key=key2)
        assert tenant_for_key(session, key="dsk_nope") is None
    assert tenant1 is not None and tenant1 == tenant2  # same tenant, two keys


def test_keys_create_rejects_an_empty_tenant(sqlite_db):
    result = runner.invoke(cli.app, ["keys", "create", "--tenant", "  "])
    assert result.exit_code != 0


def test_migrate_brings_a_fresh_database_to_head(tmp_path, monkeypatch):
    import sqlite3

    db = tmp_path / "fresh.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    _clear_caches()
    try:
        result = runner.invoke(cli.app, ["migrate"])
        assert result.exit_code == 0, result.output
        with sqlite3.connect(db) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"alembic_version", "tenants", "api_keys", "files", "jobs", "artifacts"} <= tables
    finally:
        _clear_caches()


def test_local_key_is_created_once_with_mode_0600(sqlite_db, tmp_path):
    from app.auth import tenant_for_key
    from app.db import session_scope

    key, created = cli.ensure_local_key(tmp_path)
    assert created
    path = tmp_path / cli.LOCAL_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key
    again, created_again = cli.ensure_local_key(tmp_path)
    assert (again, created_again) == (key, False)
    with session_scope() as session:
        assert tenant_for_key(session, key=key) is not None
    path.write_text("dsk_from_a_deleted_database\n")  # stale: replaced by a key that works
    fresh, created_fresh = cli.ensure_local_key(tmp_path)
    assert created_fresh and fresh != key and path.read_text().strip() == fresh


def test_cli_reads_the_local_key_when_no_env_key(sqlite_db, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_API_KEY", raising=False)
    (tmp_path / cli.LOCAL_KEY_FILE).write_text("dsk_local\n")
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers.get("authorization")
        return httpx.Response(200, json={"object": "list", "data": [], "has_more": False})

    monkeypatch.setattr(cli, "_transport", _mock(handler))
    result = runner.invoke(cli.app, ["jobs", "list"])
    assert result.exit_code == 0, result.output
    assert seen["auth"] == "Bearer dsk_local"


# ---- SDK ------------------------------------------------------------------------------------------


def test_api_error_shows_detail_and_field_errors():
    errors = [{"loc": ["body", "method", "kd", "temperature"], "msg": "Input should be greater than 0",
               "type": "greater_than"},
              {"loc": ["body", "student"], "msg": "Field required", "type": "missing"}]  # fmt: skip

    def handler(request):
        return _problem(422, "body.method.kd.temperature: Input should be greater than 0", errors)

    with (
        DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client,
        pytest.raises(DistillAPIError) as info,
    ):
        client.jobs.create({"method": {"type": "kd", "temperature": -1}})
    e = info.value
    assert e.status == 422 and e.code == "invalid_request"
    text = str(e)
    assert text.startswith(
        "HTTP 422 Unprocessable Content: body.method.kd.temperature: Input should be greater"
    )
    assert "  - body.student: Field required" in text
    assert text.count("greater than 0") == 1  # the first error is the detail; not repeated
    assert e.errors[1]["loc"] == ["body", "student"]


def test_api_error_without_a_problem_body():
    def handler(request):
        if request.url.path == "/healthz":
            return httpx.Response(502, text="<html>bad gateway</html>")
        return _problem(404, f"No job with id {JOB_ID!r}.", code="not_found")

    with DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client:
        with pytest.raises(DistillAPIError) as not_found:
            client.jobs.get(JOB_ID)
        with pytest.raises(DistillAPIError) as bad_gateway:
            client.health()
    assert not_found.value.status == 404 and not_found.value.code == "not_found"
    assert "No job with id" in str(not_found.value) and "\n" not in str(not_found.value)
    assert bad_gateway.value.status == 502 and bad_gateway.value.code is None
    assert "bad gateway" in str(bad_gateway.value)


def test_sdk_sends_the_key_and_follows_cursor_pages():
    ids = [f"job_{i:022d}" for i in range(7)]
    calls = []

    def handler(request):
        assert request.headers["authorization"] == "Bearer sk"
        calls.append(dict(request.url.params))
        after = request.url.params.get("after")
        limit = int(request.url.params["limit"])
        start = ids.index(after) + 1 if after else 0
        page = ids[start : start + limit]
        return httpx.Response(200, json={"object": "list", "data": [{"id": i} for i in page],
                                         "has_more": start + limit < len(ids)})  # fmt: skip

    with DistillClient("http://svc", api_key="sk", transport=_mock(handler)) as client:
        assert [j["id"] for j in client.jobs.list(status="queued", limit=None)] == ids
        assert all(c["status"] == "queued" for c in calls)
        calls.clear()
        assert [j["id"] for j in client.jobs.list(limit=3)] == ids[:3]
        assert calls == [{"limit": "3"}]


def test_sdk_api_key_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("DISTILL_API_KEY", "from-env")
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"status": "ok"})

    with DistillClient("http://svc", transport=_mock(handler)) as client:
        client.health()
    with DistillClient("http://svc", api_key="explicit", transport=_mock(handler)) as client:
        client.health()
    assert seen == ["Bearer from-env", "Bearer explicit"]


def test_upload_streams_the_file_in_chunks(tmp_path):
    path = tmp_path / "weights.safetensors"
    payload = os.urandom(300_000)
    path.write_bytes(payload)
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        seen["ok"] = (
            payload in body and b'name="purpose"' in body and b'filename="weights.safetensors"' in body
        )
        seen["length"] = int(request.headers["content-length"])
        return httpx.Response(201, json={"id": "file_" + "0" * 22, "purpose": "teacher"})

    progress = []
    with DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client:
        f = client.files.upload(
            path, "teacher", on_progress=lambda done, total: progress.append((done, total))
        )
    assert f["purpose"] == "teacher" and seen["ok"]
    assert seen["length"] > len(payload)  # sized up front from the file, not chunked
    # httpx pulled the file through the SDK's reader in small chunks, never in one read
    steps = [b - a for (a, _), (b, _) in zip([(0, 0), *progress], progress, strict=False)]
    assert len(progress) > 2 and max(steps) <= 64 * 1024 and progress[-1] == (len(payload), len(payload))


def _artifact_handler(files: dict[str, bytes], listed_sha: dict[str, str] | None = None):
    def handler(request):
        path = request.url.path
        if path.endswith("/artifacts"):
            data = [{"name": n, "bytes": len(b), "sha256": (listed_sha or {}).get(n, hashlib.sha256(b).hexdigest()),
                     "content_type": "application/octet-stream"} for n, b in files.items()]  # fmt: skip
            return httpx.Response(200, json={"object": "list", "data": data})
        name = path.rsplit("/", 1)[-1]
        return httpx.Response(200, content=files[name])

    return handler


def test_download_writes_and_verifies_every_artifact(tmp_path):
    files = {"model.safetensors": os.urandom(5000), "metrics.json": b'{"a": 1}'}
    with DistillClient("http://svc", api_key="k", transport=_mock(_artifact_handler(files))) as client:
        paths = client.jobs.download(JOB_ID, tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(files)
    for p in paths:
        assert p.read_bytes() == files[p.name]
    assert not list((tmp_path / "out").glob("*.part"))


def test_download_rejects_a_sha256_mismatch_and_leaves_nothing(tmp_path):
    files = {"model.onnx": b"x" * 100}
    handler = _artifact_handler(files, listed_sha={"model.onnx": "0" * 64})
    with (
        DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client,
        pytest.raises(DistillIntegrityError, match="sha256"),
    ):
        client.jobs.download(JOB_ID, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_refuses_path_like_artifact_names(tmp_path):
    handler = _artifact_handler({"../evil": b"x"})
    with (
        DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client,
        pytest.raises(DistillIntegrityError, match="plain file name"),
    ):
        client.jobs.download(JOB_ID, tmp_path / "out")


def test_wait_polls_until_terminal_and_survives_a_restart(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    answers = iter([_job("queued"), "down", _job("running"), _job("succeeded")])

    def handler(request):
        answer = next(answers)
        if answer == "down":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=answer)

    seen = []
    with DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client:
        job = client.jobs.wait(JOB_ID, poll_s=0.01, on_progress=lambda j: seen.append(j["status"]), stream=False)
    assert job["status"] == "succeeded" and seen == ["queued", "running", "succeeded"]


def _sse(*events: dict, end: str | None = None) -> bytes:
    """An SSE body as the API writes it: a retry hint, one block per event, then `end` with the status."""
    blocks = ["retry: 10\n\n"]
    blocks += [f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events]
    blocks += [": keep-alive\n\n"]
    if end:
        blocks.append(f"event: end\ndata: {json.dumps({'status': end})}\n\n")
    return "".join(blocks).encode()


def _event(n: int, type_: str = "message") -> dict:
    return {"id": n, "created_at": "2026-01-01T00:00:00Z", "level": "info", "type": type_,
            "message": f"event {n}", "data": {"epoch": n, "phase": "train", "val_accuracy": 0.5}}  # fmt: skip


class _DropsAfter(httpx.SyncByteStream):
    """A response body that breaks off like a dropped TCP connection after its bytes."""

    def __init__(self, body: bytes):
        self.body = body

    def __iter__(self):
        yield self.body
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def test_events_stream_resumes_with_last_event_id_after_a_drop():
    requests = []

    def handler(request):
        requests.append(dict(request.headers))
        sse = {"content-type": "text/event-stream"}
        if len(requests) == 1:
            return httpx.Response(200, headers=sse, stream=_DropsAfter(_sse(_event(1), _event(2, "metrics"))))
        if len(requests) == 2:
            return httpx.Response(503, json={"title": "Service Unavailable", "detail": "restarting"})
        return httpx.Response(200, headers=sse, content=_sse(_event(3), end="succeeded"))

    with DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client:
        events = list(client.events.stream(JOB_ID))
    assert [e["id"] for e in events] == [1, 2, 3, None] and events[-1] == {"id": None, "type": "end",
                                                                          "data": {"status": "succeeded"}}  # fmt: skip
    assert requests[0]["accept"] == "text/event-stream" and "last-event-id" not in requests[0]
    assert requests[1]["last-event-id"] == "2" and requests[2]["last-event-id"] == "2"


def test_events_stream_gives_up_after_repeated_drops_without_events():
    def handler(request):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_DropsAfter(b"retry: 1\n\n"))

    with (
        DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client,
        pytest.raises(StreamUnavailable, match="dropped 3 times in a row"),
    ):
        list(client.events.stream(JOB_ID, max_reconnects=2))


def test_wait_follows_the_stream_and_reads_the_job_after_each_event():
    served = {"end": False}

    def handler(request):
        if request.url.path.endswith("/events"):
            served["end"] = True
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=_sse(_event(1), _event(2, "metrics"), end="failed"))  # fmt: skip
        return httpx.Response(200, json=_job("failed" if served["end"] else "running"))

    events, progress = [], []
    with DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client:
        job = client.jobs.wait(JOB_ID, on_event=events.append, on_progress=lambda j: progress.append(j["status"]))
    assert job["status"] == "failed"
    assert [e["type"] for e in events] == ["message", "metrics", "end"]
    assert progress[0] == "running" and progress[-1] == "failed"


def test_wait_falls_back_to_polling_when_the_server_does_not_stream(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    answers = iter([_job("running"), _job("running"), _job("succeeded")])

    def handler(request):
        if request.url.path.endswith("/events"):  # an old server: a JSON page whatever the Accept header says
            return httpx.Response(200, json={"object": "list", "data": [], "has_more": False})
        return httpx.Response(200, json=next(answers))

    reasons = []
    with DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client:
        job = client.jobs.wait(JOB_ID, poll_s=0.01, on_fallback=reasons.append)
    assert job["status"] == "succeeded" and "did not answer with an event stream" in reasons[0]


def test_wait_on_an_unknown_job_raises_instead_of_polling():
    def handler(request):
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"title": "Not Found", "detail": "no such job"})
        return httpx.Response(200, json=_job("running"))

    with (
        DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client,
        pytest.raises(DistillAPIError, match="no such job"),
    ):
        client.jobs.wait(JOB_ID)


def test_wait_times_out():
    def handler(request):
        return httpx.Response(200, json=_job("running"))

    with (
        DistillClient("http://svc", api_key="k", transport=_mock(handler)) as client,
        pytest.raises(TimeoutError),
    ):
        client.jobs.wait(JOB_ID, poll_s=0.01, timeout_s=0.05)


# ---- CLI over a mocked service --------------------------------------------------------------------


@pytest.mark.parametrize(("final", "code"), [("succeeded", 0), ("failed", 1), ("cancelled", 1)])
def test_jobs_wait_exit_status(monkeypatch, final, code):
    error = {"code": "weights_mismatch", "message": "missing key fc.weight", "param": "teachers[0]"}
    ended = {"yes": False}

    def handler(request):
        if request.url.path.endswith("/events"):
            ended["yes"] = True
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=_sse(_event(1), _event(2, "metrics"), end=final))  # fmt: skip
        if ended["yes"]:
            return httpx.Response(200, json=_job(final, error=error if final == "failed" else None))
        return httpx.Response(200, json=_job("running"))

    monkeypatch.setattr(cli, "_transport", _mock(handler))
    result = runner.invoke(cli.app, ["--api-key", "k", "jobs", "wait", JOB_ID])
    assert result.exit_code == code, result.output
    assert "event 1" in result.stderr  # message events are printed as they arrive
    if final == "failed":
        assert "weights_mismatch" in result.stderr and "missing key fc.weight" in result.stderr


def test_jobs_wait_no_stream_polls(monkeypatch):
    answers = iter([_job("running"), _job("succeeded")])

    def handler(request):
        assert not request.url.path.endswith("/events")
        return httpx.Response(200, json=next(answers))

    monkeypatch.setattr(cli, "_transport", _mock(handler))
    result = runner.invoke(cli.app, ["--api-key", "k", "jobs", "wait", JOB_ID, "--no-stream", "--poll", "0.05"])
    assert result.exit_code == 0, result.output


def test_jobs_create_sends_a_yaml_spec_with_idempotency_key(tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "student: {architecture: {name: mlp}}\ntrain_file: builtin:digits\nmethod: {type: supervised}\n"
    )
    seen = {}

    def handler(request):
        seen["body"] = json.loads(request.content)
        seen["key"] = request.headers.get("idempotency-key")
        return httpx.Response(201, json=_job("queued"))

    monkeypatch.setattr(cli, "_transport", _mock(handler))
    result = runner.invoke(cli.app, ["--api-key", "k", "jobs", "create", "-f", str(spec),
                                     "--idempotency-key", "run-1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == JOB_ID
    assert seen == {"body": {"student": {"architecture": {"name": "mlp"}}, "train_file": "builtin:digits",
                             "method": {"type": "supervised"}}, "key": "run-1"}  # fmt: skip


def test_cli_prints_api_errors_and_exits_1(tmp_path, monkeypatch):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"method": {"type": "kd", "temperature": -1}}))
    errors = [{"loc": ["body", "student"], "msg": "Field required", "type": "missing"}]
    monkeypatch.setattr(
        cli, "_transport", _mock(lambda r: _problem(422, "body.student: Field required", errors))
    )
    result = runner.invoke(cli.app, ["--api-key", "k", "jobs", "create", "-f", str(spec)])
    assert result.exit_code == 1
    assert "HTTP 422" in result.stderr and "body.student: Field required" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_explains_an_unreachable_service(monkeypatch):
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    monkeypatch.setattr(cli, "_transport", _mock(handler))
    result = runner.invoke(cli.app, ["--url", "http://127.0.0.1:9", "--api-key", "k", "files", "list"])
    assert result.exit_code == 1
    assert "cannot reach the service at http://127.0.0.1:9" in result.stderr


def test_demo_summary_reads_per_teacher_lists():
    teacher = {
        "id": "job_t",
        "metrics": {"val_accuracy": 0.9, "student_params": 13802, "student_bytes": 57864},
    }
    kd = {"id": "job_s", "metrics": {"val_accuracy": 0.7, "baseline_accuracy": 0.6, "teacher_accuracy": [0.9],
                                     "teacher_params": [13802], "teacher_bytes": [57864], "student_params": 3274,
                                     "student_bytes": 13744, "agreement": 0.75, "compression_ratio": 4.2,
                                     "speedup": 13.0}}  # fmt: skip
    s = cli.demo_summary(teacher, kd)
    assert s["teacher_params"] == 13802 and s["teacher_accuracy"] == 0.9
    assert s["kd_gain_points"] == pytest.approx(10.0)
    assert s["gap_recovered"] == pytest.approx(1 / 3)
    teacher_spec, kd_spec = cli.demo_specs(epochs_teacher=3, epochs=4, temperature=4.0, alpha=0.9, seed=0,
                                           teacher_job=JOB_ID)  # fmt: skip
    from app.schemas import JobCreate

    JobCreate.model_validate(teacher_spec)  # both demo specs are valid requests
    assert JobCreate.model_validate(kd_spec).hyperparameters.baseline is True


# ---- processes ------------------------------------------------------------------------------------


def test_resolve_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cli.resolve_gpus("none") == []
    assert cli.resolve_gpus("0,1") == ["0", "1"]
    monkeypatch.setattr(cli, "count_gpus", lambda: 2)
    assert cli.resolve_gpus("all") == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert cli.resolve_gpus("all") == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(cli, "count_gpus", lambda: 0)
    assert cli.resolve_gpus("all") == []


def test_count_gpus_parses_nvidia_smi(monkeypatch):
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    listing = "GPU 0: NVIDIA H100 (UUID: GPU-1)\n  MIG 1g.10gb Device 0: (UUID: MIG-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n"
    monkeypatch.setattr(cli.subprocess, "run",
                        lambda *a, **k: cli.subprocess.CompletedProcess(a, 0, stdout=listing, stderr=""))  # fmt: skip
    assert cli.count_gpus() == 2


def test_worker_starts_one_pinned_process_per_gpu(monkeypatch):
    started = []
    monkeypatch.setattr(
        cli.Supervisor, "start", lambda self, name, cmd, env=None: started.append((name, cmd, env))
    )
    monkeypatch.setattr(cli.Supervisor, "wait", lambda self, poll_s=0.5: 0)
    result = runner.invoke(cli.app, ["worker", "--gpus", "0,1"])
    assert result.exit_code == 0, result.output
    assert [s[0] for s in started] == ["worker-gpu0", "worker-gpu1"]
    for dev, (_name, cmd, env) in zip("01", started, strict=True):
        assert env["CUDA_VISIBLE_DEVICES"] == dev and env["QUEUE"] == "gpu"
        assert (
            cmd[cmd.index("-Q") + 1] == "gpu" and cmd[cmd.index("-A") + 1] == "worker.celery_app:celery_app"
        )


def test_worker_without_gpus_uses_the_configured_queue(monkeypatch):
    started = []
    monkeypatch.setenv("QUEUE", "cpu-big")
    from app.settings import get_settings

    get_settings.cache_clear()
    try:
        monkeypatch.setattr(cli.Supervisor, "start", lambda self, name, cmd, env=None: started.append(cmd))
        monkeypatch.setattr(cli.Supervisor, "wait", lambda self, poll_s=0.5: 0)
        assert runner.invoke(cli.app, ["worker"]).exit_code == 0
    finally:
        get_settings.cache_clear()
    (cmd,) = started
    assert cmd[cmd.index("-Q") + 1] == "cpu-big" and cmd[cmd.index("-P") + 1] == "solo"


def test_api_execs_uvicorn_with_the_cpu_count_for_zero_workers(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda path, args: calls.append(args))
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 3)
    assert (
        runner.invoke(cli.app, ["api", "--host", "0.0.0.0", "--port", "9000", "--workers", "0"]).exit_code
        == 0
    )
    (args,) = calls
    assert args[1:4] == ["-m", "uvicorn", "app.main:app"]
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "9000"
    assert args[args.index("--workers") + 1] == "3"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_supervisor_stops_the_rest_when_a_child_dies():
    sup = cli.Supervisor(grace_s=5)
    survivor = sup.start("api", _py("import time; time.sleep(60)"))
    sup.start("worker", _py("import sys, time; time.sleep(0.3); sys.exit(3)"))
    started = time.monotonic()
    assert sup.wait(poll_s=0.05) == 3
    assert survivor.poll() is not None and time.monotonic() - started < 10


def test_supervisor_kills_a_child_that_ignores_sigterm(tmp_path):
    ready = tmp_path / "ready"
    sup = cli.Supervisor(grace_s=0.5)
    stubborn = sup.start("stubborn", _py(
        "import pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"))  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:  # wait until SIGTERM is ignored
        time.sleep(0.05)
    sup.request_stop()
    assert sup.wait(poll_s=0.05) == 0  # a requested stop is a clean exit
    assert stubborn.returncode == -9


def test_cli_and_sdk_never_import_torch_or_the_worker():
    import subprocess

    code = ("import sys, app.cli, app.client; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker')); "
            "assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
