"""Files: teacher weights and datasets."""

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app import repositories as repo
from app.api.deps import After, CurrentTenant, Limit, SessionDep
from app.errors import invalid, not_found
from app.models import File
from app.schemas import FilePublic, FilesPublic, problem_responses
from app.services import store_upload
from app.settings import get_settings
from app.uploads import receive_upload

router = APIRouter(prefix="/v1/files", tags=["files"], responses=problem_responses(401, 404, 422, 503))

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "format": "binary"},
                           "purpose": {"type": "string", "enum": ["teacher", "dataset"]}},
        }}},
    }
}  # fmt: skip


def file_public(f: File) -> FilePublic:
    return FilePublic(id=f.id, purpose=f.purpose, filename=f.filename, bytes=f.bytes, sha256=f.sha256,
                      format=f.format, created_at=f.created_at)  # fmt: skip


@router.post("", status_code=201, response_model=FilePublic, openapi_extra=UPLOAD_BODY,
             responses=problem_responses(408, 413))  # fmt: skip
async def upload_file(request: Request, session: SessionDep, tenant_id: CurrentTenant) -> FilePublic:
    """Upload teacher weights (safetensors) or a dataset (npz or safetensors), streamed and validated."""
    settings = get_settings()
    upload = await receive_upload(request, tmp_dir=settings.data_dir / "tmp", max_bytes=settings.max_upload_bytes,
                                  timeout_s=settings.upload_timeout_s)  # fmt: skip
    try:
        purpose = upload.fields.get("purpose")
        if purpose not in ("teacher", "dataset"):
            raise invalid(["body", "purpose"], "purpose must be 'teacher' or 'dataset'")

        def _store() -> File:
            file = store_upload(session, tenant_id=tenant_id, purpose=purpose, upload=upload)
            session.commit()
            return file

        return file_public(await run_in_threadpool(_store))
    finally:
        upload.path.unlink(missing_ok=True)


@router.get("", response_model=FilesPublic)
def list_files(session: SessionDep, tenant_id: CurrentTenant, limit: Limit = 20, after: After = None,
               purpose: Annotated[Literal["teacher", "dataset"] | None, Query()] = None) -> FilesPublic:  # fmt: skip
    """List the tenant's files, newest first."""
    rows = repo.list_files(session, tenant_id=tenant_id, limit=limit, after=after, purpose=purpose)
    return FilesPublic(data=[file_public(f) for f in rows[:limit]], has_more=len(rows) > limit)


@router.get("/{file_id}", response_model=FilePublic)
def get_file(file_id: str, session: SessionDep, tenant_id: CurrentTenant) -> FilePublic:
    """Read one file's record."""
    file = repo.get_file(session, tenant_id=tenant_id, file_id=file_id)
    if file is None:
        raise not_found("file", file_id)
    return file_public(file)


@router.delete("/{file_id}", status_code=204)
def delete_file(file_id: str, session: SessionDep, tenant_id: CurrentTenant) -> Response:
    """Delete a file (jobs already created keep working from their own inputs)."""
    file = repo.get_file(session, tenant_id=tenant_id, file_id=file_id)
    if file is None:
        raise not_found("file", file_id)
    repo.mark_file_deleted(session, file=file)
    session.commit()
    return Response(status_code=204)
