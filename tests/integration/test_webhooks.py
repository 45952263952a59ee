"""Job webhooks end to end: a real API, a real worker, and a real HTTP receiver on 127.0.0.1.

The stack allows private targets and plain http to 127.0.0.1 (the receiver runs here), and retries fast.
"""

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from app.client import verify_webhook
from tests.conftest import make_key
from tests.integration.faults_support import StackFactory, quick_spec, slow_spec, wait_status, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RETRY_BASE_S = 0.5


class Receiver:
    """An HTTP server that records every POST and answers each path with a scripted series of status codes
    (the last one repeats)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                              "at": time.time()})  # fmt: skip
                    codes = receiver.script.get(self.path, [200])
                    code = codes.pop(0) if len(codes) > 1 else codes[0]
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def wait(self, path: str, count: int = 1, timeout: float = 120) -> list[dict]:
        return wait_until(lambda: len(self.received(path)) >= count and self.received(path), timeout,
                          f"{count} POST(s) to {path}")  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    factory = StackFactory(tmp_path_factory.mktemp("webhooks"))
    stack = factory(WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_HTTP_HOSTS="127.0.0.1", WEBHOOK_RETRY_BASE_S=RETRY_BASE_S,
                    WEBHOOK_MAX_ATTEMPTS="4", WEBHOOK_TIMEOUT_S="5", PUBLIC_BASE_URL="https://distill.example.com")  # fmt: skip
    stack.wait_worker_ready(stack.workers[0])
    yield stack
    factory.close()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def secret(stack):
    with stack.client() as c:
        r = c.post("/v1/webhooks/secret")
        assert r.status_code == 201, r.text
        return r.json()["secret"]


def webhook_events(client, job_id: str) -> list[dict]:
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e for e in events if e["type"] == "webhook"]


def check_signature(request: dict, secret: str) -> None:
    """Verify as a receiver would, by hand: HMAC-SHA256 over "<t>." + the exact body bytes."""
    fields = dict(part.split("=", 1) for part in request["headers"]["distill-signature"].split(","))
    assert abs(time.time() - int(fields["t"])) < 60
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + request["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)


def test_secret_is_shown_once_and_a_second_create_is_409(stack, secret):
    assert secret.startswith("whsec_") and len(secret) > 40
    with stack.client() as c:
        again = c.post("/v1/webhooks/secret")
        assert again.status_code == 409 and "rotate" in again.json()["detail"]
        shown = c.get("/v1/webhooks/secret").json()
        assert shown["secret"] is None and secret.startswith(shown["prefix"])


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1/hook", "http://hooks.example.com/hook", "https://user:pw@hooks.example.com/hook",
    "https://hooks.example.com/hook#x", "not a url", "https://hooks.example.com:70000/",
])  # fmt: skip
def test_bad_webhook_urls_are_422_naming_the_field(stack, secret, url):
    with stack.client() as c:
        r = c.post("/v1/jobs", json={**quick_spec(), "webhook_url": url})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == ["body", "webhook_url"]


def test_a_webhook_without_a_secret_is_422_naming_the_field(stack, receiver):
    key = make_key(stack.database_url, "tenant-without-secret")
    with stack.client() as c:
        r = c.post("/v1/jobs", json={**quick_spec(), "webhook_url": f"{receiver.url}/x"},
                   headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["errors"][0]["loc"] == ["body", "webhook_url"] and "/v1/webhooks/secret" in problem["detail"]


def test_succeeded_job_posts_a_signed_body_once(stack, receiver, secret):
    with stack.client() as c:
        job = c.post("/v1/jobs", json={**quick_spec(), "webhook_url": f"{receiver.url}/ok"}).json()
        assert job["spec"]["webhook_url"] == f"{receiver.url}/ok"
        done = wait_status(c, job["id"])
        assert done["status"] == "succeeded"
        [request] = receiver.wait("/ok")
        check_signature(request, secret)
        assert verify_webhook(request["body"], request["headers"]["distill-signature"], secret)
        body = json.loads(request["body"])
        assert request["headers"]["content-type"] == "application/json"
        assert request["headers"]["distill-delivery"] == body["id"] and body["id"].startswith("evt_")
        assert request["headers"]["distill-event"] == body["type"] == "job.succeeded"
        data = body["data"]
        assert data["job"]["id"] == job["id"] and data["job"]["status"] == "succeeded"
        assert data["job"]["finished_at"].replace("Z", "+00:00")[:19] == done["finished_at"].replace("Z", "+00:00")[:19]
        assert data["job"]["metrics"] == done["metrics"]
        assert {a["name"] for a in data["artifacts"]} >= {"model.safetensors", "model.onnx"}
        assert data["links"]["job"] == f"https://distill.example.com/v1/jobs/{job['id']}"
        # Nothing secret travels: not the signing secret, not the spec (its URL may carry a token).
        assert secret.encode() not in request["body"] and b"webhook_url" not in request["body"]
        events = wait_until(lambda: webhook_events(c, job["id"]), 30, "the delivery event")
        assert [(e["data"]["attempt"], e["data"]["status_code"], e["data"]["outcome"]) for e in events] == \
            [(1, 200, "delivered")]  # fmt: skip
    time.sleep(2 * RETRY_BASE_S)
    assert len(receiver.received("/ok")) == 1


def test_a_failed_job_posts_its_error(stack, receiver, secret):
    spec = quick_spec("bad-option")
    spec["student"]["architecture"]["config"] = {"hidden_sizes": [8], "no_such_option": 1}
    with stack.client() as c:
        job = c.post("/v1/jobs", json={**spec, "webhook_url": f"{receiver.url}/failed"}).json()
        done = wait_status(c, job["id"])
    assert done["status"] == "failed"
    [request] = receiver.wait("/failed")
    check_signature(request, secret)
    body = json.loads(request["body"])
    assert body["type"] == "job.failed" and body["data"]["job"]["error"] == done["error"]
    assert body["data"]["artifacts"] == []


def test_a_receiver_that_fails_first_gets_a_retry_with_the_same_body(stack, receiver, secret):
    receiver.script["/flaky"] = [500, 503, 200]
    with stack.client() as c:
        job = c.post("/v1/jobs", json={**quick_spec(), "webhook_url": f"{receiver.url}/flaky"}).json()
        wait_status(c, job["id"])
        first, second, third = receiver.wait("/flaky", 3)
        assert first["body"] == second["body"] == third["body"]
        assert first["headers"]["distill-delivery"] == third["headers"]["distill-delivery"]
        for request in (first, second, third):
            check_signature(request, secret)
        # Exponential backoff: the second wait is about twice the first.
        assert second["at"] - first["at"] >= RETRY_BASE_S * 0.9
        assert third["at"] - second["at"] >= 2 * RETRY_BASE_S * 0.9
        events = wait_until(lambda: (ev := webhook_events(c, job["id"])) and len(ev) == 3 and ev, 30, "3 events")
        assert [(e["data"]["attempt"], e["data"]["status_code"], e["data"]["outcome"]) for e in events] == \
            [(1, 500, "pending"), (2, 503, "pending"), (3, 200, "delivered")]  # fmt: skip
        assert events[0]["level"] == "warning" and events[0]["data"]["next_retry_at"]
        assert events[2]["data"]["next_retry_at"] is None


def test_a_4xx_gives_up_at_once_and_a_5xx_gives_up_after_max_attempts(stack, receiver, secret):
    receiver.script["/gone"] = [410]
    receiver.script["/down"] = [502]
    with stack.client() as c:
        gone = c.post("/v1/jobs", json={**quick_spec(), "webhook_url": f"{receiver.url}/gone"}).json()
        down = c.post("/v1/jobs", json={**quick_spec(), "webhook_url": f"{receiver.url}/down"}).json()
        receiver.wait("/down", 4)
        events = wait_until(lambda: (ev := webhook_events(c, down["id"])) and len(ev) == 4 and ev, 30, "4 events")
        assert [e["data"]["outcome"] for e in events] == ["pending", "pending", "pending", "failed"]
        assert events[-1]["level"] == "error" and "giving up" in events[-1]["message"]
        [gone_event] = wait_until(lambda: webhook_events(c, gone["id"]), 30, "the 410 event")
        assert (gone_event["data"]["status_code"], gone_event["data"]["outcome"]) == (410, "failed")
    time.sleep(4 * RETRY_BASE_S)
    assert len(receiver.received("/gone")) == 1 and len(receiver.received("/down")) == 4


def test_cancelled_jobs_fire_and_a_lost_delivery_message_is_republished(stack, receiver, secret):
    """A running job cancelled through the worker, and a queued one cancelled by the API whose delivery message is
    then lost from the broker (as if the process died between commit and publish): both receivers hear."""
    with stack.client() as c:
        running = c.post("/v1/jobs", json={**slow_spec(200, "long"), "webhook_url": f"{receiver.url}/running"}).json()
        wait_status(c, running["id"], {"running"})
        queued = c.post("/v1/jobs", json={**quick_spec(), "webhook_url": f"{receiver.url}/queued"}).json()
        r = c.post(f"/v1/jobs/{queued['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        # The only worker is busy, so the delivery message waits in the queue: drop it.
        broker = redis.Redis.from_url(stack.redis_url)
        assert broker.llen(stack.queue) >= 1
        broker.delete(stack.queue)
        broker.close()
        [row] = stack.sql("SELECT status, attempts, published_at FROM webhook_deliveries WHERE job_id = :id",
                          id=queued["id"])  # fmt: skip
        assert (row["status"], row["attempts"], row["published_at"]) == ("pending", 0, None)

        c.post(f"/v1/jobs/{running['id']}/cancel")
        assert wait_status(c, running["id"])["status"] == "cancelled"
        [ran] = receiver.wait("/running")
        assert json.loads(ran["body"])["type"] == "job.cancelled"
        check_signature(ran, secret)

        # The reconciler finds the pending delivery past REQUEUE_AFTER_S and publishes it again.
        [late] = receiver.wait("/queued", timeout=60)
        check_signature(late, secret)
        body = json.loads(late["body"])
        assert (body["type"], body["data"]["job"]["id"], body["data"]["job"]["status"]) == \
            ("job.cancelled", queued["id"], "cancelled")  # fmt: skip
        [row] = stack.sql("SELECT status, attempts, published_at FROM webhook_deliveries WHERE job_id = :id",
                          id=queued["id"])  # fmt: skip
        assert row["attempts"] == 1 and row["published_at"] is not None
        wait_until(lambda: stack.sql("SELECT status FROM webhook_deliveries WHERE job_id = :id",
                                     id=queued["id"])[0]["status"] == "delivered", 10, "delivered")  # fmt: skip


def test_rotation_signs_with_both_secrets(stack, receiver, secret):
    with stack.client() as c:
        rotated = c.post("/v1/webhooks/secret/rotate")
        assert rotated.status_code == 201 and rotated.json()["secret"] != secret
        new = rotated.json()["secret"]
        job = c.post("/v1/jobs", json={**quick_spec(), "webhook_url": f"{receiver.url}/rotated"}).json()
        wait_status(c, job["id"])
        [request] = receiver.wait("/rotated")
    for key in (new, secret):  # receivers on either secret verify during the grace period
        verify_webhook(request["body"], request["headers"]["distill-signature"], key)


def test_cli_creates_the_secret_once_and_a_job_with_webhook_url(stack, receiver, tmp_path):
    from typer.testing import CliRunner

    from app import cli

    runner = CliRunner()
    base = ["--url", stack.base_url, "--api-key", make_key(stack.database_url, "tenant-cli")]
    created = runner.invoke(cli.app, [*base, "webhooks", "secret"])
    assert created.exit_code == 0, created.output
    cli_secret = created.stdout.strip()
    assert cli_secret.startswith("whsec_") and "not shown again" in created.stderr
    again = runner.invoke(cli.app, [*base, "webhooks", "secret"])
    assert again.exit_code == 1 and "--rotate" in again.stderr and cli_secret not in again.output

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(quick_spec("cli")))
    made = runner.invoke(cli.app, [*base, "jobs", "create", "-f", str(spec), "--webhook-url",
                                   f"{receiver.url}/cli", "--json"])  # fmt: skip
    assert made.exit_code == 0, made.output
    job = json.loads(made.stdout)
    assert job["spec"]["webhook_url"] == f"{receiver.url}/cli"
    [request] = receiver.wait("/cli")
    assert verify_webhook(request["body"], request["headers"]["distill-signature"], cli_secret)["data"]["job"]["id"] \
        == job["id"]  # fmt: skip

    bad = runner.invoke(cli.app, [*base, "jobs", "create", "-f", str(spec), "--webhook-url", "http://hooks.example.com/"])
    assert bad.exit_code == 1 and "webhook_url" in bad.stderr and "https" in bad.stderr
