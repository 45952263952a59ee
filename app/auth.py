"""API keys: random secrets shown once, stored as SHA-256, each belonging to a tenant."""

import hashlib
import hmac
import secrets

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


def tenant_for_key(session: Session, *, key: str) -> str | None:
    """The key's tenant, or None for an unknown or revoked key.

    The lookup is by SHA-256 of the presented key, so response timing depends on a hash the caller cannot
    steer, and the final comparison is constant-time.
    """
    digest = hash_key(key)
    row = repo.get_api_key_by_hash(session, key_hash=digest)
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row.tenant_id


def revoke_api_key(session: Session, *, key_id: str) -> bool:
    return repo.revoke_api_key(session, key_id=key_id)
