"""The reconciler: the database decides what must run, the broker only carries ids.

Every pass fails jobs that ran out of attempts and re-publishes queued jobs nobody picked up and running jobs
whose lease expired. Every worker runs one; passes are idempotent because claiming is a conditional UPDATE.
"""

import logging
import threading
from datetime import timedelta

from app import repositories as repo
from app.db import session_scope
from app.models import utcnow
from app.queue import publish_job, publish_webhook
from app.settings import get_settings
from app.webhooks import announce, record_job_finished

log = logging.getLogger(__name__)
_started = threading.Event()
_stopping = threading.Event()


def reconcile_once() -> dict:
    settings = get_settings()
    with session_scope() as session:
        failed = repo.fail_exhausted_jobs(session)
        deliveries = []
        for job_id in failed:
            repo.add_event(session, job_id=job_id, level="error", message="Failed: out of attempts.")
            deliveries.append(record_job_finished(session, job_id=job_id))
    announce(deliveries)
    with session_scope() as session:
        stranded = repo.stranded_job_ids(session, requeue_before=utcnow() - timedelta(seconds=settings.requeue_after_s))
    published = _publish_all(stranded, publish_job, lambda session, ids: repo.mark_published(session, job_ids=ids),
                             "job")  # fmt: skip
    return {"failed": failed, "published": published, "webhooks": _republish_overdue_webhooks(settings)}


def _publish_all(ids: list[str], publish, mark, what: str) -> list[str]:
    """Publish each id, stopping at the first broker error (the next pass retries); mark the published ones."""
    published = []
    for item_id in ids:
        try:
            publish(item_id)
            published.append(item_id)
        except Exception:
            log.warning("reconciler could not publish %s %s", what, item_id, exc_info=True)
            break
    if published:
        with session_scope() as session:
            mark(session, published)
        log.info("reconciler re-published %d %s(s): %s", len(published), what, ", ".join(published[:10]))
    return published


def _republish_overdue_webhooks(settings) -> list[str]:
    """A delivery whose message was lost (a worker died between commit and publish, a broker restart) or whose
    attempt's worker died mid-send is pending and long past due: publish it again. Duplicates send nothing: an
    attempt is claimed in the database."""
    with session_scope() as session:
        overdue = repo.overdue_webhook_ids(session, overdue_before=utcnow() - timedelta(seconds=settings.requeue_after_s))
    return _publish_all(overdue, publish_webhook,
                        lambda session, ids: repo.mark_webhooks_published(session, delivery_ids=ids), "webhook")  # fmt: skip


def _loop(interval_s: float) -> None:
    while not _stopping.is_set():
        try:
            reconcile_once()
        except Exception:
            log.warning("reconciler pass failed; retrying next interval", exc_info=True)
        _stopping.wait(interval_s)


def start_reconciler() -> None:
    if _started.is_set():
        return
    _started.set()
    threading.Thread(target=_loop, args=(get_settings().reconcile_interval_s,), name="reconciler",
                     daemon=True).start()  # fmt: skip


def stop_reconciler() -> None:
    """No passes after this one: a worker in warm shutdown must not re-publish the job it just handed back
    (that job's next publish is the hand-back's own); the workers that stay reconcile."""
    _stopping.set()
