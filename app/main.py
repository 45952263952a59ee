"""The FastAPI application."""

import logging

from fastapi import FastAPI

from app.api.routes import files, health, jobs
from app.errors import install_error_handlers


def create_app() -> FastAPI:
    app = FastAPI(
        title="Distillation service",
        version="1.0.0",
        description="Knowledge distillation as a service: upload teachers and data, post a job, download a student.",
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
app = create_app()
