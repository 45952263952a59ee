"""The job task: claim in the database, run the engine with callbacks, publish one set of artifacts.

The broker message carries only the job id; everything else is read from the database. A worker owns a job
while its lease holds; `attempt` (the claim's attempts value) fences every write, so a worker that lost the job
can write nothing.
"""

import hashlib
import logging
import math
import mimetypes
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as SATimeoutError

from app import repositories as repo
from app.db import session_scope
from app.models import Artifact
from app.queue import RUN_JOB, publish_job
from app.settings import get_settings
from app.storage import get_store
from app.webhooks import announce, record_job_finished
from worker.celery_app import celery_app
from worker.engine import (
    Callback, CancelCallback, CheckpointCallback, EngineError, ProgressCallback, RunInputs, TeacherInput,
    configure_threads, kernels, run_distillation,
)  # fmt: skip

log = logging.getLogger(__name__)
# Once per worker process, before any job: torch's intra-op threads matched to the cores this worker may use.
TORCH_THREADS = configure_threads(get_settings().worker_threads or None)
kernels.warm()  # compile (or load from Numba's cache) the fused loss kernel now, not inside the first job
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
# Set when this worker begins a warm shutdown (SIGTERM, Ctrl-C; see worker/celery_app.py). The running job stops
# at its next step, like a cancel, and is handed back to the queue instead of finishing.
SHUTTING_DOWN = threading.Event()
CONTENT_TYPES = {".safetensors": "application/octet-stream", ".onnx": "application/octet-stream",
                 ".json": "application/json", ".md": "text/markdown; charset=utf-8", ".png": "image/png"}  # fmt: skip


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Claim:
    """What one attempt holds: the job's inputs as read at claim time, and the fencing token."""

    job_id: str
    attempt: int
    spec: dict
    checkpoint_key: str | None
    checkpoint_epoch: int | None
    inputs: dict = field(default_factory=dict)  # storage keys and sha256 of each input


class Ownership:
    """Lease renewal and the cancel flag. A daemon thread renews the lease between progress writes."""

    def __init__(self, job_id: str, attempt: int):
        self.job_id, self.attempt = job_id, attempt
        self.lease_seconds = get_settings().lease_seconds
        self.timeout_s = get_settings().job_timeout_s
        self.deadline = time.monotonic() + self.timeout_s
        self.lost = False
        self.cancel_requested = False
        self.timed_out = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def renew(self, progress: dict | None = None) -> None:
        with self._lock:
            try:
                with session_scope() as session:
                    owner, cancel = repo.renew_lease(session, job_id=self.job_id, attempt=self.attempt,
                                                     lease_seconds=self.lease_seconds, progress=progress)  # fmt: skip
                self.lost = self.lost or not owner
                self.cancel_requested = cancel
            except Exception:
                # A database outage is not a lost lease: keep training, keep retrying.
                log.warning("lease renewal for %s failed; will retry", self.job_id, exc_info=True)

    def _beat(self) -> None:
        interval = max(1.0, self.lease_seconds / 4)
        while not self._stop.wait(interval):
            self.renew()

    def should_stop(self) -> bool:
        self.renew()
        self.timed_out = self.timed_out or time.monotonic() > self.deadline
        return self.lost or self.cancel_requested or self.timed_out or SHUTTING_DOWN.is_set()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def json_safe(value):
    """JSON columns refuse NaN and infinities (PostgreSQL rejects them); they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _transient(exc: Exception) -> bool:
    """Outages worth waiting out: a lost database connection, a store or network error."""
    if isinstance(exc, DBAPIError):
        return isinstance(exc, OperationalError) or exc.connection_invalidated
    return isinstance(exc, OSError | SATimeoutError) or type(exc).__module__.startswith(("botocore", "boto3"))


def _retrying(fn, *, attempts: int = 30, what: str):
    """Run a database or store write, retrying through a short outage (the lease covers us meanwhile)."""
    delay = 0.5
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if i == attempts - 1 or not _transient(exc):
                raise
            log.warning("%s failed; retrying in %.1fs", what, delay, exc_info=True)
            threading.Event().wait(delay)
            delay = min(delay * 2, 5.0)


class ServiceCallback(Callback):
    """Turns engine events into database rows and store objects for this attempt."""

    def __init__(self, claim: Claim, ownership: Ownership):
        self.claim, self.ownership = claim, ownership
        self.saves = 0
        self.checkpoint_key = claim.checkpoint_key  # the recorded one; replaced (and deleted) by each new save

    def on_epoch_end(self, state) -> None:
        row = json_safe(state.history[-1])
        phase = row.get("phase", "train")

        def write():
            with session_scope() as session:
                # The per-epoch series is the distillation run's; the baseline's epochs are in events.
                if phase == "train":
                    repo.upsert_metric(session, job_id=self.claim.job_id, epoch=row["epoch"], data=row)
                repo.add_event(session, job_id=self.claim.job_id, type_="metrics",
                               message=f"{phase} epoch {row['epoch']}/{state.epochs}", data=row)  # fmt: skip

        _retrying(write, what="metrics write")

    def on_checkpoint(self, state, path: Path) -> None:
        # A new key per save: the record in the database always names the object it describes (a worker killed
        # between upload and record leaves the previous pair intact), and a worker that lost the job can never
        # overwrite the checkpoint its successor resumes from.
        self.saves += 1
        key = f"jobs/{self.claim.job_id}/checkpoints/attempt-{self.claim.attempt}-{self.saves}.pt"
        store = get_store()
        _retrying(lambda: store.put_file(key, path), what="checkpoint upload")

        def record() -> bool:
            with session_scope() as session:
                return repo.set_checkpoint(session, job_id=self.claim.job_id, attempt=self.claim.attempt, key=key,
                                           epoch=state.epoch)  # fmt: skip

        if _retrying(record, what="checkpoint record"):
            stale, self.checkpoint_key = self.checkpoint_key, key  # the one recorded before is unreferenced now
        else:
            stale = key  # this attempt no longer owns the job: its upload is garbage
        if stale:
            try:
                store.delete(stale)
            except Exception:
                log.warning("could not delete stale checkpoint %s", stale, exc_info=True)

    def on_log(self, state, level: str, message: str, data: dict) -> None:
        if message == "job cancelled" and SHUTTING_DOWN.is_set() and not self.ownership.cancel_requested:
            message = "training stopped: the worker is shutting down"

        def write():
            with session_scope() as session:
                repo.add_event(session, job_id=self.claim.job_id, level=level, message=message,
                               data=json_safe(data))  # fmt: skip

        _retrying(write, what="event write")


def _claim(job_id: str) -> Claim | None:
    settings = get_settings()
    with session_scope() as session:
        attempt = repo.claim_job(session, job_id=job_id, worker_id=WORKER_ID, lease_seconds=settings.lease_seconds)
        if attempt is None:
            deliveries = []
            for failed_id in repo.fail_exhausted_jobs(session, job_ids=[job_id]):
                repo.add_event(session, job_id=failed_id, level="error", message="Failed: out of attempts.")
                deliveries.append(record_job_finished(session, job_id=failed_id))
            session.commit()
            announce(deliveries)
            return None
        job = repo.get_job(session, job_id=job_id)
        claim = Claim(job_id, attempt, job.spec, job.checkpoint_key, job.checkpoint_epoch)
        spec = job.spec
        for ref in (spec["train_file"], spec.get("validation_file")):
            if ref and ref.startswith("file_"):
                f = repo.get_file(session, tenant_id=job.tenant_id, file_id=ref) or _deleted_file(session, ref)
                claim.inputs[ref] = {"key": f.storage_key, "sha256": f.sha256, "suffix": "." + f.format}
        for i, teacher in enumerate(spec["teachers"]):
            if teacher.get("weights_file"):
                f = repo.get_file(session, tenant_id=job.tenant_id, file_id=teacher["weights_file"]) or \
                    _deleted_file(session, teacher["weights_file"])  # fmt: skip
                claim.inputs[f"teacher{i}"] = {"key": f.storage_key, "sha256": f.sha256, "suffix": ".safetensors"}
            else:
                model = repo.get_artifact(session, job_id=teacher["from_job"], name="model.safetensors")
                claim.inputs[f"teacher{i}"] = {"key": model.storage_key, "sha256": model.sha256,
                                               "suffix": ".safetensors"}  # fmt: skip
        resumed = f", resuming after epoch {job.checkpoint_epoch}" if job.checkpoint_key else ""
        repo.add_event(session, job_id=job_id, message=f"Attempt {attempt} started on {WORKER_ID}{resumed}.",
                       data={"attempt": attempt, "worker": WORKER_ID, "resume_epoch": job.checkpoint_epoch})  # fmt: skip
        if job.checkpoint_epoch is not None:
            repo.delete_metrics_after(session, job_id=job_id, epoch=job.checkpoint_epoch)
    return claim


def _deleted_file(session, file_id: str):
    """A file deleted after the job was created still feeds the job that references it."""
    from sqlalchemy import select

    from app.models import File

    return session.scalar(select(File).where(File.id == file_id))


def _download_inputs(claim: Claim, workdir: Path) -> RunInputs:
    store = get_store()
    local = {}
    for name, ref in claim.inputs.items():
        path = workdir / f"{hashlib.sha1(name.encode()).hexdigest()[:12]}{ref['suffix']}"
        store.get_file(ref["key"], path)
        local[name] = path
    spec = claim.spec
    resume_from = None
    if claim.checkpoint_key:
        resume_from = workdir / "resume.pt"
        store.get_file(claim.checkpoint_key, resume_from)

    def data_source(ref):
        return None if ref is None else (ref if ref.startswith("builtin:") else str(local[ref]))

    teachers = [TeacherInput(architecture=t["architecture"], weights_path=local[f"teacher{i}"],
                             sha256=claim.inputs[f"teacher{i}"]["sha256"], weight=t.get("weight", 1.0))
                for i, t in enumerate(spec["teachers"])]  # fmt: skip
    return RunInputs(
        job_id=claim.job_id, spec=spec, teachers=teachers, train_data=data_source(spec["train_file"]),
        validation_data=data_source(spec.get("validation_file")), output_dir=workdir / "out",
        device="cuda" if torch.cuda.is_available() else "cpu", resume_from=resume_from,
        cache_dir=get_settings().data_dir / "cache",
    )  # fmt: skip


def _publish_artifacts(claim: Claim, result) -> bool:
    """Upload under an attempt-specific prefix, then record them and finish in one fenced transaction."""
    store = get_store()
    prefix = f"jobs/{claim.job_id}/attempt-{claim.attempt}"
    rows = []
    for name, path in sorted(result.artifacts.items()):
        key = f"{prefix}/{name}"
        _retrying(lambda k=key, p=path: store.put_file(k, p), what=f"upload of {name}")
        content_type = CONTENT_TYPES.get(Path(name).suffix) or mimetypes.guess_type(name)[0] or \
            "application/octet-stream"  # fmt: skip
        rows.append(Artifact(job_id=claim.job_id, name=name, bytes=path.stat().st_size, sha256=_sha256(path),
                             content_type=content_type, storage_key=key))  # fmt: skip

    def finish() -> bool:
        with session_scope() as session:
            if not repo.finish_job(session, job_id=claim.job_id, attempt=claim.attempt, status="succeeded",
                                   summary=json_safe(result.summary), progress=_final_progress(claim)):  # fmt: skip
                return False
            repo.add_artifacts(session, artifacts=rows)
            repo.add_event(session, job_id=claim.job_id, message="Job succeeded.",
                           data={"artifacts": [r.name for r in rows]})  # fmt: skip
            delivery[:] = [record_job_finished(session, job_id=claim.job_id)]
            return True

    delivery: list[str | None] = []
    won = _retrying(finish, what="finish")
    announce(delivery)
    if not won:
        store.delete_prefix(prefix + "/")  # the slash: on S3, attempt-1 must not match attempt-12
        return False
    # Earlier attempts may have uploaded (part of) a set and died before their fenced finish; they can never
    # finish now, so their uploads are garbage. So is every checkpoint. Best effort: the database is the truth.
    stale = [f"jobs/{claim.job_id}/attempt-{n}/" for n in range(1, claim.attempt)]
    for old in [*stale, f"jobs/{claim.job_id}/checkpoints/"]:
        try:
            store.delete_prefix(old)
        except Exception:
            log.warning("could not delete %s", old, exc_info=True)
    return True


def _final_progress(claim: Claim) -> dict:
    epochs = claim.spec["hyperparameters"]["epochs"]
    return {"epoch": epochs, "epochs": epochs, "fraction": 1.0, "phase": "done"}


def _finish(claim: Claim, status: str, *, message: str, level: str = "info", error: dict | None = None,
            summary: dict | None = None) -> None:  # fmt: skip
    def write():
        with session_scope() as session:
            if repo.finish_job(session, job_id=claim.job_id, attempt=claim.attempt, status=status, error=error,
                               summary=summary):  # fmt: skip
                repo.add_event(session, job_id=claim.job_id, level=level, message=message, data=error or {})
                delivery[:] = [record_job_finished(session, job_id=claim.job_id)]

    delivery: list[str | None] = []
    _retrying(write, what=f"finish as {status}")
    announce(delivery)


def _hand_back(claim: Claim) -> bool:
    """Warm shutdown: give the job back now (not when the lease lapses) and re-publish it, so the next worker
    resumes from the last checkpoint. The attempt is not charged against max_attempts. False when the job is
    not this attempt's to give back (lost, or a cancel arrived meanwhile)."""

    def release() -> bool:
        with session_scope() as session:
            if not repo.release_job(session, job_id=claim.job_id, attempt=claim.attempt):
                return False
            repo.add_event(session, job_id=claim.job_id,
                           message=f"Attempt {claim.attempt} handed back: its worker is shutting down; the next "
                                   "worker resumes from the last checkpoint.",
                           data={"attempt": claim.attempt, "worker": WORKER_ID})  # fmt: skip
            return True

    if not _retrying(release, what="hand-back"):
        return False
    try:
        publish_job(claim.job_id)
    except Exception:
        log.warning("could not re-publish %s after the hand-back; the reconciler will", claim.job_id, exc_info=True)
    return True


def _requeue(claim: Claim, reason: str) -> None:
    """Hand an attempt that hit an unexpected error back to the queue (the claim's attempt count still rises)."""
    from sqlalchemy import update

    from app.models import Job

    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id == claim.job_id, Job.attempts == claim.attempt, Job.status == "running")
            .values(status="queued", lease_until=None, worker_id=None)
        )
        repo.add_event(session, job_id=claim.job_id, level="warning",
                       message=f"Attempt {claim.attempt} hit an unexpected error and was re-queued: {reason}")  # fmt: skip
    publish_job(claim.job_id)


def run_job(job_id: str) -> str:
    """Run one delivery of a job; returns what happened (for logs and tests)."""
    claim = _claim(job_id)
    if claim is None:
        log.info("job %s is not claimable (finished, cancelled, or owned by another worker); skipping", job_id)
        return "skipped"
    workdir = get_settings().data_dir / "work" / f"{job_id}-a{claim.attempt}"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with Ownership(job_id, claim.attempt) as ownership:
            inputs = _download_inputs(claim, workdir)
            callbacks = [
                ProgressCallback(report=lambda p: ownership.renew(progress=json_safe(p))),
                CancelCallback(is_cancelled=ownership.should_stop),
                CheckpointCallback(every_epochs=1),
                ServiceCallback(claim, ownership),
            ]
            result = run_distillation(inputs, callbacks)
            if ownership.lost:
                log.warning("job %s attempt %d lost its lease; discarding its result", job_id, claim.attempt)
                return "lost"
        if result.status == "cancelled" and ownership.timed_out and not ownership.cancel_requested:
            message = (f"The attempt ran longer than the {ownership.timeout_s:g}-second limit per job "
                       "(job_timeout_s) and was stopped.")  # fmt: skip
            _finish(claim, "failed", level="error", message=f"Job failed: {message}",
                    error={"code": "timeout", "message": message, "param": None})  # fmt: skip
            return "failed"
        if result.status == "cancelled":
            if SHUTTING_DOWN.is_set() and _hand_back(claim):
                return "handed back"
            _finish(claim, "cancelled", message="Job cancelled.")
            return "cancelled"
        return "succeeded" if _publish_artifacts(claim, result) else "lost"
    except EngineError as e:
        _finish(claim, "failed", level="error", message=f"Job failed: {e.message}",
                error={"code": e.code, "message": e.message, "param": e.param})  # fmt: skip
        return "failed"
    except Exception as e:
        log.exception("job %s attempt %d crashed", job_id, claim.attempt)
        reason = f"{type(e).__name__}: {e}"[:500]
        if claim.attempt >= claim_max_attempts(job_id):
            _finish(claim, "failed", level="error", message=f"Job failed: {reason}",
                    error={"code": "internal_error", "message": reason, "param": None})  # fmt: skip
            return "failed"
        _requeue(claim, reason)
        return "requeued"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def claim_max_attempts(job_id: str) -> int:
    with session_scope() as session:
        job = repo.get_job(session, job_id=job_id)
        return job.max_attempts if job else 1


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    return run_job(job_id)
