"""Shared helpers for the engine tests: small synthetic data, specs and trained teachers."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.engine import Callback, RunInputs, TeacherInput, run_distillation

DEFAULT_HP = {
    "epochs": 3,
    "batch_size": 64,
    "learning_rate": 0.01,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "momentum": 0.9,
    "scheduler": "cosine",
    "seed": 0,
    "validation_fraction": 0.2,
    "baseline": False,
    "max_grad_norm": None,
}


def make_spec(student=None, method=None, teachers=None, **hp) -> dict:
    return {
        "name": "test-job",
        "teachers": teachers or [],
        "student": {"architecture": student or {"name": "mlp", "config": {"hidden_sizes": [32]}}},
        "train_file": "file_train",
        "validation_file": None,
        "method": method or {"type": "supervised"},
        "hyperparameters": {**DEFAULT_HP, **hp},
        "metadata": {},
    }


def blobs(n: int = 400, features: int = 12, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class blobs: learnable in a couple of epochs, so runs stay sub-second."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3.0, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(0, 1.0, size=(n, features))
    return x.astype(np.float32), y.astype(np.int64)


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Recorder(Callback):
    """Records every event, for assertions."""

    def __init__(self):
        self.events: list[tuple] = []
        self.logs: list[tuple[str, str, dict]] = []
        self.epoch_rows: list[dict] = []
        self.checkpoints: list[Path] = []

    def on_train_begin(self, state):
        self.events.append(("train_begin", state.phase))

    def on_epoch_end(self, state):
        self.epoch_rows.append(dict(state.history[-1]))

    def on_checkpoint(self, state, path):
        self.checkpoints.append(path)

    def on_log(self, state, level, message, data):
        self.logs.append((level, message, data))

    def on_train_end(self, state):
        self.events.append(("train_end", state.phase))

    def messages(self) -> list[str]:
        return [m for _, m, _ in self.logs]


def run(
    tmp_path: Path,
    spec: dict,
    train: str,
    *,
    name: str = "out",
    teachers=(),
    callbacks=(),
    job_id="job_test",
    validation=None,
    resume_from=None,
    cache_dir=None,
):
    inputs = RunInputs(
        job_id=job_id,
        spec=copy.deepcopy(spec),
        teachers=list(teachers),
        train_data=str(train),
        validation_data=None if validation is None else str(validation),
        output_dir=tmp_path / name,
        resume_from=resume_from,
        cache_dir=cache_dir,
    )
    return run_distillation(inputs, list(callbacks))


@pytest.fixture
def blob_file(tmp_path) -> Path:
    x, y = blobs()
    return write_npz(tmp_path / "blobs.npz", x=x, y=y)


@pytest.fixture
def blob_teacher(tmp_path, blob_file) -> TeacherInput:
    """A teacher trained supervised on the blobs by the engine itself (its output is a valid teacher)."""
    arch = {"name": "mlp", "config": {"hidden_sizes": [64, 64]}}
    result = run(tmp_path, make_spec(student=arch, epochs=4), blob_file, name="teacher", job_id="job_teacher")
    path = result.artifacts["model.safetensors"]
    return TeacherInput(architecture=arch, weights_path=path, sha256=sha256(path))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare runs bit for bit; fixing the thread count keeps CPU reductions in one order.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
