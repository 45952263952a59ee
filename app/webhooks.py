"""Job webhooks, the API side: which URLs may be called, how a body is signed, and the outbox row.

When a job ends, the transaction that ends it also writes a `WebhookDelivery` holding the exact body; once that
commits, the delivery id is published to the workers (`worker/webhooks.py` sends it, with retries). The reconciler
re-publishes a delivery whose message was lost. Receivers verify `Distill-Signature` (README "Webhooks").
"""

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
from collections.abc import Iterable
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from app import repositories as repo
from app.ids import new_id
from app.models import WebhookDelivery, WebhookSecret, utcnow
from app.queue import publish_webhook
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Distill-Signature"
DELIVERY_HEADER = "Distill-Delivery"
EVENT_HEADER = "Distill-Event"
SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2048


class UnsafeWebhookTarget(ValueError):
    """The URL, or an address its host resolves to, is one the service may not call."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _refused_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why this address is off limits by default (private, loopback, link-local, ...), or None."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for what in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{what}"):
            return what.replace("_", "-")
    if not ip.is_global:
        return "non-public"
    return None


def check_webhook_url(url: str, settings: Settings | None = None) -> str:
    """The URL as given, if the service may call it; else ValueError saying why (pydantic turns it into a 422)."""
    settings = settings or get_settings()
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"a webhook URL is at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("a webhook URL may not contain spaces or control characters")
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError("must be an absolute https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("a webhook URL may not carry credentials (user:password@); put a token in the path or "
                         "verify the Distill-Signature header instead")  # fmt: skip
    if parts.fragment:
        raise ValueError("a webhook URL may not have a #fragment (it is never sent)")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError("the port is not a number between 0 and 65535") from None
    if parts.scheme == "http" and host not in settings.webhook_http_host_set:
        raise ValueError("must use https (plain http only to the hosts in WEBHOOK_HTTP_HOSTS)")
    if not settings.webhook_allow_private:
        if host == "localhost" or host.endswith(".localhost"):
            raise ValueError("loopback targets are refused (WEBHOOK_ALLOW_PRIVATE=true allows them)")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and (why := _refused_address(ip)):
            raise ValueError(f"{why} addresses are refused (WEBHOOK_ALLOW_PRIVATE=true allows them)")
    return url


def resolve_target(host: str, port: int, settings: Settings | None = None) -> str:
    """The address to connect to: the host's first resolved address, after checking every one of them (a name
    that resolves to an internal address is refused at send time too, not only an IP literal in the URL)."""
    settings = settings or get_settings()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host}: {e.strerror or e}") from None
    addresses = [info[4][0] for info in infos]
    if not settings.webhook_allow_private:
        for address in addresses:
            if why := _refused_address(ipaddress.ip_address(address.split("%", 1)[0])):
                raise UnsafeWebhookTarget(f"{host} resolves to {address}, a {why} address; refused "
                                          "(WEBHOOK_ALLOW_PRIVATE=true allows it)")  # fmt: skip
    return addresses[0]


def signing_secrets(row: WebhookSecret | None, now: datetime) -> list[str]:
    """The current secret, then the previous one while its grace period lasts."""
    if row is None:
        return []
    keys = [row.secret]
    if row.previous_secret and row.previous_expires_at and row.previous_expires_at > now:
        keys.append(row.previous_secret)
    return keys


def sign(body: bytes, keys: Iterable[str], timestamp: int) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>` with one v1 per key."""
    signed = f"{timestamp}.".encode() + body
    macs = [hmac.new(key.encode(), signed, hashlib.sha256).hexdigest() for key in keys]
    return ",".join([f"t={timestamp}", *(f"v1={mac}" for mac in macs)])


def _links(job_id: str, settings: Settings) -> dict[str, str]:
    base = (settings.public_base_url or "").rstrip("/")
    path = f"{base}/v1/jobs/{job_id}"
    return {"job": path, "events": f"{path}/events", "metrics": f"{path}/metrics", "artifacts": f"{path}/artifacts"}


def record_job_finished(session: Session, *, job_id: str) -> str | None:
    """In the transaction that ended the job: write the delivery (body fixed now) if the job has a webhook_url.
    Returns its id, which the caller publishes after commit (`announce`)."""
    job = repo.get_job(session, job_id=job_id)
    if job is None:
        return None
    session.refresh(job)
    url = (job.spec or {}).get("webhook_url")
    if not url or job.status not in repo.TERMINAL:
        return None
    delivery_id, now = new_id("evt"), utcnow()
    event_type = f"job.{job.status}"
    artifacts = [{"name": a.name, "bytes": a.bytes, "sha256": a.sha256}
                 for a in repo.list_artifacts(session, job_id=job_id)]  # fmt: skip
    settings = get_settings()

    def when(value: datetime | None) -> str | None:
        return value.isoformat().replace("+00:00", "Z") if value else None

    body = {
        "id": delivery_id, "object": "event", "type": event_type, "created_at": when(now),
        "data": {
            "job": {"id": job.id, "object": "distillation.job", "name": job.name, "status": job.status,
                    "created_at": when(job.created_at), "started_at": when(job.started_at),
                    "finished_at": when(job.finished_at), "attempts": job.attempts, "metrics": job.summary,
                    "error": job.error, "metadata": job.job_metadata or {}},
            "artifacts": artifacts,
            "links": _links(job.id, settings),
        },
    }  # fmt: skip
    repo.add_webhook_delivery(session, delivery=WebhookDelivery(
        id=delivery_id, job_id=job.id, tenant_id=job.tenant_id, event_type=event_type, url=url,
        body=json.dumps(body, separators=(",", ":"), ensure_ascii=False), status="pending", attempts=0,
        next_attempt_at=now, created_at=now,
    ))  # fmt: skip
    return delivery_id


def announce(delivery_ids: Iterable[str | None]) -> None:
    """After commit: hand each delivery to the workers. A broker outage loses nothing; the reconciler re-publishes
    pending deliveries that are overdue."""
    for delivery_id in delivery_ids:
        if delivery_id is None:
            continue
        try:
            publish_webhook(delivery_id)
        except Exception:
            log.warning("could not publish webhook %s now; the reconciler will", delivery_id, exc_info=True)
