"""The worker's Celery app: the shared configuration plus the registered tasks and the reconciler."""

from celery import signals

from app.queue import make_celery
from app.settings import get_settings

celery_app = make_celery(get_settings())

import worker.tasks  # noqa: E402  (registers the tasks on celery_app)
import worker.webhooks  # noqa: E402  (registers the webhook delivery task)
from worker.reconciler import start_reconciler, stop_reconciler  # noqa: E402


@signals.worker_ready.connect
def _start_reconciler(**_kwargs) -> None:
    start_reconciler()


@signals.worker_shutting_down.connect
def _hand_back_running_job(**_kwargs) -> None:
    """Warm shutdown waits for the running task (solo pool); tell it to stop at its next step and hand the job
    back, instead of training on until the process is killed and the job waits out its lease."""
    stop_reconciler()
    worker.tasks.SHUTTING_DOWN.set()
