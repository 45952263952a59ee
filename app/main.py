"""The FastAPI application."""

from fastapi import FastAPI

from app.api.routes import files, health, jobs, webhooks
from app.errors import install_error_handlers
from app.observability import configure_logging, install_metrics
from app.settings import get_settings


def create_app() -> FastAPI:
    app = FastAPI(
        title="Distillation service",
        version="1.0.0",
        description="Knowledge distillation as a service: upload teachers and data, post a job, download a student.",
    )
    install_error_handlers(app)
    install_metrics(app)
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(webhooks.router)
    return app


configure_logging(get_settings().json_logs)
app = create_app()
