"""RFC 9457 problem details for every error the API returns."""

import logging

import psycopg
import psycopg_pool
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
TITLES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict", 413: "Content Too Large",
          408: "Request Timeout", 422: "Unprocessable Content", 500: "Internal Server Error",
          503: "Service Unavailable"}  # fmt: skip


class ProblemError(Exception):
    def __init__(self, status: int, detail: str, *, code: str | None = None, errors: list[dict] | None = None,
                 headers: dict | None = None):  # fmt: skip
        self.status, self.detail, self.code, self.errors, self.headers = status, detail, code, errors, headers
        super().__init__(detail)


def not_found(kind: str, id_: str) -> ProblemError:
    return ProblemError(404, f"No {kind} with id {id_!r}.", code="not_found")


def invalid(loc: list, msg: str, *, type_: str = "value_error") -> ProblemError:
    """A 422 naming the offending field, in the same shape as request validation errors."""
    return ProblemError(422, msg, code="invalid_request", errors=[{"loc": loc, "msg": msg, "type": type_}])


def problem_response(status: int, detail: str | None, *, code: str | None = None, errors=None, headers=None):
    body = {"type": f"https://distill.dev/problems/{code}" if code else "about:blank",
            "title": TITLES.get(status, "Error"), "status": status, "detail": detail}  # fmt: skip
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(_req: Request, exc: ProblemError):
        return problem_response(exc.status, exc.detail, code=exc.code, errors=exc.errors, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return problem_response(422, f"{where}: {first['msg']}", code="invalid_request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        return problem_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(DBAPIError)
    async def _db_down(_req: Request, exc: DBAPIError):
        if exc.connection_invalidated or "connect" in str(exc.orig).lower() or "terminat" in str(exc.orig).lower():
            return problem_response(503, "The database is unavailable; retry shortly.", code="database_unavailable",
                                    headers={"Retry-After": "5"})  # fmt: skip
        log.exception("database error")
        return problem_response(500, "Internal error.", code="internal_error")

    @app.exception_handler(psycopg.OperationalError)  # the async read pool's connection failed mid-request
    async def _read_connection_lost(_req: Request, _exc: psycopg.OperationalError):
        return problem_response(503, "The database is unavailable; retry shortly.", code="database_unavailable",
                                headers={"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(psycopg_pool.PoolTimeout)  # no connection within the pool's timeout: outage or overload
    async def _pool_timeout(_req: Request, _exc: Exception):
        return problem_response(503, "The database is busy; retry shortly.", code="database_unavailable",
                                headers={"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return problem_response(500, "Internal error.", code="internal_error")
