"""The Celery app both sides share: the API publishes job ids by task name, the worker registers the tasks."""

from functools import lru_cache

from celery import Celery

from app.settings import Settings, get_settings

RUN_JOB = "distill.run_job"
DELIVER_WEBHOOK = "distill.deliver_webhook"


def make_celery(settings: Settings) -> Celery:
    app = Celery("distill", broker=settings.broker_url)
    transport_options = {}
    if settings.redis_url:
        # The database lease decides redelivery, not the broker: a long visibility timeout keeps Redis from
        # re-sending a long job that is still running.
        transport_options = {"visibility_timeout": 7 * 24 * 3600, "socket_timeout": 5, "socket_connect_timeout": 5}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def publish_job(job_id: str) -> None:
    """Send the job id (and nothing else) to the workers' queue."""
    settings = get_settings()
    get_celery().send_task(RUN_JOB, args=[job_id], queue=settings.queue, retry=True,
                           retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})  # fmt: skip


def publish_webhook(delivery_id: str, countdown: float | None = None) -> None:
    """Send a webhook delivery id (and nothing else) to the workers, optionally not before `countdown` seconds.
    It shares the job queue: a free worker sends it between jobs (a delivery takes at most webhook_timeout_s)."""
    settings = get_settings()
    get_celery().send_task(DELIVER_WEBHOOK, args=[delivery_id], queue=settings.queue,
                           countdown=countdown, retry=True,
                           retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})  # fmt: skip
