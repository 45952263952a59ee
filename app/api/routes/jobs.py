"""Distillation jobs: create, read, cancel, events, metrics, artifacts."""

import asyncio
import json
import logging
import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import repositories as repo
from app.api.deps import After, CurrentTenant, Limit, SessionDep
from app.db import get_read_sessionmaker
from app.errors import ProblemError, not_found
from app.models import Artifact, Job
from app.queue import publish_job
from app.schemas import (
    ArtifactPublic, ArtifactsPublic, EventPublic, EventsPublic, JobCreate, JobPublic, JobsPublic, MetricPublic,
    MetricsPublic, problem_responses,
)  # fmt: skip
from app.services import cancel_job as cancel_job_service, create_job as create_job_service
from app.storage import get_store
from app.webhooks import announce

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problem_responses(401, 404, 422, 503))
log = logging.getLogger(__name__)
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def job_public(job: Job) -> JobPublic:
    """The public view of a Job, or of a row read with ``repo.read_job`` (the same attribute names)."""
    return JobPublic(
        id=job.id, name=job.name, status=job.status, spec=job.spec, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, attempts=job.attempts,
        progress=job.progress or {}, metrics=job.summary, error=job.error, metadata=job.job_metadata or {},
    )  # fmt: skip


def artifact_public(a: Artifact) -> ArtifactPublic:
    return ArtifactPublic(name=a.name, bytes=a.bytes, sha256=a.sha256, content_type=a.content_type,
                          created_at=a.created_at)  # fmt: skip


def _own_job(session, tenant_id: str, job_id: str) -> Job:
    job = repo.get_job(session, job_id=job_id, tenant_id=tenant_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post("", status_code=201, response_model=JobPublic,
             responses={200: {"model": JobPublic, "description": "Replay of an Idempotency-Key"},
                        **problem_responses(429)})  # fmt: skip
def create_job(body: JobCreate, response: Response, session: SessionDep, tenant_id: CurrentTenant,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JobPublic:  # fmt: skip
    """Validate a job spec, persist it and queue it; the same Idempotency-Key and body return the same job."""
    job, created = create_job_service(session, tenant_id=tenant_id, body=body, idempotency_key=idempotency_key)
    session.commit()
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
        return job_public(job)
    # Published only after commit; if the broker is down the reconciler publishes it later.
    try:
        publish_job(job.id)
        repo.mark_published(session, job_ids=[job.id])
        session.commit()
    except Exception:
        session.rollback()
        log.warning("could not publish %s now; the reconciler will", job.id, exc_info=True)
    return job_public(job)


# The two reads pollers hammer are async routes. On PostgreSQL they read through the event loop's async pool
# (app.db.make_read_pool; no thread hop, no ORM); elsewhere (SQLite) one thread hop does the whole read. Both
# answer with the model's own JSON: FastAPI's re-validation and dict round trip of a returned model cost about
# 70 µs a request against 10 µs for `model_dump_json` (response_model still documents the schema).


def json_response(model: JobPublic | JobsPublic) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


@router.get("", response_model=JobsPublic)
async def list_jobs(request: Request, tenant_id: CurrentTenant, limit: Limit = 20, after: After = None,
                    status: Annotated[JobStatus | None, Query()] = None) -> Response:  # fmt: skip
    """List the tenant's jobs, newest first."""
    page = dict(tenant_id=tenant_id, limit=limit, after=after, status=status)
    if (pool := request.app.state.read_pool) is not None:
        async with pool.connection() as conn:
            rows = await repo.read_jobs_page(conn, **page)
    else:

        def read() -> list[Job]:
            with get_read_sessionmaker()() as session:
                return repo.list_jobs(session, **page)

        rows = await run_in_threadpool(read)
    return json_response(JobsPublic(data=[job_public(j) for j in rows[:limit]], has_more=len(rows) > limit))


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(request: Request, job_id: str, tenant_id: CurrentTenant) -> Response:
    """Read one job."""
    if (pool := request.app.state.read_pool) is not None:
        async with pool.connection() as conn:
            job = await repo.read_job(conn, job_id=job_id, tenant_id=tenant_id)
        if job is None:
            raise not_found("job", job_id)
    else:

        def read() -> Job:
            with get_read_sessionmaker()() as session:
                return _own_job(session, tenant_id, job_id)

        job = await run_in_threadpool(read)
    return json_response(job_public(job))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=problem_responses(409))
def cancel_job(job_id: str, session: SessionDep, tenant_id: CurrentTenant) -> JobPublic:
    """Cancel a queued job at once, or ask a running one to stop (cooperatively, within a step)."""
    job = _own_job(session, tenant_id, job_id)
    delivery_id = cancel_job_service(session, job=job)
    session.commit()
    announce([delivery_id])
    return job_public(job)


def event_public(e) -> EventPublic:
    return EventPublic(id=e.id, created_at=e.created_at, level=e.level, type=e.type, message=e.message,
                       data=e.data or {})  # fmt: skip


SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


@router.get("/{job_id}/events", response_model=EventsPublic,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "The page of events, or (Accept: text/event-stream) a live stream"}})  # fmt: skip
async def list_events(job_id: str, request: Request, tenant_id: CurrentTenant,
                      after: Annotated[int | None, Query(ge=0)] = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                      last_event_id: Annotated[str | None, Header()] = None) -> Response:  # fmt: skip
    """The job's event log, oldest first; with `Accept: text/event-stream`, Server-Sent Events until the job
    ends, resumable with `Last-Event-ID`."""

    def read_page(cursor: int | None, page: int):
        with get_read_sessionmaker()() as session:
            job = _own_job(session, tenant_id, job_id)
            return job.status, repo.list_events(session, job_id=job_id, after=cursor, limit=page)

    _status, rows = await run_in_threadpool(read_page, after, limit)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return EventsPublic(data=[event_public(e) for e in rows[:limit]], has_more=len(rows) > limit)

    cursor = int(last_event_id) if last_event_id and last_event_id.isdigit() else after

    async def stream():
        nonlocal cursor
        quiet_since = time.monotonic()
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            status, rows = await run_in_threadpool(read_page, cursor, 500)
            for e in rows:
                cursor = e.id
                yield f"id: {e.id}\nevent: {e.type}\ndata: {event_public(e).model_dump_json()}\n\n"
            if rows:
                quiet_since = time.monotonic()
                continue
            if status in repo.TERMINAL:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(SSE_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def get_metrics(job_id: str, session: SessionDep, tenant_id: CurrentTenant) -> MetricsPublic:
    """Per-epoch series and the latest summary."""
    job = _own_job(session, tenant_id, job_id)
    rows = repo.list_metrics(session, job_id=job_id)
    return MetricsPublic(data=[MetricPublic(epoch=m.epoch, data=m.data) for m in rows], summary=job.summary)


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic)
def list_artifacts(job_id: str, session: SessionDep, tenant_id: CurrentTenant) -> ArtifactsPublic:
    """The outputs of a succeeded job."""
    _own_job(session, tenant_id, job_id)
    return ArtifactsPublic(data=[artifact_public(a) for a in repo.list_artifacts(session, job_id=job_id)])


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@router.get("/{job_id}/artifacts/{name}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial content"},
                       304: {"description": "Not modified"}, **problem_responses(416)})  # fmt: skip
def download_artifact(job_id: str, name: str, request: Request, session: SessionDep,
                      tenant_id: CurrentTenant) -> Response:  # fmt: skip
    """Download one artifact; supports HTTP Range and ETag (its sha256)."""
    _own_job(session, tenant_id, job_id)
    artifact = repo.get_artifact(session, job_id=job_id, name=name)
    if artifact is None:
        raise not_found("artifact", name)
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{artifact.name}"'}  # fmt: skip
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    start, end, status = 0, artifact.bytes - 1, 200
    range_header = request.headers.get("range")
    if range_header and request.headers.get("if-range", etag) == etag:
        match = _RANGE.match(range_header.strip())
        if match is None or match.groups() == ("", ""):
            raise ProblemError(416, "Only a single bytes=start-end range is supported.", code="invalid_range",
                               headers={"Content-Range": f"bytes */{artifact.bytes}"})  # fmt: skip
        first, last = match.groups()
        if first == "":
            start = max(artifact.bytes - int(last), 0)
        else:
            start = int(first)
            end = min(int(last), artifact.bytes - 1) if last else artifact.bytes - 1
        if start > end or start >= artifact.bytes:
            raise ProblemError(416, "Range not satisfiable.", code="invalid_range",
                               headers={"Content-Range": f"bytes */{artifact.bytes}"})  # fmt: skip
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{artifact.bytes}"
    headers["Content-Length"] = str(end - start + 1)
    body = get_store().iter_range(artifact.storage_key, start, end) if artifact.bytes else iter([b""])
    return StreamingResponse(body, status_code=status, media_type=artifact.content_type, headers=headers)
