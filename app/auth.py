"""API keys: random secrets shown once, stored as SHA-256, each belonging to a tenant."""

import hashlib
import hmac
import secrets
import threading
import time

from sqlalchemy.orm import Session

from app import repositories as repo
from app.ids import new_id

KEY_PREFIX = "dsk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, *, tenant_name: str) -> str:
    """Create the tenant if new, add a key for it and return the secret (the only time it is visible)."""
    tenant = repo.get_or_create_tenant(session, tenant_id=new_id("ten"), name=tenant_name)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes
    repo.add_api_key(session, key_id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(secret),
                     prefix=secret[: len(KEY_PREFIX) + 4])  # fmt: skip
    return secret


class _TenantCache:
    """Key hash → tenant for a few seconds, so a poller costs one query per request, not two.

    Only successful lookups are remembered (a wrong key always reaches the database), and a revoked key
    stops working within the TTL.
    """

    def __init__(self, max_entries: int = 10_000):
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, digest: str) -> str | None:
        entry = self._entries.get(digest)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, digest: str, tenant_id: str, ttl_s: float) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[digest] = (tenant_id, time.monotonic() + ttl_s)


_tenant_cache = _TenantCache()


def cached_tenant_for_key(*, key: str, cache_ttl_s: float) -> str | None:
    """The remembered tenant of a recently seen key, without touching the database."""
    return _tenant_cache.get(hash_key(key)) if cache_ttl_s > 0 else None


def tenant_for_key(session: Session, *, key: str, cache_ttl_s: float = 0.0) -> str | None:
    """The key's tenant, or None for an unknown or revoked key.

    The lookup is by SHA-256 of the presented key, so response timing depends on a hash the caller cannot
    steer, and the final comparison is constant-time.
    """
    digest = hash_key(key)
    if cache_ttl_s > 0 and (tenant_id := _tenant_cache.get(digest)) is not None:
        return tenant_id
    row = repo.get_api_key_by_hash(session, key_hash=digest)
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    if cache_ttl_s > 0:
        _tenant_cache.put(digest, row.tenant_id, cache_ttl_s)
    return row.tenant_id


def revoke_api_key(session: Session, *, key_id: str) -> bool:
    return repo.revoke_api_key(session, key_id=key_id)
