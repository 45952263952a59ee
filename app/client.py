"""Python SDK for the distillation service: a thin, typed layer over httpx (sync).

    from app.client import DistillClient

    with DistillClient() as client:                       # DISTILL_API_KEY from the environment
        data = client.files.upload("train.npz", "dataset")
        job = client.jobs.create({...})
        job = client.jobs.wait(job["id"], on_progress=lambda j: print(j["progress"]))  # follows the SSE stream
        for event in client.events.stream(job["id"]):     # or read the events yourself, resumed on reconnect
            print(event["type"], event.get("message"))
        paths = client.jobs.download(job["id"], "out/")

Every non-2xx answer raises `DistillAPIError` carrying the RFC 9457 problem document. Uploads stream from
disk and downloads stream to disk; neither holds a whole file in memory. This module imports no torch and
nothing from the worker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Self
from urllib.parse import quote

import httpx
from httpx_sse import SSEError, connect_sse

__all__ = ["DEFAULT_URL", "TERMINAL_STATUSES", "DistillAPIError", "DistillClient", "DistillIntegrityError",
           "StreamUnavailable", "WebhookVerificationError", "verify_webhook"]  # fmt: skip

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
USER_AGENT = "distill-sdk/0.1"
_CHUNK = 1024 * 1024
_PAGE_MAX = 100  # the API's largest page size
_TRANSIENT_STATUSES = (502, 503, 504)  # a restarting API or a proxy in front of one

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


class DistillAPIError(Exception):
    """A non-2xx answer. `problem` is the RFC 9457 body (type, title, status, detail, errors)."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status = status
        self.problem = problem
        super().__init__(str(self))

    @property
    def title(self) -> str:
        return str(self.problem.get("title") or "Error")

    @property
    def detail(self) -> str | None:
        return self.problem.get("detail")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.problem.get("errors") or [])

    @property
    def code(self) -> str | None:
        """The last path segment of the problem `type` (e.g. "not_found"), None for about:blank."""
        type_ = self.problem.get("type") or "about:blank"
        return None if type_ == "about:blank" else type_.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        head = f"HTTP {self.status} {self.title}"
        if self.detail:
            head += f": {self.detail}"
        lines = [head]
        for err in self.errors:
            loc = ".".join(str(p) for p in err.get("loc") or []) or "(request)"
            line = f"{loc}: {err.get('msg', '')}"
            if line != self.detail:  # the API's detail already spells out the first error
                lines.append(f"  - {line}")
        return "\n".join(lines)

    def __reduce__(self):  # picklable despite the two-argument constructor
        return (type(self), (self.status, self.problem))


class DistillIntegrityError(Exception):
    """A downloaded artifact does not match the size or sha256 the service listed for it."""


class StreamUnavailable(Exception):
    """The events stream cannot be followed: the answer is not Server-Sent Events (an old server, a proxy that
    buffers), or the connection kept dropping before any event came. `jobs.wait` polls instead."""


def _problem_from(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and ("title" in body or "detail" in body):
        problem = dict(body)
        problem.setdefault("title", response.reason_phrase or "Error")
        problem.setdefault("status", response.status_code)
        if problem.get("detail") is not None and not isinstance(problem["detail"], str):
            problem["detail"] = json.dumps(problem["detail"])
        return problem
    text = json.dumps(body) if isinstance(body, (dict, list)) else response.text.strip()
    return {"type": "about:blank", "title": response.reason_phrase or "Error", "status": response.status_code,
            "detail": text[:500] or None}  # fmt: skip


def _raise_for(response: httpx.Response) -> None:
    if response.is_success or response.status_code == 304:
        return
    if not response.is_stream_consumed:
        response.read()
    raise DistillAPIError(response.status_code, _problem_from(response))


class _ProgressReader:
    """Wraps an open binary file: reports bytes read, keeps fileno/seek/tell so httpx can size the body."""

    def __init__(self, f: BinaryIO, total: int, on_progress: ProgressFn):
        self._f, self._total, self._cb = f, total, on_progress
        self.name = f.name

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(n)
        self._cb(self._f.tell(), self._total)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()


class _Resource:
    def __init__(self, client: DistillClient):
        self._client = client

    def _paginate(self, path: str, params: dict[str, Any], limit: int | None, *,
                  cursor: Callable[[dict], Any] = lambda item: item["id"]) -> Iterator[dict]:  # fmt: skip
        """Yield items across cursor pages (`after` = the previous page's last id) until `limit` or the end."""
        params = {k: v for k, v in params.items() if v is not None}
        seen = 0
        while True:
            page_size = _PAGE_MAX if limit is None else max(1, min(_PAGE_MAX, limit - seen))
            page = self._client._get(path, params={**params, "limit": page_size})
            data = page.get("data", [])
            for item in data:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page.get("has_more") or not data:
                return
            params["after"] = cursor(data[-1])


class Files(_Resource):
    """Teacher weights (safetensors) and datasets (npz or safetensors)."""

    def upload(self, path: str | os.PathLike, purpose: str, *, filename: str | None = None,
               on_progress: ProgressFn | None = None) -> dict:  # fmt: skip
        """Stream a file from disk to POST /v1/files; returns the File. `purpose` is "teacher" or "dataset"."""
        path = Path(path)
        total = path.stat().st_size
        with open(path, "rb") as f:
            body: Any = _ProgressReader(f, total, on_progress) if on_progress else f
            files = {"file": (filename or path.name, body, "application/octet-stream")}
            return self._client._request("POST", "/v1/files", data={"purpose": purpose}, files=files).json()

    def iter(self, *, purpose: str | None = None, limit: int | None = None) -> Iterator[dict]:
        return self._paginate("/v1/files", {"purpose": purpose}, limit)

    def list(self, *, purpose: str | None = None, limit: int | None = 20) -> list[dict]:
        """The tenant's files, newest first: up to `limit` (None = all), following cursor pages."""
        return list(self.iter(purpose=purpose, limit=limit))

    def get(self, file_id: str) -> dict:
        return self._client._get(f"/v1/files/{quote(file_id, safe='')}")

    def delete(self, file_id: str) -> None:
        self._client._request("DELETE", f"/v1/files/{quote(file_id, safe='')}")


class Jobs(_Resource):
    """Distillation jobs."""

    def _path(self, job_id: str, *rest: str) -> str:
        return "/".join(["/v1/jobs", quote(job_id, safe=""), *(quote(r, safe="") for r in rest)])

    def create(self, spec: dict, idempotency_key: str | None = None, *, webhook_url: str | None = None) -> dict:
        """POST /v1/jobs. With an Idempotency-Key, repeating the same request returns the same job. `webhook_url`
        (or the spec's own) receives a signed POST when the job ends; see `verify_webhook`."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        if webhook_url is not None:
            spec = {**spec, "webhook_url": webhook_url}
        return self._client._request("POST", "/v1/jobs", json=spec, headers=headers).json()

    def get(self, job_id: str) -> dict:
        return self._client._get(self._path(job_id))

    def iter(self, *, status: str | None = None, limit: int | None = None) -> Iterator[dict]:
        return self._paginate("/v1/jobs", {"status": status}, limit)

    def list(self, status: str | None = None, limit: int | None = 20) -> list[dict]:
        """The tenant's jobs, newest first: up to `limit` (None = all), following cursor pages."""
        return list(self.iter(status=status, limit=limit))

    def cancel(self, job_id: str) -> dict:
        return self._client._request("POST", self._path(job_id, "cancel")).json()

    def events(self, job_id: str, after: int | None = None, limit: int | None = None) -> list[dict]:
        """The event log after event id `after`, oldest first (all pages unless `limit`)."""
        params = {"after": after}
        return list(self._paginate(self._path(job_id, "events"), params, limit))

    def metrics(self, job_id: str) -> dict:
        """Per-epoch series (`data`) and the latest `summary`."""
        return self._client._get(self._path(job_id, "metrics"))

    def artifacts(self, job_id: str) -> list[dict]:
        return self._client._get(self._path(job_id, "artifacts")).get("data", [])

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None,
             on_progress: Callable[[dict], None] | None = None, *, on_event: Callable[[dict], None] | None = None,
             stream: bool = True, on_fallback: Callable[[str], None] | None = None,
             max_transient_errors: int = 30) -> dict:  # fmt: skip
        """Wait until the job is succeeded, failed or cancelled; return the final Job.

        With `stream` (the default) it follows the job's Server-Sent Events (`client.events.stream`), calling
        `on_event(event)` for each as it arrives and `on_progress(job)` with the job read after it, so it
        returns as soon as the job ends. When the stream is unavailable (`StreamUnavailable`) it says why through
        `on_fallback(reason)` and polls GET /v1/jobs/{id} every `poll_s` instead, calling `on_progress(job)`
        after every poll. Connection errors and 502/503/504 answers are retried up to `max_transient_errors`
        times in a row. Raises TimeoutError after `timeout_s`.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if stream:
            try:
                return self._follow(job_id, deadline, on_progress, on_event)
            except StreamUnavailable as e:
                if on_fallback is not None:
                    on_fallback(str(e))
        return self._poll(job_id, poll_s, deadline, timeout_s, on_progress, max_transient_errors)

    def _follow(self, job_id: str, deadline: float | None, on_progress: Callable[[dict], None] | None,
                on_event: Callable[[dict], None] | None) -> dict:  # fmt: skip
        job = self._get_tolerant(job_id)
        if job is not None:
            if on_progress is not None:
                on_progress(job)
            if job["status"] in TERMINAL_STATUSES:
                return job
        for event in self._client.events.stream(job_id, deadline=deadline):
            if on_event is not None:
                on_event(event)
            if event["type"] == "end":
                break
            if on_progress is not None and (job := self._get_tolerant(job_id)) is not None:
                on_progress(job)
        # `end` is sent only once the status is terminal: one read (retried through an API restart) gets the
        # final job with its metrics.
        return self._poll(job_id, 0.5, deadline, None, on_progress, 30)

    def _get_tolerant(self, job_id: str) -> dict | None:
        """The job, or None while the API is briefly unreachable: a progress refresh is not worth failing for."""
        try:
            return self.get(job_id)
        except httpx.TransportError:
            return None
        except DistillAPIError as e:
            if e.status in _TRANSIENT_STATUSES:
                return None
            raise

    def _poll(self, job_id: str, poll_s: float, deadline: float | None, timeout_s: float | None,
              on_progress: Callable[[dict], None] | None, max_transient_errors: int) -> dict:  # fmt: skip
        failures = 0
        while True:
            try:
                job = self.get(job_id)
                failures = 0
            except (httpx.TransportError, DistillAPIError) as e:
                transient = isinstance(e, httpx.TransportError) or e.status in _TRANSIENT_STATUSES
                failures += 1
                if not transient or failures > max_transient_errors:
                    raise
                job = None
            if job is not None:
                if on_progress is not None:
                    on_progress(job)
                if job.get("status") in TERMINAL_STATUSES:
                    return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout_s} s")
            sleep = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            time.sleep(sleep)

    def download_artifact(self, job_id: str, name: str, dest: str | os.PathLike, *, sha256: str | None = None,
                          size: int | None = None, on_progress: ProgressFn | None = None) -> Path:  # fmt: skip
        """Stream one artifact to `dest` (atomically: a .part file renamed when complete and verified)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        digest, done = hashlib.sha256(), 0
        try:
            with self._client._http.stream("GET", self._path(job_id, "artifacts", name)) as response:
                _raise_for(response)
                total = size if size is not None else int(response.headers.get("content-length") or 0)
                with open(part, "wb") as out:
                    for chunk in response.iter_bytes(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(done, total)
            if size is not None and done != size:
                raise DistillIntegrityError(f"{name}: got {done} bytes, the listing says {size}")
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise DistillIntegrityError(
                    f"{name}: sha256 {digest.hexdigest()} does not match the listed {sha256}"
                )
            os.replace(part, dest)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return dest

    def download(self, job_id: str, out_dir: str | os.PathLike,
                 on_progress: Callable[[str, int, int], None] | None = None) -> list[Path]:  # fmt: skip
        """Download every artifact of a job into `out_dir`, each verified against the listed sha256."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for art in self.artifacts(job_id):
            name = art["name"]
            if not name or Path(name).name != name or name in (".", ".."):
                raise DistillIntegrityError(
                    f"refusing an artifact name that is not a plain file name: {name!r}"
                )
            cb = None if on_progress is None else (lambda d, t, n=name: on_progress(n, d, t))
            paths.append(self.download_artifact(job_id, name, out / name, sha256=art.get("sha256"),
                                                size=art.get("bytes"), on_progress=cb))  # fmt: skip
        return paths


class Events(_Resource):
    """A job's event log as it happens (Server-Sent Events)."""

    def stream(self, job_id: str, *, after: int | None = None, deadline: float | None = None,
               read_timeout_s: float = 30.0, max_reconnects: int = 5) -> Iterator[dict]:  # fmt: skip
        """Yield the job's events (`id, created_at, level, type, message, data`) after event id `after` as they
        are written, then a last `{"type": "end", "data": {"status": ...}}` once the job has ended.

        A dropped connection is reopened with `Last-Event-ID` (after the server's `retry` delay), so every event
        arrives exactly once. Raises StreamUnavailable when the answer is not an event stream or when
        `max_reconnects` reconnections in a row bring no event; TimeoutError once `deadline` (a
        `time.monotonic()` value) has passed. The server sends a keep-alive every 15 s, so `read_timeout_s` only
        trips on a dead connection, which counts as a drop.
        """
        path = f"/v1/jobs/{quote(job_id, safe='')}/events"
        last_id, retry_s, drops, why = after, 1.0, 0, ""
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} did not finish in time")
            left = None if deadline is None else deadline - time.monotonic()
            read_s = read_timeout_s if left is None else max(0.1, min(read_timeout_s, left))
            headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
            try:
                with connect_sse(self._client._http, "GET", path, headers=headers,
                                 timeout=httpx.Timeout(self._client._http.timeout.connect, read=read_s)) as source:  # fmt: skip
                    _raise_for(source.response)
                    for sse in source.iter_sse():
                        if sse.retry is not None:
                            retry_s = sse.retry / 1000
                        if sse.event == "end":
                            yield {"id": None, "type": "end", "data": sse.json()}
                            return
                        if not sse.data:
                            continue
                        event = sse.json()
                        last_id, drops = event["id"], 0
                        yield event
                why = "the server closed the stream before the job ended"
            except SSEError as e:
                raise StreamUnavailable(
                    f"the events endpoint did not answer with an event stream ({e})"
                ) from None
            except httpx.TransportError as e:
                why = f"{type(e).__name__}: {e}"
            except DistillAPIError as e:
                if e.status not in _TRANSIENT_STATUSES:
                    raise
                why = str(e)
            drops += 1
            if drops > max_reconnects:
                raise StreamUnavailable(f"the events stream dropped {drops} times in a row ({why})")
            pause = min(retry_s, 10.0)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))


class Webhooks(_Resource):
    """The tenant's webhook signing secret (one per tenant; deliveries are signed with it)."""

    def create_secret(self) -> dict:
        """POST /v1/webhooks/secret: the first secret, in `secret`; the only time it is shown (409 if one exists)."""
        return self._client._request("POST", "/v1/webhooks/secret").json()

    def rotate_secret(self) -> dict:
        """A new secret (shown once); the previous one also signs deliveries until `previous_expires_at`."""
        return self._client._request("POST", "/v1/webhooks/secret/rotate").json()

    def get_secret(self) -> dict:
        """When the secret was made and its prefix; never the secret itself."""
        return self._client._get("/v1/webhooks/secret")


class WebhookVerificationError(Exception):
    """A webhook request whose Distill-Signature is missing, malformed, too old, or made with another secret."""


def verify_webhook(body: bytes, signature_header: str | None, secret: str, *, tolerance_s: float = 300,
                   now: float | None = None) -> dict:  # fmt: skip
    """Check a delivery and return its parsed body. `body` must be the raw request bytes, before any JSON
    parsing. Rejects a timestamp more than `tolerance_s` from now (a replay); to reject a replay within the
    window too, remember the `Distill-Delivery` ids you have handled (retries of one event reuse its id)."""
    fields: dict[str, list[str]] = {}
    for part in (signature_header or "").split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        raise WebhookVerificationError("no t=<timestamp> in the signature header") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"the signature's timestamp is more than {tolerance_s:g} s from now")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, candidate) for candidate in fields.get("v1", [])):
        raise WebhookVerificationError("no v1 signature matches this secret")
    return json.loads(body)


class DistillClient:
    """A client for one service URL and API key. Use as a context manager, or call close()."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30, *,
                 transport: httpx.BaseTransport | None = None) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("DISTILL_API_KEY")
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json, application/problem+json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.files = Files(self)
        self.jobs = Jobs(self)
        self.events = Events(self)
        self.webhooks = Webhooks(self)

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    def _get(self, path: str, **kwargs) -> Any:
        return self._request("GET", path, **kwargs).json()

    def health(self) -> dict:
        """GET /healthz (no key needed)."""
        return self._get("/healthz")

    def ready(self) -> dict:
        """GET /readyz; raises DistillAPIError(503) with the failing checks when a dependency is down."""
        return self._get("/readyz")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
