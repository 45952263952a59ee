"""Server-Sent Events: read with a real HTTP client as they arrive, resumable with Last-Event-ID."""

import json

import httpx
import pytest

pytestmark = pytest.mark.integration
SPEC = {"student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [32]}}},
        "train_file": "builtin:digits", "method": {"type": "supervised"}, "hyperparameters": {"epochs": 4}}  # fmt: skip


def read_stream(service, api_key, job_id: str, last_event_id: str | None = None) -> list[dict]:
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    events, current = [], {}
    with httpx.stream("GET", f"{service.base_url}/v1/jobs/{job_id}/events", headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "":
                if current:
                    events.append(current)
                    if current.get("event") == "end":
                        break
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return events


def test_events_stream_live_until_the_job_ends_and_resume(client, service, api_key):
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    events = read_stream(service, api_key, job_id)
    assert events[-1]["event"] == "end" and json.loads(events[-1]["data"])["status"] == "succeeded"
    body = [e for e in events if "id" in e]
    assert json.loads(body[0]["data"])["message"].startswith("Job created")
    assert sum(e["event"] == "metrics" for e in body) == 4
    ids = [int(e["id"]) for e in body]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # Resume after the third event: exactly the rest arrives, nothing twice.
    resumed = [e for e in read_stream(service, api_key, job_id, last_event_id=body[2]["id"]) if "id" in e]
    assert [e["id"] for e in resumed] == [e["id"] for e in body[3:]]


def test_events_stream_is_tenant_scoped(other_client, client):
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    r = other_client.get(f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"})
    assert r.status_code == 404
