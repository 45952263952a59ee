"""The worker's Celery app: the shared configuration plus the registered tasks and the reconciler."""

from celery import signals

from app.queue import make_celery
from app.settings import get_settings

celery_app = make_celery(get_settings())

import worker.tasks  # noqa: E402,F401  (registers the tasks on celery_app)
from worker.reconciler import start_reconciler  # noqa: E402


@signals.worker_ready.connect
def _start_reconciler(**_kwargs) -> None:
    start_reconciler()
