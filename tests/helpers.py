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


def token_arrays(n: int = 600, length: int = 16, vocab: int = 40, classes: int = 3, seed: int = 0) -> dict:
    """Synthetic token data whose label is a function of the tokens: exactly one of the marker tokens
    1..classes occurs in each row, at a random position, and its index is the class. Rows have random
    lengths, right-padded with id 0 (attention_mask 0)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    ids = rng.integers(classes + 1, vocab, size=(n, length))
    lengths = rng.integers(length // 2, length + 1, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids[np.arange(n), rng.integers(0, lengths)] = y + 1
    ids = np.where(mask == 1, ids, 0)
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask, "y": y.astype(np.int64)}


def tiny_hf_config(family: str, *, vocab: int = 40, classes: int = 3, layers: int = 2, positions: int = 32):
    """A tiny random transformers config of ``family`` (bert, distilbert, llama)."""
    import transformers

    common = {"vocab_size": vocab, "num_labels": classes, "max_position_embeddings": positions, "pad_token_id": 0}
    if family == "bert":
        return transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                       intermediate_size=64, **common)  # fmt: skip
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=layers, n_heads=2, hidden_dim=64, **common)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, **common)  # fmt: skip
    raise ValueError(family)


def hf_teacher_zip(folder: Path, family: str, data: dict, *, steps: int = 150, layers: int = 2) -> Path:
    """Train a tiny transformers classifier on ``data`` in the test, ``save_pretrained`` it, and zip
    the folder's two files at the zip's root (what a user uploads)."""
    import zipfile

    import torch
    import transformers

    torch.manual_seed(0)
    config = tiny_hf_config(family, classes=int(data["y"].max()) + 1, layers=layers)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, mask, y = (torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask", "y"))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    saved = folder / f"{family}-teacher"
    model.save_pretrained(saved)
    path = folder / f"{family}-teacher.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("config.json", "model.safetensors"):
            zf.write(saved / name, arcname=name)
    return path


def hf_accuracy(model, data: dict) -> float:
    """Accuracy of a transformers classifier on token data (eval mode, no grad)."""
    import torch

    model.eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(data["input_ids"]),
                       attention_mask=torch.from_numpy(data["attention_mask"])).logits  # fmt: skip
    return float((logits.argmax(-1).numpy() == data["y"]).mean())
