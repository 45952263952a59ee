"""Database engine, sessions and the one way the schema is made (Alembic)."""

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from psycopg import AsyncConnection
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_settings

IDLE_PING_AFTER_S = 1.0
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # A short connect timeout makes a database outage a quick 503 instead of a hung request.
    engine = create_engine(url, pool_size=10, max_overflow=20, pool_timeout=5, connect_args={"connect_timeout": 3})

    # Ping a pooled connection only if it sat idle: a busy API pays nothing per request (a pre-ping on every
    # checkout costs a round trip each), and the first request after a database restart still gets a live one.
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn, record, _proxy):
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_AFTER_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
            dbapi_conn.rollback()  # leave no transaction open: read sessions switch the connection to autocommit
        except Exception as e:
            raise DisconnectionError(f"pooled connection is dead: {e}") from e

    return engine


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().sqlalchemy_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@lru_cache
def get_read_sessionmaker() -> sessionmaker[Session]:
    """Sessions for single-statement reads: autocommit, so no BEGIN/ROLLBACK round trips per request."""
    return sessionmaker(bind=get_engine().execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error (services and repositories never commit)."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# ---------------------------------------------------------------------------- async hot reads
# The two reads pollers hammer (a job, a page of jobs) run on psycopg's async driver from a small pool in the
# API's event loop: no thread hop and no ORM per request. Measured under wrk -c32 (bench/api.py) this took job
# reads from ~700 to ~2,800 requests/s on two cores. Everything else keeps the SQLAlchemy sessions.

READ_POOL_TIMEOUT_S = 2.0  # waiting longer than this for a connection answers 503 (outage or overload)
READ_POOL_NAME = "distill-reads"  # also its connections' application_name in pg_stat_activity


def read_pool_conninfo(url: str) -> str | None:
    """libpq connection string for a PostgreSQL SQLAlchemy URL; None for other databases (SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def make_read_pool(url: str, size: int) -> AsyncConnectionPool | None:
    """An unopened async pool of autocommit connections returning named-tuple rows (None off PostgreSQL).

    A connection that sat idle for more than IDLE_PING_AFTER_S is pinged when it is taken, as in the
    SQLAlchemy pool above, so the first request after a database restart gets a live one; a busy API
    pays nothing.
    """
    conninfo = read_pool_conninfo(url)
    if conninfo is None:
        return None
    idle_since: weakref.WeakKeyDictionary[AsyncConnection, float] = weakref.WeakKeyDictionary()

    async def check(conn: AsyncConnection) -> None:
        if time.monotonic() - idle_since.get(conn, 0.0) >= IDLE_PING_AFTER_S:
            await AsyncConnectionPool.check_connection(conn)

    async def reset(conn: AsyncConnection) -> None:
        idle_since[conn] = time.monotonic()

    return AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=size,
        open=False,
        timeout=READ_POOL_TIMEOUT_S,
        check=check,
        reset=reset,
        name=READ_POOL_NAME,
        kwargs={"autocommit": True, "connect_timeout": 3, "row_factory": namedtuple_row,
                "application_name": READ_POOL_NAME},  # fmt: skip
    )


def upgrade_head(url: str | None = None) -> None:
    """Bring the schema to the latest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().sqlalchemy_url).replace("%", "%%"))
    if (url or get_settings().sqlalchemy_url).startswith("sqlite"):
        Path((url or get_settings().sqlalchemy_url).split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(cfg, "head")
