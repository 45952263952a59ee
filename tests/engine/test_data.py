"""Data files are read without unpickling; bad files fail with invalid_data."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from worker.engine import EngineError, load_dataset, validate_data_file
from worker.engine.data import split_validation


class PickleBomb:
    """Unpickling this object creates ``marker``: proof that something unpickled user bytes."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_npz_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float64)
    y = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    got_x, got_y, extras = load_dataset(str(tmp_path / "d.npz"), None)
    assert got_x.dtype == np.float32 and got_y.dtype == np.int64
    np.testing.assert_allclose(got_x, x.astype(np.float32))
    assert extras["format"] == "npz" and len(extras["identity"]) == 64


def test_safetensors_and_uint8_images(tmp_path):
    x = np.full((4, 1, 3, 3), 255, dtype=np.uint8)
    y = np.array([0, 1, 0, 1], dtype=np.int64)
    save_file({"x": x, "y": y, "x_teacher": np.zeros((4, 5), np.float32)}, str(tmp_path / "d.safetensors"))
    got_x, _, extras = load_dataset(str(tmp_path / "d.safetensors"), None)
    assert got_x.dtype == np.float32 and got_x.max() == 1.0
    assert extras["x_teacher"].shape == (4, 5)
    info = validate_data_file(tmp_path / "d.safetensors")
    assert info == {
        "format": "safetensors",
        "n": 4,
        "x_shape": [1, 3, 3],
        "x_dtype": "uint8",
        "classes": 2,
        "has_x_teacher": True,
    }


def test_integer_x_is_kept_as_token_ids(tmp_path):
    np.savez(tmp_path / "t.npz", x=np.arange(30, dtype=np.int32).reshape(5, 6), y=np.zeros(5, np.int64))
    x, _, _ = load_dataset(str(tmp_path / "t.npz"), None)
    assert x.dtype == np.int64


def test_object_array_is_rejected_without_unpickling(tmp_path):
    marker = tmp_path / "UNPICKLED"
    bomb = np.empty(2, dtype=object)
    bomb[0] = PickleBomb(marker)
    bomb[1] = PickleBomb(marker)
    np.savez(tmp_path / "bomb.npz", x=bomb, y=np.array([0, 1]))
    assert b"touch" in (tmp_path / "bomb.npz").read_bytes()  # the payload really is in the file
    for load in (
        lambda: load_dataset(str(tmp_path / "bomb.npz"), None),
        lambda: validate_data_file(tmp_path / "bomb.npz"),
    ):
        with pytest.raises(EngineError) as err:
            load()
        assert err.value.code == "invalid_data"
        assert "object" in str(err.value)
    assert not marker.exists()


def test_length_mismatch_is_rejected(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3), np.float32), y=np.zeros(9, np.int64))
    with pytest.raises(EngineError) as err:
        validate_data_file(tmp_path / "d.npz")
    assert err.value.code == "invalid_data" and "10" in str(err.value) and "9" in str(err.value)


@pytest.mark.parametrize(
    "arrays,needle",
    [
        ({"features": np.zeros((3, 2))}, "no array named 'x'"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, 1.5, 1.0])}, "integer class ids"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, ">= 0"),
        ({"x": np.zeros(3), "y": np.array([0, 1, 1])}, "must be [N, F]"),
        ({"x": np.array([True, False]).reshape(2, 1)}, "numeric"),
        ({"x": np.zeros((3, 2)), "x_teacher": np.zeros((2, 2))}, "'x_teacher' has 2"),
    ],
)
def test_malformed_files_are_rejected(tmp_path, arrays, needle):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(EngineError) as err:
        validate_data_file(tmp_path / "d.npz")
    assert err.value.code == "invalid_data"
    assert needle in str(err.value)


def test_non_data_bytes_are_rejected(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"\x80\x04not a zip or safetensors")
    with pytest.raises(EngineError) as err:
        load_dataset(str(tmp_path / "d.npz"), None)
    assert err.value.code == "invalid_data"
    np.save(tmp_path / "plain.npy", np.zeros((3, 2)))
    with pytest.raises(EngineError):
        load_dataset(str(tmp_path / "plain.npy"), None)


def test_validation_split_is_deterministic_and_disjoint():
    a_train, a_val = split_validation(100, 0.2, seed=3)
    _, b_val = split_validation(100, 0.2, seed=3)
    _, c_val = split_validation(100, 0.2, seed=4)
    assert np.array_equal(a_val, b_val) and not np.array_equal(a_val, c_val)
    assert len(a_val) == 20 and len(np.intersect1d(a_train, a_val)) == 0 and len(a_train) + len(a_val) == 100
    with pytest.raises(EngineError) as err:
        split_validation(100, 0.0, seed=0)
    assert err.value.param == "hyperparameters.validation_fraction"


def test_builtin_digits():
    x, y, _ = load_dataset("builtin:digits", None)
    assert x.shape == (1797, 64) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


def test_builtin_mnist1d_generates_locally_and_caches(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the engine must never touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    np_state, py_state = np.random.get_state(), random.getstate()
    x, y, _ = load_dataset("builtin:mnist1d", tmp_path)
    assert x.shape == (20000, 40) and x.dtype == np.float32 and y.shape == (20000,)
    assert set(np.unique(y)) == set(range(10))
    # The generator reseeds the global RNGs; the engine must hand them back untouched.
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    assert (tmp_path / "builtin" / "mnist1d-v2-25k.npz").is_file()

    import mnist1d.data

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_network)  # the second load must come from the cache
    x2, y2, _ = load_dataset("builtin:mnist1d", tmp_path)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    xt, _, _ = load_dataset("builtin:mnist1d:test", tmp_path)
    assert xt.shape == (5000, 40)


def test_unknown_builtin_lists_valid_ones():
    with pytest.raises(EngineError) as err:
        load_dataset("builtin:cifar10", None)
    assert err.value.code == "invalid_data" and "builtin:digits" in str(err.value)
