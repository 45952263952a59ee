"""Webhook delivery: one signed POST per attempt, retried with exponential backoff, each attempt a job event.

The message carries a delivery id only; the row (`app.models.WebhookDelivery`) holds the URL and the exact body.
An attempt is claimed with a conditional UPDATE (so a duplicate message sends nothing) and leased: if its worker
dies mid-send, the reconciler re-publishes it once the lease is long past.
"""

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import httpx

from app import repositories as repo
from app.db import session_scope
from app.models import utcnow
from app.queue import DELIVER_WEBHOOK, publish_webhook
from app.settings import get_settings
from app.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    UnsafeWebhookTarget,
    check_webhook_url,
    resolve_target,
    sign,
    signing_secrets,
)  # fmt: skip
from worker.celery_app import celery_app

log = logging.getLogger(__name__)
USER_AGENT = "distill-webhooks/1"
# 408 and 429 say "later"; every other 4xx says this request will never be accepted.
RETRYABLE_4XX = (408, 429)


@dataclass
class Outcome:
    status_code: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    permanent: bool = False  # no point retrying (refused target, or a 4xx the receiver means)

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def send(url: str, body: bytes, *, keys: list[str], delivery_id: str, event_type: str) -> Outcome:
    """One attempt: connect to the vetted address of the URL's host (no re-resolution between check and
    connect), TLS still verified against the host name; no redirects followed; the answer's body is not read."""
    settings = get_settings()
    try:
        check_webhook_url(url, settings)
        target = httpx.URL(url)
        address = resolve_target(target.host, target.port or (443 if target.scheme == "https" else 80), settings)
    except (ValueError, UnsafeWebhookTarget) as e:
        return Outcome(error=f"refused: {e}", permanent=True)
    except OSError as e:
        return Outcome(error=str(e))
    headers = {
        "Content-Type": "application/json", "User-Agent": USER_AGENT, "Host": target.netloc.decode("ascii"),
        DELIVERY_HEADER: delivery_id, EVENT_HEADER: event_type,
        SIGNATURE_HEADER: sign(body, keys, int(time.time())),
    }  # fmt: skip
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("POST", target.copy_with(host=address), content=body, headers=headers,
                                           extensions=extensions)  # fmt: skip
            response = client.send(request, stream=True)
            response.close()
    except httpx.TimeoutException:
        return Outcome(error=f"timed out after {settings.webhook_timeout_s:g} s")
    except httpx.HTTPError as e:
        return Outcome(error=f"{type(e).__name__}: {e}"[:300])
    code = response.status_code
    return Outcome(status_code=code, retry_after_s=_retry_after(response.headers.get("retry-after")),
                   permanent=400 <= code < 500 and code not in RETRYABLE_4XX)  # fmt: skip


def backoff_s(attempt: int) -> float:
    """Seconds before the attempt after `attempt`: base, 2·base, 4·base, ... up to webhook_retry_max_s."""
    settings = get_settings()
    return min(settings.webhook_retry_base_s * 2 ** (attempt - 1), settings.webhook_retry_max_s)


def deliver(delivery_id: str) -> str:
    """Make the attempt that is due, record it, and schedule the next one. Returns what happened (logs, tests)."""
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        # A little early is fine (clocks differ between hosts); the lease covers the whole attempt.
        attempt = repo.claim_webhook_attempt(session, delivery_id=delivery_id, due_by=now + timedelta(seconds=1),
                                             lease_until=now + timedelta(seconds=settings.webhook_timeout_s + 30))  # fmt: skip
        if attempt is None:
            return "skipped"
        row = repo.get_webhook_delivery(session, delivery_id=delivery_id)
        keys = signing_secrets(repo.get_webhook_secret(session, tenant_id=row.tenant_id), now)
        job_id, url, body, event_type = row.job_id, row.url, row.body.encode(), row.event_type
    if keys:
        outcome = send(url, body, keys=keys, delivery_id=delivery_id, event_type=event_type)
    else:
        outcome = Outcome(error="the tenant has no webhook signing secret", permanent=True)

    max_attempts = settings.webhook_max_attempts
    retry_in = None
    if outcome.delivered:
        status, level, what = "delivered", "info", "delivered"
    elif outcome.permanent or attempt >= max_attempts:
        status, level, what = "failed", "error", "failed; giving up"
    else:
        retry_in = backoff_s(attempt)
        if outcome.retry_after_s is not None:
            retry_in = min(max(retry_in, outcome.retry_after_s), settings.webhook_retry_max_s)
        status, level, what = "pending", "warning", f"failed; retrying in {retry_in:g} s"
    next_at = utcnow() + timedelta(seconds=retry_in) if retry_in is not None else None
    answer = f"HTTP {outcome.status_code}" if outcome.status_code is not None else outcome.error
    with session_scope() as session:
        if not repo.record_webhook_attempt(session, delivery_id=delivery_id, attempt=attempt, status=status,
                                           next_attempt_at=next_at, status_code=outcome.status_code,
                                           error=outcome.error):  # fmt: skip
            return "lost"  # a later attempt took over (this one outlived its lease)
        repo.add_event(session, job_id=job_id, level=level, type_="webhook",
                       message=f"Webhook {event_type} attempt {attempt}/{max_attempts} to {url}: {answer}; {what}.",
                       data={"delivery_id": delivery_id, "event": event_type, "attempt": attempt,
                             "max_attempts": max_attempts, "status_code": outcome.status_code,
                             "error": outcome.error, "outcome": status,
                             "next_retry_at": next_at.isoformat().replace("+00:00", "Z") if next_at else None})  # fmt: skip
    if retry_in is not None:
        try:
            publish_webhook(delivery_id, countdown=retry_in)
        except Exception:
            log.warning("could not schedule webhook %s; the reconciler will", delivery_id, exc_info=True)
    return status


@celery_app.task(name=DELIVER_WEBHOOK, acks_late=True, ignore_result=True)
def deliver_webhook_task(delivery_id: str) -> str:
    return deliver(delivery_id)
