"""Operations: Prometheus metrics and JSON logs.

HTTP latency is measured per route template in each API process (with PROMETHEUS_MULTIPROC_DIR set,
uvicorn's processes share one view). Job gauges — jobs by status, queue depth, job and phase durations of
recent jobs — are read from the database at scrape time, because the database is the truth about jobs.
"""

import json
import logging
import os
import time
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, REGISTRY
from sqlalchemy import func, select

from app.db import get_read_sessionmaker
from app.models import Job

HTTP_LATENCY = Histogram("distill_http_request_duration_seconds", "HTTP request latency by route",
                         ["method", "route", "status"],
                         buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))  # fmt: skip
RECENT = timedelta(hours=24)


class JobCollector:
    """Gauges computed from the jobs table when Prometheus scrapes."""

    def collect(self):
        by_status = GaugeMetricFamily("distill_jobs", "Jobs by status", labels=["status"])
        queue = GaugeMetricFamily("distill_queue_depth", "Jobs queued and not yet claimed")
        duration = GaugeMetricFamily("distill_job_duration_seconds_mean",
                                     "Mean wall seconds of jobs finished in the last 24 h", labels=["status"])  # fmt: skip
        phases = GaugeMetricFamily("distill_job_phase_seconds_mean",
                                   "Mean seconds per phase of jobs succeeded in the last 24 h", labels=["phase"])  # fmt: skip
        try:
            with get_read_sessionmaker()() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                since = datetime.now(UTC) - RECENT
                recent = session.execute(
                    select(Job.status, Job.started_at, Job.finished_at, Job.summary)
                    .where(Job.finished_at >= since, Job.started_at.is_not(None)).limit(5000)
                ).all()
        except Exception:  # a scrape during a database outage reports what it can
            return
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            by_status.add_metric([status], counts.get(status, 0))
        queue.add_metric([], counts.get("queued", 0))
        walls: dict[str, list[float]] = {}
        phase_sums: dict[str, list[float]] = {}
        for status, started, finished, summary in recent:
            walls.setdefault(status, []).append((finished - started).total_seconds())
            for name, seconds in ((summary or {}).get("phases") or {}).items():
                if isinstance(seconds, int | float):
                    phase_sums.setdefault(name, []).append(float(seconds))
        for status, values in walls.items():
            duration.add_metric([status], sum(values) / len(values))
        for name, values in phase_sums.items():
            phases.add_metric([name], sum(values) / len(values))
        yield from (by_status, queue, duration, phases)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `job_id` and `tenant_id` ride along when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}  # fmt: skip
        for key in ("job_id", "tenant_id", "route", "status", "duration_ms"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(json_logs: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))  # fmt: skip
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class LatencyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): times each request and labels it with its route template."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            HTTP_LATENCY.labels(scope["method"], template, str(status)).observe(time.perf_counter() - started)


_collector_registered = False


def install_metrics(app: FastAPI) -> None:
    global _collector_registered
    if not _collector_registered:
        REGISTRY.register(JobCollector())
        _collector_registered = True
    app.add_middleware(LatencyMiddleware)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(JobCollector())
        else:
            registry = REGISTRY
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
