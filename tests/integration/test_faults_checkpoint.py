"""SIGKILL during a checkpoint write: the previous checkpoint still loads and no partial file is ever read.

Both writers a checkpoint goes through are killed mid-write of a large object, in a real process: the engine's
`save_checkpoint` (the worker's local copy) and `LocalStore.put_file` (the durable copy the next attempt
downloads). Each writes a temporary name, fsyncs, then renames, so the name a reader opens is the old complete
object or the new complete one; the torn temporary file is left behind under a temporary name that no key the
service generates ever names.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MEGABYTES = 192  # large enough that a write takes a good fraction of a second here


def _writer(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.faults_support", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _kill_mid_write(proc: subprocess.Popen, folder: Path, pattern: str, full_size: int, at: float) -> int:
    """SIGKILL `proc` once its temporary file in `folder` holds more than `at` of `full_size` bytes, and before it
    is complete; returns the torn temporary file's size."""
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for tmp in folder.glob(pattern):
            try:
                size = tmp.stat().st_size
            except FileNotFoundError:
                continue
            if full_size * at < size < full_size:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return tmp.stat().st_size
        if proc.poll() is not None:
            break
        time.sleep(0.0005)
    proc.kill()
    pytest.fail(f"never caught the writer mid-write (exit {proc.poll()}): {proc.stdout.read()}")


@pytest.mark.parametrize("at", [0.05, 0.5, 0.9])
def test_sigkill_during_engine_checkpoint_write_keeps_the_previous_one(tmp_path, at):
    from worker.engine.trainer import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    first = _writer("write-checkpoint", str(path), "1", str(MEGABYTES))
    assert first.wait(120) == 0, first.stdout.read()
    full_size = path.stat().st_size
    assert full_size > MEGABYTES * 1024 * 1024

    torn = _kill_mid_write(
        _writer("write-checkpoint", str(path), "2", str(MEGABYTES)),
        tmp_path,
        "checkpoint.pt*.tmp",
        full_size,
        at,
    )
    assert 0 < torn < full_size
    leftovers = list(tmp_path.glob("checkpoint.pt*.tmp"))
    assert len(leftovers) == 1  # the torn temporary file, under its own name
    with pytest.raises(Exception):  # noqa: B017  (it really is partial: it does not load)
        load_checkpoint(leftovers[0])
    ckpt = load_checkpoint(path)  # the name itself still holds version 1, whole
    assert ckpt["epoch"] == 1 and path.stat().st_size == full_size
    weight = ckpt["student"]["weight"]
    assert weight.numel() == MEGABYTES * 1024 * 1024 // 4 and bool((weight == 1.0).all())

    # The next complete write replaces it.
    again = _writer("write-checkpoint", str(path), "3", str(MEGABYTES))
    assert again.wait(120) == 0
    assert load_checkpoint(path)["epoch"] == 3


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("at", [0.05, 0.5, 0.9])
def test_sigkill_during_store_upload_keeps_the_previous_object(tmp_path, at):
    from app.storage import LocalStore

    root, key = tmp_path / "store", "jobs/job_x/checkpoints/attempt-1-1.pt"
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(os.urandom(MEGABYTES * 1024 * 1024))
    new.write_bytes(os.urandom(MEGABYTES * 1024 * 1024))
    store = LocalStore(root)
    store.put_file(key, old)
    folder = root / "jobs" / "job_x" / "checkpoints"

    torn = _kill_mid_write(
        _writer("put-store", str(root), key, str(new)), folder, ".tmp-*", old.stat().st_size, at
    )
    assert 0 < torn < old.stat().st_size
    fetched = tmp_path / "fetched.bin"
    store.get_file(key, fetched)  # what the next attempt downloads
    assert _sha256(fetched) == _sha256(old)
    # The torn upload stays under a temporary dot-name, which no key the service generates ever names.
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".tmp-")] == ["attempt-1-1.pt"]
