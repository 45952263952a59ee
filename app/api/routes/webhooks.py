"""The tenant's webhook signing secret: create it (shown once), rotate it, read what it is without the secret."""

from fastapi import APIRouter

from app import repositories as repo
from app.api.deps import CurrentTenant, SessionDep
from app.errors import ProblemError
from app.models import WebhookSecret
from app.schemas import WebhookSecretPublic, problem_responses
from app.services import create_webhook_secret, rotate_webhook_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=problem_responses(401, 503))


def _no_secret() -> ProblemError:
    return ProblemError(404, "You have no webhook secret yet; create it with POST /v1/webhooks/secret "
                             "(`distill webhooks secret`).", code="not_found")  # fmt: skip


def secret_public(row: WebhookSecret, *, reveal: bool) -> WebhookSecretPublic:
    return WebhookSecretPublic(secret=row.secret if reveal else None, prefix=row.secret[:10],
                               created_at=row.created_at, previous_expires_at=row.previous_expires_at)  # fmt: skip


@router.post("/secret", status_code=201, response_model=WebhookSecretPublic, responses=problem_responses(409))
def create_secret(session: SessionDep, tenant_id: CurrentTenant) -> WebhookSecretPublic:
    """Create the signing secret for your webhooks; the answer is the only time it is shown."""
    row = create_webhook_secret(session, tenant_id=tenant_id)
    if row is None:
        raise ProblemError(409, "You already have a webhook secret; rotate it with POST /v1/webhooks/secret/rotate "
                                "(`distill webhooks secret --rotate`).", code="webhook_secret_exists")  # fmt: skip
    session.commit()
    return secret_public(row, reveal=True)


@router.post("/secret/rotate", status_code=201, response_model=WebhookSecretPublic, responses=problem_responses(404))
def rotate_secret(session: SessionDep, tenant_id: CurrentTenant) -> WebhookSecretPublic:
    """Replace the secret (shown once); the previous one also signs deliveries for WEBHOOK_SECRET_GRACE_S."""
    row = rotate_webhook_secret(session, tenant_id=tenant_id)
    if row is None:
        raise _no_secret()
    session.commit()
    return secret_public(row, reveal=True)


@router.get("/secret", response_model=WebhookSecretPublic, responses=problem_responses(404))
def get_secret(session: SessionDep, tenant_id: CurrentTenant) -> WebhookSecretPublic:
    """When the secret was made and how it starts; never the secret itself."""
    row = repo.get_webhook_secret(session, tenant_id=tenant_id)
    if row is None:
        raise _no_secret()
    return secret_public(row, reveal=False)
