"""The store contract on both backends: a local folder and a real S3-protocol server (moto, on loopback)."""

import os
import subprocess
import sys

import pytest

from app.storage import LocalStore, S3Store
from tests.conftest import free_port, wait_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint, timeout=30, proc=proc)
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3 = S3Store("distill-test", "prefix", endpoint_url=endpoint)
    try:
        s3.client.create_bucket(Bucket="distill-test")
    except s3.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return s3


def test_put_get_range_delete(store, tmp_path):
    src = tmp_path / "blob.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)
    store.put_file("jobs/job_1/a/model.onnx", src)
    assert store.exists("jobs/job_1/a/model.onnx")
    out = tmp_path / "out.bin"
    store.get_file("jobs/job_1/a/model.onnx", out)
    assert out.read_bytes() == payload
    assert b"".join(store.iter_range("jobs/job_1/a/model.onnx", 10, 19)) == payload[10:20]
    assert b"".join(store.iter_range("jobs/job_1/a/model.onnx", len(payload) - 5)) == payload[-5:]
    store.put_file("jobs/job_1/a/other", src)
    store.delete("jobs/job_1/a/other")
    assert not store.exists("jobs/job_1/a/other")
    store.delete_prefix("jobs/job_1")
    assert not store.exists("jobs/job_1/a/model.onnx")
    with pytest.raises(FileNotFoundError):
        store.get_file("jobs/job_1/a/model.onnx", out)
    store.ping()


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "nul\x00byte", "x" * 400])
def test_keys_that_could_escape_are_refused(store, tmp_path, key):
    src = tmp_path / "f"
    src.write_bytes(b"1")
    with pytest.raises(ValueError):
        store.put_file(key, src)


def test_overwrite_is_atomic_for_readers(tmp_path):
    store = LocalStore(tmp_path / "store")
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A" * 1000)
    b.write_bytes(b"B" * 2000)
    store.put_file("ckpt", a)
    store.put_file("ckpt", b)
    assert (tmp_path / "store" / "ckpt").read_bytes() == b"B" * 2000
    assert not list((tmp_path / "store").glob(".tmp-*"))
