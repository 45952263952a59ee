"""Request dependencies: the session (one unit of work per request) and the caller's tenant."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Query
from sqlalchemy.orm import Session

from starlette.concurrency import run_in_threadpool

from app.auth import cached_tenant_for_key, tenant_for_key
from app.db import get_read_sessionmaker, get_sessionmaker
from app.errors import ProblemError
from app.settings import get_settings


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_current_tenant(authorization: Annotated[str | None, Header()] = None) -> str:
    """Async, so a remembered key costs no thread hop and no query; a miss looks the key up in a thread."""
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ProblemError(401, "Missing bearer API key.", code="unauthorized", headers=unauthorized)
    key, ttl = authorization[7:].strip(), get_settings().auth_cache_ttl_s
    tenant_id = cached_tenant_for_key(key=key, cache_ttl_s=ttl)
    if tenant_id is None:

        def lookup() -> str | None:
            with get_read_sessionmaker()() as session:
                return tenant_for_key(session, key=key, cache_ttl_s=ttl)

        tenant_id = await run_in_threadpool(lookup)
    if tenant_id is None:
        raise ProblemError(401, "Invalid API key.", code="unauthorized", headers=unauthorized)
    return tenant_id


CurrentTenant = Annotated[str, Depends(get_current_tenant)]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]
After = Annotated[str | None, Query(max_length=40, description="Cursor: the last id of the previous page.")]
