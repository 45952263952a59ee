"""Use cases behind the routes. Services never commit; the route (the request's unit of work) does."""

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import repositories as repo
from app.errors import ProblemError, invalid, not_found
from app.file_checks import TABLE_FORMATS, InvalidFile, validate_upload
from app.ids import new_id
from app.models import File, Job, WebhookSecret, utcnow
from app.schemas import BUILTIN_DATA, JobCreate
from app.settings import get_settings
from app.storage import get_store
from app.uploads import ReceivedUpload
from app.webhooks import new_secret, record_job_finished

# ---- files ---------------------------------------------------------------------------------------


def store_upload(session: Session, *, tenant_id: str, purpose: str, upload: ReceivedUpload) -> File:
    """Validate the bytes by content, then move them into the store under a generated key."""
    try:
        fmt, details = validate_upload(upload.path, purpose)
    except InvalidFile as e:
        raise invalid(["body", "file"], str(e), type_="invalid_file") from None
    file_id = new_id("file")
    key = f"files/{file_id}"
    get_store().put_file(key, upload.path)
    # The user's name is kept for display only, trimmed and stripped of path parts and control characters.
    name = upload.filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:255] or "upload"
    return repo.add_file(session, file=File(
        id=file_id, tenant_id=tenant_id, purpose=purpose, filename=name, bytes=upload.bytes,
        sha256=upload.sha256, format=fmt, storage_key=key, details=details,
    ))  # fmt: skip


# ---- jobs ----------------------------------------------------------------------------------------


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _dataset(session: Session, *, tenant_id: str, ref: str, loc: list, needs_labels: bool,
             needs_x_teacher: bool = False) -> File | None:  # fmt: skip
    """The dataset file ``ref`` names (None for a built-in), checked against what the method needs."""
    if ref.startswith("builtin:"):
        if ref not in BUILTIN_DATA:
            raise invalid(loc, f"unknown built-in dataset {ref!r}; valid: {', '.join(BUILTIN_DATA)}")
        if needs_x_teacher:
            raise invalid(loc, f"built-in dataset {ref} has no 'x_teacher' (the teacher's modality), which "
                               "cross-modal distillation needs; upload a dataset with x, x_teacher")  # fmt: skip
        return None
    if not ref.startswith("file_"):
        raise invalid(loc, "expected a dataset file id (file_…) or a built-in dataset name")
    file = repo.get_file(session, tenant_id=tenant_id, file_id=ref)
    if file is None:
        raise not_found("file", ref)
    if file.purpose != "dataset":
        raise invalid(loc, f"file {ref} was uploaded with purpose {file.purpose!r}, not 'dataset'")
    if needs_labels and not file.details.get("has_labels"):
        raise invalid(loc, f"file {ref} has no 'y' labels, which this method needs (only teacher-alone "
                           "distillation, alpha = 1, learns without labels)")  # fmt: skip
    if needs_x_teacher and not file.details.get("has_x_teacher"):
        raise invalid(loc, f"file {ref} has no 'x_teacher' array (the teacher's modality, paired row by row "
                           "with 'x'), which cross-modal distillation needs")  # fmt: skip
    return file


def _check_data_options(body: JobCreate, files: list[tuple[File | None, str]]) -> None:
    """``data`` against the kinds of the job's files: each kind's required option, header columns, no strays."""
    data, formats = body.data, {f.format for f, _ in files if f is not None}
    for file, field in files:
        if file is None:
            continue
        if file.format == "images":
            if data.image_size is None:
                raise invalid(["body", "data", "image_size"], f"{field} {file.id} is a zip of image folders: "
                              "give data.image_size [H, W] to resize its images to")  # fmt: skip
            if field == "train_file" and file.details.get("layout") == "train_val" and body.validation_file:
                raise invalid(["body", "validation_file"], f"train_file {file.id} holds its own val/ folder; "
                                                           "give no validation_file")  # fmt: skip
        if file.format in TABLE_FORMATS:
            if data.label_column is None:
                raise invalid(["body", "data", "label_column"], f"{field} {file.id} is a {file.format} table: "
                              "name its label column in data.label_column")  # fmt: skip
            if data.feature_columns and data.label_column in data.feature_columns:
                raise invalid(["body", "data", "feature_columns"],
                              f"the label column {data.label_column!r} cannot also be a feature column")  # fmt: skip
            columns = file.details.get("columns")  # CSV header; a Parquet schema is checked by the worker
            if columns is not None:
                if data.label_column not in columns:
                    raise invalid(["body", "data", "label_column"], f"column {data.label_column!r} is not in "
                                  f"the header of {field} {file.id}: {columns[:50]}")  # fmt: skip
                absent = [c for c in data.feature_columns or [] if c not in columns]
                if absent:
                    raise invalid(["body", "data", "feature_columns"], f"columns {absent[:10]} are not in the "
                                  f"header of {field} {file.id}: {columns[:50]}")  # fmt: skip
    if data.image_size is not None and "images" not in formats:
        raise invalid(["body", "data", "image_size"], "data.image_size applies to image-folder zips, and this "
                                                      "job's data files are not one")  # fmt: skip
    if (data.label_column or data.feature_columns) and not formats & set(TABLE_FORMATS):
        field = "label_column" if data.label_column else "feature_columns"
        raise invalid(["body", "data", field], f"data.{field} applies to CSV and Parquet tables, and this "
                                               "job's data files are not one")  # fmt: skip


def _normalise_spec(session: Session, *, tenant_id: str, body: JobCreate) -> dict[str, Any]:
    spec = body.model_dump(mode="json")
    # Labels and the teacher's modality, per method (see the Method classes); a validation file without
    # labels is allowed where training needs none (only teacher agreement can then be measured).
    needs_labels, needs_x_teacher = body.method.needs_labels(), body.method.needs_x_teacher
    files = [(_dataset(session, tenant_id=tenant_id, ref=body.train_file, loc=["body", "train_file"],
                       needs_labels=needs_labels, needs_x_teacher=needs_x_teacher), "train_file")]  # fmt: skip
    if body.validation_file is not None:
        files.append((_dataset(session, tenant_id=tenant_id, ref=body.validation_file,
                               loc=["body", "validation_file"], needs_labels=needs_labels,
                               needs_x_teacher=needs_x_teacher), "validation_file"))  # fmt: skip
    _check_data_options(body, files)
    teacher_files = []
    for i, teacher in enumerate(spec["teachers"]):
        loc = ["body", "teachers", i]
        if teacher["weights_file"]:
            file = repo.get_file(session, tenant_id=tenant_id, file_id=teacher["weights_file"])
            if file is None:
                raise not_found("file", teacher["weights_file"])
            if file.purpose != "teacher":
                raise invalid(loc + ["weights_file"], f"file {file.id} has purpose {file.purpose!r}, not 'teacher'")
            _teacher_file_fits(file, teacher["architecture"], loc + ["architecture"])
            teacher_files.append(file)
        else:
            source = repo.get_job(session, job_id=teacher["from_job"], tenant_id=tenant_id)
            if source is None:
                raise not_found("job", teacher["from_job"])
            if source.status != "succeeded":
                raise invalid(loc + ["from_job"], f"job {source.id} is {source.status}; only a succeeded job "
                                                   "can teach")  # fmt: skip
            teacher["architecture"] = source.spec["student"]["architecture"]
    if spec["student"]["architecture"]["name"] == "hf":
        _hf_student_fits(spec["student"]["architecture"]["config"], teacher_files)
    return spec


def _teacher_file_fits(file: File, architecture: dict, loc: list) -> None:
    """A zipped save_pretrained folder is an `hf` teacher, and an `hf` teacher is such a zip."""
    if (file.format == "hf_zip") != (architecture["name"] == "hf"):
        raise invalid(loc + ["name"], f"file {file.id} is a {file.format} file; " + (
            "a Hugging Face zip teaches with architecture {\"name\": \"hf\"}" if file.format == "hf_zip"
            else "architecture 'hf' needs a zipped save_pretrained folder (config.json + model.safetensors)"))
    if file.format == "hf_zip":
        config = architecture["config"]
        if config["model_type"] not in (None, file.details["model_type"]) or any(config["overrides"].values()):
            raise invalid(loc + ["config"], f"a Hugging Face teacher is described by its config.json "
                                            f"({file.details['model_type']}); leave config empty")  # fmt: skip


def _hf_student_fits(config: dict, teacher_files: list[File]) -> None:
    """What the API can check of a transformers student against its teacher's config.json (the worker checks
    the rest): layers copied from a teacher need one of the same family, width and at most its depth."""
    loc = ["body", "student", "architecture", "config"]
    teacher = next((f.details for f in teacher_files if f.format == "hf_zip"), None)
    overrides = {k: v for k, v in config["overrides"].items() if v is not None}
    family = config["model_type"] or (teacher or {}).get("model_type")
    if family is None:
        raise invalid(loc + ["model_type"], "model_type is needed: no teacher is a Hugging Face zip to take it from")
    same_family = teacher is not None and teacher["model_type"] == family
    if config["init"] == "teacher":
        if not same_family:
            raise invalid(loc + ["init"], f"init 'teacher' copies layers from a Hugging Face teacher of the same "
                                          f"family ({family}); there is none: use init 'fresh'")  # fmt: skip
        if overrides.get("hidden_size", teacher["hidden_size"]) != teacher["hidden_size"]:
            raise invalid(loc + ["overrides", "hidden_size"], f"init 'teacher' copies the teacher's layers, which "
                          f"needs its hidden_size {teacher['hidden_size']}: keep it, or use init 'fresh'")  # fmt: skip
        if overrides.get("num_hidden_layers", 0) > teacher["num_hidden_layers"]:
            raise invalid(loc + ["overrides", "num_hidden_layers"], f"init 'teacher' takes every k-th of the "
                          f"teacher's {teacher['num_hidden_layers']} layers; the student cannot have more")  # fmt: skip
    base = teacher if same_family else {}
    width, heads = overrides.get("hidden_size", base.get("hidden_size")), overrides.get(
        "num_attention_heads", base.get("num_attention_heads"))  # fmt: skip
    if width is not None and heads is not None and width % heads:
        raise invalid(loc + ["overrides", "num_attention_heads"],
                      f"num_attention_heads ({heads}) must divide hidden_size ({width})")  # fmt: skip


def create_job(session: Session, *, tenant_id: str, body: JobCreate, idempotency_key: str | None) -> tuple[Job, bool]:
    """Persist a validated job (not yet published). Returns (job, created); created is False on a replay."""
    digest = request_hash(body.model_dump(mode="json"))
    if idempotency_key is not None:
        existing = repo.get_job_by_idempotency_key(session, tenant_id=tenant_id, key=idempotency_key)
        if existing is not None:
            if existing.request_hash != digest:
                raise invalid(["header", "Idempotency-Key"],
                              "this Idempotency-Key was used with a different request body")  # fmt: skip
            return existing, False
    limit = get_settings().max_active_jobs_per_tenant
    active = repo.count_active_jobs(session, tenant_id=tenant_id)
    if active >= limit:
        raise ProblemError(429, f"{active} jobs are queued or running; the limit per tenant is {limit} "
                                "(max_active_jobs_per_tenant). Retry when one finishes.",
                           code="too_many_active_jobs", headers={"Retry-After": "30"})  # fmt: skip
    spec = _normalise_spec(session, tenant_id=tenant_id, body=body)
    if body.webhook_url is not None and repo.get_webhook_secret(session, tenant_id=tenant_id) is None:
        raise invalid(["body", "webhook_url"], "deliveries are signed with your webhook secret, and you have none "
                                               "yet: create it with POST /v1/webhooks/secret or `distill webhooks "
                                               "secret`")  # fmt: skip
    job = Job(id=new_id("job"), tenant_id=tenant_id, name=body.name, status="queued", spec=spec,
              job_metadata=body.metadata, max_attempts=get_settings().max_attempts, progress={},
              idempotency_key=idempotency_key, request_hash=digest)  # fmt: skip
    try:
        with session.begin_nested():
            repo.add_job(session, job=job)
            repo.add_event(session, job_id=job.id, message="Job created and queued.")
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race.
        existing = repo.get_job_by_idempotency_key(session, tenant_id=tenant_id, key=idempotency_key or "")
        if existing is None or existing.request_hash != digest:
            raise invalid(["header", "Idempotency-Key"],
                          "this Idempotency-Key was used with a different request body") from None  # fmt: skip
        return existing, False
    return job, True


def cancel_job(session: Session, *, job: Job) -> str | None:
    """Cancel now (queued) or ask the worker to stop (running). Returns the webhook delivery to announce after
    commit, if cancelling ended the job and it has a webhook_url."""
    delivery_id = None
    if job.status in repo.TERMINAL:
        raise ProblemError(409, f"Job {job.id} is already {job.status}.", code="job_finished")
    if repo.cancel_queued_job(session, job_id=job.id):
        repo.add_event(session, job_id=job.id, message="Job cancelled while queued.")
        delivery_id = record_job_finished(session, job_id=job.id)
    elif repo.request_cancel(session, job_id=job.id):
        repo.add_event(session, job_id=job.id, message="Cancellation requested; the worker stops within a step.")
    session.refresh(job)
    if job.status in ("succeeded", "failed"):
        raise ProblemError(409, f"Job {job.id} is already {job.status}.", code="job_finished")
    return delivery_id


# ---- webhooks ------------------------------------------------------------------------------------


def create_webhook_secret(session: Session, *, tenant_id: str) -> WebhookSecret | None:
    """The tenant's first signing secret; None when it has one (rotating is a separate, deliberate act)."""
    return repo.create_webhook_secret(session, tenant_id=tenant_id, secret=new_secret())


def rotate_webhook_secret(session: Session, *, tenant_id: str) -> WebhookSecret | None:
    """A new secret; the old one keeps signing (a second v1) for webhook_secret_grace_s so receivers can switch."""
    grace_until = utcnow() + timedelta(seconds=get_settings().webhook_secret_grace_s)
    return repo.rotate_webhook_secret(session, tenant_id=tenant_id, secret=new_secret(), grace_until=grace_until)
