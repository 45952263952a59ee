"""Small data and model factories for the tests: everything is made locally, nothing downloaded."""

import time
from pathlib import Path

import httpx
import numpy as np

TERMINAL = {"succeeded", "failed", "cancelled"}


def digits_arrays(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order]


def digits_files(folder: Path) -> tuple[Path, Path]:
    """Train/validation npz files from scikit-learn's bundled digits (1797 rows, 64 features, 10 classes)."""
    x, y = digits_arrays()
    train, val = folder / "digits_train.npz", folder / "digits_val.npz"
    np.savez(train, x=x[:1400], y=y[:1400])
    np.savez(val, x=x[1400:], y=y[1400:])
    return train, val


def train_teacher(path: Path, architecture: dict, x: np.ndarray, y: np.ndarray, epochs: int = 30) -> Path:
    """Train a small teacher in the test itself and save it as safetensors."""
    import torch
    from safetensors.torch import save_file

    from worker.engine import build_model

    torch.manual_seed(0)
    model = build_model(architecture, tuple(x.shape[1:]), int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def upload(client: httpx.Client, path: Path, purpose: str, filename: str | None = None) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post("/v1/files", files={"file": (filename or path.name, f)}, data={"purpose": purpose})


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300, until=TERMINAL) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s: {job}")


def kd_spec(train: str, teacher: dict, *, validation: str | None = None, epochs: int = 5, **method) -> dict:
    return {
        "name": "test-kd",
        "teachers": [teacher],
        "student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [32]}}},
        "train_file": train,
        "validation_file": validation,
        "method": {"type": "kd", "temperature": 4.0, "alpha": 0.7, **method},
        "hyperparameters": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.003, "seed": 0},
    }
