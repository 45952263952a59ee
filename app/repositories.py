"""All SQL lives here. Keyword-only arguments; nothing here commits (the request or task wrapper does)."""

from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from psycopg import AsyncConnection
from sqlalchemy import Select, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import (
    ApiKey,
    Artifact,
    File,
    Job,
    JobEvent,
    JobMetric,
    Tenant,
    WebhookDelivery,
    WebhookSecret,
    utcnow,
)  # fmt: skip

TERMINAL = ("succeeded", "failed", "cancelled")


# ---- tenants and keys ----------------------------------------------------------------------------


def get_or_create_tenant(session: Session, *, tenant_id: str, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=tenant_id, name=name)
        session.add(tenant)
        session.flush()
    return tenant


def add_api_key(session: Session, *, key_id: str, tenant_id: str, key_hash: str, prefix: str) -> ApiKey:
    key = ApiKey(id=key_id, tenant_id=tenant_id, key_hash=key_hash, prefix=prefix)
    session.add(key)
    session.flush()
    return key


def get_api_key_by_hash(session: Session, *, key_hash: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))


def list_api_keys(session: Session, *, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return [(key, name) for key, name in session.execute(query.order_by(ApiKey.id))]


def revoke_api_key(session: Session, *, key_id: str) -> bool:
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return result.rowcount == 1


# ---- files ---------------------------------------------------------------------------------------


def add_file(session: Session, *, file: File) -> File:
    session.add(file)
    session.flush()
    return file


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File | None:
    return session.scalar(
        select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None))
    )


def list_files(session: Session, *, tenant_id: str, limit: int, after: str | None, purpose: str | None):
    query = select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    if purpose:
        query = query.where(File.purpose == purpose)
    if after:
        query = query.where(File.id < after)
    return list(session.scalars(query.order_by(File.id.desc()).limit(limit + 1)))


def mark_file_deleted(session: Session, *, file: File) -> None:
    file.deleted_at = utcnow()
    session.flush()


# ---- jobs ----------------------------------------------------------------------------------------


def add_job(session: Session, *, job: Job) -> Job:
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: str, tenant_id: str | None = None) -> Job | None:
    query = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    return session.scalar(query)


def get_job_by_idempotency_key(session: Session, *, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def _jobs_page(columns: Sequence, *, tenant_id, limit, after, status) -> Select:
    """A tenant's jobs newest first from cursor ``after``: one range scan of (tenant_id, [status,] id)."""
    query = select(*columns).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        query = query.where(Job.id < after)
    return query.order_by(Job.id.desc()).limit(limit)


def list_jobs(session: Session, *, tenant_id: str, limit: int, after: str | None, status: str | None) -> list[Job]:
    """Up to ``limit + 1`` jobs (the extra row tells the caller there is a next page)."""
    query = _jobs_page((Job,), tenant_id=tenant_id, limit=limit + 1, after=after or None, status=status or None)
    return list(session.scalars(query))


# ---- async hot reads (PostgreSQL): rows that read like a Job for what JobPublic shows ------------------

_JOB_PUBLIC_COLUMNS = [
    attr.label(attr.key)  # the model's attribute names (the `metadata` column reads as job_metadata)
    for attr in (Job.id, Job.name, Job.status, Job.spec, Job.created_at, Job.started_at, Job.finished_at,
                 Job.attempts, Job.progress, Job.summary, Job.error, Job.job_metadata)
]  # fmt: skip


def _postgres_sql(query: Select) -> str:
    return str(query.compile(dialect=PGDialect_psycopg()))


_READ_JOB_SQL = _postgres_sql(
    select(*_JOB_PUBLIC_COLUMNS).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
)


@lru_cache(maxsize=4)
def _jobs_page_sql(by_status: bool, after: bool) -> str:
    return _postgres_sql(_jobs_page(
        _JOB_PUBLIC_COLUMNS, tenant_id=bindparam("tenant_id"), limit=bindparam("limit"),
        after=bindparam("after") if after else None, status=bindparam("status") if by_status else None,
    ))  # fmt: skip


async def read_job(conn: AsyncConnection, *, job_id: str, tenant_id: str) -> Any | None:
    """The job's public fields as a named-tuple row (attribute names as on Job), or None."""
    cursor = await conn.execute(_READ_JOB_SQL, {"job_id": job_id, "tenant_id": tenant_id})
    return await cursor.fetchone()


async def read_jobs_page(
    conn: AsyncConnection, *, tenant_id: str, limit: int, after: str | None, status: str | None
) -> list[Any]:
    """``list_jobs`` as rows of the job's public fields."""
    sql = _jobs_page_sql(bool(status), bool(after))
    params = {"tenant_id": tenant_id, "limit": limit + 1, "after": after, "status": status}
    cursor = await conn.execute(sql, params)
    return await cursor.fetchall()


def count_active_jobs(session: Session, *, tenant_id: str) -> int:
    query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(("queued", "running")))
    return session.scalar(query) or 0


def cancel_queued_job(session: Session, *, job_id: str) -> bool:
    """Queued → cancelled in one conditional UPDATE; False when the job left `queued` meanwhile."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now)
    )
    return result.rowcount == 1


def request_cancel(session: Session, *, job_id: str) -> bool:
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True)
    )
    return result.rowcount == 1


def mark_published(session: Session, *, job_ids: Sequence[str]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(published_at=utcnow()))


def claim_job(session: Session, *, job_id: str, worker_id: str, lease_seconds: int) -> int | None:
    """The one conditional UPDATE that makes a worker the job's owner. Returns the attempt number (fencing token)."""
    now = utcnow()
    claimable = or_(Job.status == "queued", and_(Job.status == "running", Job.lease_until < now))
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.attempts < Job.max_attempts, Job.cancel_requested.is_(False))
        .values(
            status="running",
            attempts=Job.attempts + 1,
            lease_until=now + timedelta(seconds=lease_seconds),
            worker_id=worker_id,
            started_at=func.coalesce(Job.started_at, now),
        )
    )
    if result.rowcount != 1:
        return None
    return session.scalar(select(Job.attempts).where(Job.id == job_id))


def renew_lease(session: Session, *, job_id: str, attempt: int, lease_seconds: int,
                progress: dict[str, Any] | None = None) -> tuple[bool, bool]:  # fmt: skip
    """Extend the lease if this attempt still owns the job. Returns (still_owner, cancel_requested)."""
    values: dict[str, Any] = {"lease_until": utcnow() + timedelta(seconds=lease_seconds)}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.attempts == attempt, Job.status == "running").values(**values)
    )
    cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
    return result.rowcount == 1, cancel


def finish_job(session: Session, *, job_id: str, attempt: int, status: str, summary: dict | None = None,
               error: dict | None = None, progress: dict | None = None) -> bool:  # fmt: skip
    """running → terminal, only for the attempt that owns the job."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "lease_until": None}
    if summary is not None:
        values["summary"] = summary
    if error is not None:
        values["error"] = error
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.attempts == attempt, Job.status == "running").values(**values)
    )
    return result.rowcount == 1


def release_job(session: Session, *, job_id: str, attempt: int) -> bool:
    """running → queued for a graceful hand-back (the worker is shutting down), only for the attempt that owns the
    job and only if no cancel is pending. The lease is cleared so any worker may claim it at once. The attempt is
    not charged: `attempts` stays (it is the fencing token and never goes back), `max_attempts` grows by one.
    `published_at` is set because the caller publishes next; if that fails the reconciler publishes it later."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == attempt, Job.status == "running", Job.cancel_requested.is_(False))
        .values(status="queued", lease_until=None, worker_id=None, max_attempts=Job.max_attempts + 1,
                published_at=utcnow())  # fmt: skip
    )
    return result.rowcount == 1


def fail_exhausted_jobs(session: Session, *, job_ids: Sequence[str] | None = None) -> list[str]:
    """Jobs out of attempts whose last lease expired (or queued with none left) fail with a clear error."""
    now = utcnow()
    stranded = or_(Job.status == "queued", and_(Job.status == "running", Job.lease_until < now))
    query = select(Job).where(stranded, Job.attempts >= Job.max_attempts)
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    failed = []
    for job in session.scalars(query.with_for_update(skip_locked=True)):
        job.status, job.finished_at, job.lease_until = "failed", now, None
        job.error = {"code": "max_attempts_exceeded",
                     "message": f"The job's worker stopped {job.attempts} times without finishing "
                                f"(max_attempts={job.max_attempts}); giving up.", "param": None}  # fmt: skip
        failed.append(job.id)
    session.flush()
    return failed


def set_checkpoint(session: Session, *, job_id: str, attempt: int, key: str, epoch: int) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == attempt, Job.status == "running")
        .values(checkpoint_key=key, checkpoint_epoch=epoch)
    )
    return result.rowcount == 1


def stranded_job_ids(session: Session, *, requeue_before: datetime, limit: int = 500) -> list[str]:
    """Queued jobs not published recently, and running jobs whose lease expired."""
    now = utcnow()
    query = (
        select(Job.id)
        .where(
            or_(
                and_(Job.status == "queued", or_(Job.published_at.is_(None), Job.published_at < requeue_before)),
                # Once per expiry: not again until requeue_before passes, or the lease is renewed and lapses anew.
                and_(Job.status == "running", Job.lease_until < now,
                     or_(Job.published_at.is_(None), Job.published_at < Job.lease_until,
                         Job.published_at < requeue_before)),
            ),
            Job.attempts < Job.max_attempts,
        )
        .order_by(Job.id)
        .limit(limit)
    )
    return list(session.scalars(query))


# ---- events, metrics, artifacts ------------------------------------------------------------------


def add_event(session: Session, *, job_id: str, message: str, level: str = "info", type_: str = "message",
              data: dict | None = None) -> None:  # fmt: skip
    session.add(JobEvent(job_id=job_id, message=message, level=level, type=type_, data=data or {}))
    session.flush()


def list_events(session: Session, *, job_id: str, after: int | None, limit: int) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    return list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))


def upsert_metric(session: Session, *, job_id: str, epoch: int, data: dict) -> None:
    row = session.scalar(select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.epoch == epoch))
    if row is None:
        session.add(JobMetric(job_id=job_id, epoch=epoch, data=data))
    else:
        row.data = data
    session.flush()


def delete_metrics_after(session: Session, *, job_id: str, epoch: int) -> None:
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.epoch > epoch))


def list_metrics(session: Session, *, job_id: str) -> list[JobMetric]:
    return list(session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)))


def add_artifacts(session: Session, *, artifacts: Sequence[Artifact]) -> None:
    session.add_all(artifacts)
    session.flush()


def list_artifacts(session: Session, *, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(session: Session, *, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def count_artifacts(session: Session, *, job_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)) or 0


# ---- webhooks ------------------------------------------------------------------------------------


def get_webhook_secret(session: Session, *, tenant_id: str) -> WebhookSecret | None:
    return session.get(WebhookSecret, tenant_id)


def create_webhook_secret(session: Session, *, tenant_id: str, secret: str) -> WebhookSecret | None:
    """The tenant's first secret; None when one exists already (a concurrent request may have won)."""
    row = WebhookSecret(tenant_id=tenant_id, secret=secret, created_at=utcnow())
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        return None
    return row


def rotate_webhook_secret(session: Session, *, tenant_id: str, secret: str, grace_until: datetime) -> WebhookSecret | None:
    """Replace the secret; the old one keeps signing until grace_until. None when the tenant has none."""
    row = session.get(WebhookSecret, tenant_id, with_for_update=True)
    if row is None:
        return None
    row.previous_secret, row.previous_expires_at = row.secret, grace_until
    row.secret, row.created_at = secret, utcnow()
    session.flush()
    return row


def add_webhook_delivery(session: Session, *, delivery: WebhookDelivery) -> WebhookDelivery:
    session.add(delivery)
    session.flush()
    return delivery


def get_webhook_delivery(session: Session, *, delivery_id: str) -> WebhookDelivery | None:
    return session.get(WebhookDelivery, delivery_id)


def claim_webhook_attempt(session: Session, *, delivery_id: str, due_by: datetime, lease_until: datetime) -> int | None:
    """pending and due → one more attempt, leased until lease_until. Returns the attempt number (fencing token),
    None when the delivery is finished, not due yet, or another worker's attempt holds it."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
               WebhookDelivery.next_attempt_at <= due_by)
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=lease_until)
    )  # fmt: skip
    if result.rowcount != 1:
        return None
    return session.scalar(select(WebhookDelivery.attempts).where(WebhookDelivery.id == delivery_id))


def record_webhook_attempt(session: Session, *, delivery_id: str, attempt: int, status: str,
                           next_attempt_at: datetime | None, status_code: int | None, error: str | None) -> bool:  # fmt: skip
    """The outcome of an attempt, only if it is still the latest one."""
    values: dict[str, Any] = {"status": status, "last_status_code": status_code, "last_error": error}
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
        values["published_at"] = utcnow()  # the caller schedules the retry next
    if status != "pending":
        values["finished_at"] = utcnow()
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt,
               WebhookDelivery.status == "pending")
        .values(**values)
    )  # fmt: skip
    return result.rowcount == 1


def overdue_webhook_ids(session: Session, *, overdue_before: datetime, limit: int = 500) -> list[str]:
    """Pending deliveries whose attempt is long overdue (its message was lost, or its worker died mid-send),
    not published again since overdue_before."""
    query = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at < overdue_before,
               or_(WebhookDelivery.published_at.is_(None), WebhookDelivery.published_at < overdue_before))
        .order_by(WebhookDelivery.id)
        .limit(limit)
    )  # fmt: skip
    return list(session.scalars(query))


def mark_webhooks_published(session: Session, *, delivery_ids: Sequence[str]) -> None:
    if delivery_ids:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(delivery_ids))
                        .values(published_at=utcnow()))  # fmt: skip


def list_webhook_deliveries(session: Session, *, job_id: str) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                .order_by(WebhookDelivery.id)))  # fmt: skip
