"""Liveness and readiness."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.db import get_engine
from app.queue import get_celery
from app.storage import get_store

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


def _check_database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker() -> None:
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


@router.get("/readyz", responses={503: {"description": "A dependency is down"}})
async def readyz() -> JSONResponse:
    """Ready when the database, the broker and the store all answer."""
    checks = {}
    for name, check in (("database", _check_database), ("broker", _check_broker), ("store", get_store().ping)):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as e:  # each failure is reported, not raised
            checks[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)
