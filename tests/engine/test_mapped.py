"""Data larger than memory: safetensors read through a memory map, never loaded whole.

Mapping is forced here with a tiny memory budget; the results must equal the
in-memory path exactly, and the arrays the loop reads must be views of the map.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from worker.engine import build_model, load_dataset, teacher_cache, validate_data_file
from worker.engine import run as run_module
from worker.engine.data import array_identity, take_rows
from worker.engine.mapped import MappedRows, open_safetensors
from worker.engine.run import TeacherInput
from worker.engine.weights import save_model

from .conftest import make_spec, run, sha256


def _maps_file(a: MappedRows) -> bool:
    """True when ``a``'s stored array is a view of an mmap (no copy of the file's bytes)."""
    base = a.raw
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap) and not a.raw.flags.owndata


def test_mapped_reads_equal_in_memory_reads(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.integers(0, 256, size=(300, 2, 3, 3), dtype=np.uint8),  # images: float32 / 255
        "y": rng.integers(0, 5, size=300).astype(np.int32),  # labels: int64, in memory
        "x_teacher": rng.normal(size=(300, 7)),  # float64 → float32
    }
    save_file(arrays, str(tmp_path / "d.safetensors"))
    x, y, extras = load_dataset(str(tmp_path / "d.safetensors"), None)  # small: in memory
    mx, my, mextras = load_dataset(str(tmp_path / "d.safetensors"), None, memory_limit=0)
    assert not extras["mapped"] and mextras["mapped"]
    assert isinstance(mx, MappedRows) and isinstance(mextras["x_teacher"], MappedRows)
    assert _maps_file(mx) and _maps_file(mextras["x_teacher"])
    assert isinstance(my, np.ndarray) and my.dtype == np.int64 and np.array_equal(my, y)
    assert mx.shape == x.shape and mx.dtype == x.dtype == np.float32 and mx.nbytes == x.nbytes

    idx = torch.tensor([299, 3, 3, 150, 0, 42])  # unsorted, repeated: returned in the order asked
    assert torch.equal(mx[idx], torch.from_numpy(x[idx.numpy()]))
    assert torch.equal(mx[10:20], torch.from_numpy(x[10:20]))
    assert torch.equal(mextras["x_teacher"][idx], torch.from_numpy(extras["x_teacher"][idx.numpy()]))
    assert np.array_equal(np.concatenate(list(mx.chunks(chunk_bytes=1000))), x)

    # The validation split is a view by index; views of views compose; identity follows content.
    rows = np.array([5, 1, 250, 7])
    view = take_rows(mx, rows)
    assert isinstance(view, MappedRows) and view.raw is mx.raw and len(view) == 4
    assert torch.equal(view[1:3], torch.from_numpy(x[rows[1:3]]))
    assert torch.equal(view.subset([3, 0])[:], torch.from_numpy(x[rows[[3, 0]]]))
    assert array_identity(mx) == array_identity(load_dataset(str(tmp_path / "d.safetensors"), None, 0)[0])
    assert array_identity(view) != array_identity(mx) != array_identity(mx.astype(np.int64))
    assert mx.min() == x.min() and mx.max() == x.max()

    info = validate_data_file(tmp_path / "d.safetensors")
    assert validate_data_file(tmp_path / "d.safetensors", memory_limit=0) == info


def test_mapped_pages_are_released(tmp_path):
    save_file({"x": np.zeros((1000, 64), np.float32)}, str(tmp_path / "d.safetensors"))
    x = open_safetensors(tmp_path / "d.safetensors", release_bytes=8 * 1024**2)["x"]
    for i in range(0, 1000, 100):
        x[i : i + 100]  # contiguous reads go through the map ...
    assert x.file.releases > 0  # ... which drops its pages instead of growing the resident set
    before = x.file.releases
    for i in range(0, 1000, 100):
        x[torch.randperm(1000)[:100]]  # row gathers are positional reads: nothing mapped, nothing to drop
    assert x.file.releases == before


def test_damaged_mapped_file_is_invalid_data(tmp_path):
    from worker.engine import EngineError

    path = tmp_path / "d.safetensors"
    save_file({"x": np.zeros((100, 4), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-40])  # truncated: the offsets no longer fit the file
    with pytest.raises(EngineError) as err:
        load_dataset(str(path), None, memory_limit=0)
    assert err.value.code == "invalid_data" and "safetensors" in str(err.value)


def test_large_teacher_logits_stream_to_a_mapped_cache_entry(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = build_model({"name": "mlp", "config": {"hidden_sizes": [8]}}, (6,), 3).eval()
    x = torch.randn(2500, 6)
    want, hit = teacher_cache.teacher_logits(teacher, x, torch.device("cpu"), who="t", dtype=torch.float16)
    assert not hit and isinstance(want, torch.Tensor)
    monkeypatch.setattr(teacher_cache, "LOGITS_MEMORY_LIMIT", 0)
    args = {"who": "t", "dtype": torch.float16, "cache_dir": tmp_path, "key": "k" * 64, "spill_dir": tmp_path}
    got, hit = teacher_cache.teacher_logits(teacher, x, torch.device("cpu"), **args)
    assert not hit and isinstance(got, MappedRows) and _maps_file(got)
    assert torch.equal(got[:], want) and torch.equal(got[torch.tensor([7, 2])], want[[7, 2]])
    again, hit = teacher_cache.teacher_logits(teacher, x, torch.device("cpu"), **args)
    assert hit and isinstance(again, MappedRows) and torch.equal(again[:], want)
    assert not list((tmp_path / "teacher_logits").glob("*.tmp"))


def test_training_from_a_mapped_file_equals_in_memory(tmp_path, monkeypatch):
    """A 50 MB safetensors file trained mapped (data and teacher logits) and in memory: same run."""
    rng = np.random.default_rng(1)
    n, features, classes = 50_000, 250, 4
    centers = rng.normal(0, 1.0, size=(classes, features)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(0, 2.0, size=(n, features)).astype(np.float32)
    data = tmp_path / "big.safetensors"
    save_file({"x": x, "y": y.astype(np.int64)}, str(data))
    assert data.stat().st_size > 50 * 10**6
    del x

    arch = {"name": "mlp", "config": {"hidden_sizes": [16]}}
    torch.manual_seed(3)
    teacher_path = tmp_path / "teacher.safetensors"
    save_model(build_model(arch, (features,), classes), teacher_path, {"architecture": arch})
    teacher = TeacherInput(architecture=arch, weights_path=teacher_path, sha256=sha256(teacher_path))
    spec = make_spec(
        student={"name": "mlp", "config": {"hidden_sizes": [8]}},
        method={"type": "kd", "temperature": 4.0, "alpha": 0.5},
        epochs=1,
        batch_size=500,
        validation_fraction=0.1,
    )

    seen: list = []
    real_fit = run_module.fit

    def recording_fit(**kwargs):
        seen.append(kwargs["train"])
        seen.append(kwargs["val"])
        return real_fit(**kwargs)

    monkeypatch.setattr(run_module, "fit", recording_fit)
    memory = run(tmp_path, spec, data, teachers=[teacher], name="memory")
    monkeypatch.setattr(teacher_cache, "LOGITS_MEMORY_LIMIT", 0)  # teacher logits: streamed to a file, mapped
    mapped = run_module.run_distillation(
        run_module.RunInputs(
            job_id="job_test", spec=spec, teachers=[teacher], train_data=str(data), validation_data=None,
            output_dir=tmp_path / "mapped", data_memory_budget=1024**2,  # 1 MiB: the 50 MB file is mapped
        ),
        [],
    )  # fmt: skip

    # The in-memory run used tensors; the mapped one read views of the file's map (nothing copied).
    assert isinstance(seen[0].x, torch.Tensor) and isinstance(seen[0].teacher_logits[0], torch.Tensor)
    train, val = seen[2], seen[3]
    for rows in (train.x, val.x, train.teacher_x[0], val.teacher_x[0], train.teacher_logits[0]):
        assert isinstance(rows, MappedRows) and _maps_file(rows), rows
    assert train.x.raw is val.x.raw and train.x.rows is not None and val.x.rows is not None  # split by index
    assert len(train.x) + len(val.x) == n
    assert not list((tmp_path / "mapped").glob("*.tmp"))  # the spilled logits file was unlinked once mapped

    assert mapped.status == memory.status == "succeeded"
    for key in ("val_accuracy", "agreement", "teacher_accuracy", "n_train", "n_val", "input_dtype"):
        assert mapped.summary[key] == memory.summary[key], key
    from safetensors.torch import load_file

    a = load_file(str(memory.artifacts["model.safetensors"]))
    b = load_file(str(mapped.artifacts["model.safetensors"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_thread_count_and_autocast_inputs(tmp_path, blob_file):
    before = torch.get_num_threads()
    result = run_module.run_distillation(
        run_module.RunInputs(
            job_id="job_threads", spec=make_spec(epochs=1), teachers=[], train_data=str(blob_file),
            validation_data=None, output_dir=tmp_path / "threads", num_threads=2, autocast=False,
        ),
        [],
    )  # fmt: skip
    assert result.status == "succeeded" and torch.get_num_threads() == before
    assert Path(result.artifacts["model.safetensors"]).is_file()
