"""Request dependencies: the session (one unit of work per request) and the caller's tenant."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Query
from sqlalchemy.orm import Session

from app.auth import tenant_for_key
from app.db import get_sessionmaker
from app.errors import ProblemError
from app.settings import get_settings


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_current_tenant(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> str:
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ProblemError(401, "Missing bearer API key.", code="unauthorized", headers=unauthorized)
    tenant_id = tenant_for_key(session, key=authorization[7:].strip(), cache_ttl_s=get_settings().auth_cache_ttl_s)
    if tenant_id is None:
        raise ProblemError(401, "Invalid API key.", code="unauthorized", headers=unauthorized)
    return tenant_id


CurrentTenant = Annotated[str, Depends(get_current_tenant)]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]
After = Annotated[str | None, Query(max_length=40, description="Cursor: the last id of the previous page.")]
