"""Image-folder zips, CSV and Parquet tables, and the data report, at the engine level (worker/engine/formats.py).

Every file is written here: small images with Pillow, tables from numpy. Each unsafe archive is crafted in the
test that provokes its error.
"""

import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from worker.engine import Callback, EngineError, formats, load_dataset, run_distillation
from worker.engine.formats import DataOptions, count_duplicates, detect_format
from worker.engine.run import RunInputs

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def png_bytes(colour, size=(10, 12), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def image_zip(path: Path, per_class=4, split=False, extra: dict | None = None) -> Path:
    """class_name/*.png (or train|val/class_name/*.png): one solid colour per class, brightness varied per image."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, colour in COLOURS.items():
            for i in range(per_class):
                shade = tuple(max(0, c - 9 * i) for c in colour)
                folder = ("val/" if i == 0 else "train/") if split else ""
                ext = "jpg" if i == 1 else "png"
                zf.writestr(f"{folder}{name}/{i}.{ext}", png_bytes(shade, fmt="JPEG" if ext == "jpg" else "PNG"))
        for member, data in (extra or {}).items():
            zf.writestr(member, data)
    return path


def test_image_folder_zip_loads_resized_with_sorted_class_ids(tmp_path):
    path = image_zip(tmp_path / "pets.zip")
    assert detect_format(path) == "images"
    x, y, extras = load_dataset(str(path), None, options=DataOptions(image_size=[8, 6]))
    assert x.shape == (12, 3, 8, 6) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert extras["class_names"] == ["cat", "dog", "emu"] and extras["format"] == "images"
    assert np.bincount(y).tolist() == [4, 4, 4]
    # Class 0 is red, 2 is blue (sorted folder names), decoded channel first.
    assert x[y == 0][:, 0].mean() > 0.6 and x[y == 2][:, 2].mean() > 0.6
    grey, _, _ = load_dataset(str(path), None, options=DataOptions(image_size=[5, 5], image_mode="L"))
    assert grey.shape == (12, 1, 5, 5)


def test_train_and_val_folders_give_the_validation_split(tmp_path):
    path = image_zip(tmp_path / "split.zip", split=True)
    x, _, extras = load_dataset(str(path), None, options=DataOptions(image_size=[4, 4]))
    xv, yv = extras["validation"]
    assert len(x) == 9 and len(xv) == 3 and sorted(yv.tolist()) == [0, 1, 2]


def test_image_folders_need_image_size(tmp_path):
    with pytest.raises(EngineError) as err:
        load_dataset(str(image_zip(tmp_path / "a.zip")), None)
    assert err.value.code == "invalid_spec" and err.value.param == "data.image_size"


def test_macos_metadata_is_skipped_and_other_files_refused(tmp_path):
    ok = image_zip(tmp_path / "ok.zip", extra={"__MACOSX/cat/._0.png": b"junk", "cat/.DS_Store": b"junk"})
    x, _, _ = load_dataset(str(ok), None, options=DataOptions(image_size=[4, 4]))
    assert len(x) == 12
    bad = image_zip(tmp_path / "bad.zip", extra={"cat/notes.txt": b"hello"})
    with pytest.raises(EngineError, match="notes.txt.*is not a .png"):
        load_dataset(str(bad), None, options=DataOptions(image_size=[4, 4]))


def _zip_with(tmp_path, name, member: zipfile.ZipInfo | str, data: bytes, compress=zipfile.ZIP_STORED) -> Path:
    path = image_zip(tmp_path / name)
    with zipfile.ZipFile(path, "a", compression=compress) as zf:
        zf.writestr(member, data)
    return path


def symlink_member() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("cat/link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("member", "data", "compress", "message"),
    [
        ("../evil/x.png", png_bytes((1, 2, 3)), zipfile.ZIP_STORED, r"leaves the archive"),
        ("/etc/cat/x.png", png_bytes((1, 2, 3)), zipfile.ZIP_STORED, r"absolute path"),
        (None, b"/etc/passwd", zipfile.ZIP_STORED, r"symbolic link"),
        ("cat/zeros.png", bytes(2_000_000), zipfile.ZIP_DEFLATED, r"compressed more than 200:1"),
        ("a/b/c/d.png", png_bytes((1, 2, 3)), zipfile.ZIP_STORED, r"is not at class_name/image"),
        ("train/cat/x.png", png_bytes((1, 2, 3)), zipfile.ZIP_STORED, r"mixes class folders"),
    ],
    ids=["dotdot", "absolute", "symlink", "ratio", "too-deep", "mixed-layout"],
)
def test_unsafe_or_malformed_archives_fail_before_decoding(tmp_path, member, data, compress, message):
    path = _zip_with(tmp_path, "bad.zip", member or symlink_member(), data, compress)
    with pytest.raises(EngineError, match=message) as err:
        load_dataset(str(path), None, options=DataOptions(image_size=[4, 4]))
    assert err.value.code == "invalid_data"


def test_entry_count_and_total_size_are_bounded(tmp_path, monkeypatch):
    path = image_zip(tmp_path / "many.zip")
    monkeypatch.setattr(formats, "ZIP_MAX_ENTRIES", 5)
    with pytest.raises(EngineError, match="has 12 entries; at most 5"):
        load_dataset(str(path), None, options=DataOptions(image_size=[4, 4]))
    monkeypatch.setattr(formats, "ZIP_MAX_ENTRIES", 100)
    monkeypatch.setattr(formats, "ZIP_MAX_BYTES", 1000)
    with pytest.raises(EngineError, match="would unpack to .* at most 1000"):
        load_dataset(str(path), None, options=DataOptions(image_size=[4, 4]))


def test_pixel_bomb_and_corrupt_images_are_refused(tmp_path, monkeypatch):
    big = _zip_with(tmp_path, "big.zip", "cat/big.png", png_bytes(0, size=(3000, 3000), mode="L"))
    monkeypatch.setattr(formats, "IMAGE_MAX_PIXELS", 1_000_000)
    with pytest.raises(EngineError, match=r"big.png.*3000x3000 pixels"):
        load_dataset(str(big), None, options=DataOptions(image_size=[4, 4]))
    # Pillow's own guard, raised to an error: a header claiming more than twice its limit.
    monkeypatch.setattr(formats, "IMAGE_MAX_PIXELS", 10**12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(EngineError, match="decompression bomb"):
        load_dataset(str(big), None, options=DataOptions(image_size=[4, 4]))
    broken = _zip_with(tmp_path, "broken.zip", "cat/broken.png", png_bytes((1, 2, 3))[:40])
    with pytest.raises(EngineError, match="cannot decode image 'cat/broken.png'"):
        load_dataset(str(broken), None, options=DataOptions(image_size=[4, 4]))


def table_arrays(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 4)).astype(np.float32) + y[:, None] * 2.0
    return x, y


def write_csv(path: Path, x, y, labels=("ant", "bee", "cow"), blank=None) -> Path:
    lines = ["f0,f1,f2,f3,species,note"]
    for i, (row, label) in enumerate(zip(x, y)):
        cells = [f"{v:.6f}" for v in row]
        if blank is not None and i in blank:
            cells[1] = ""
        lines.append(",".join(cells) + f",{labels[label]},row{i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_named_label_column_and_feature_list(tmp_path):
    x, y = table_arrays()
    path = write_csv(tmp_path / "t.csv", x, y, blank={3, 7})
    assert detect_format(path) == "csv"
    opts = DataOptions(label_column="species", feature_columns=["f0", "f1", "f2", "f3"])
    got, labels, extras = load_dataset(str(path), None, options=opts)
    assert got.shape == (90, 4) and got.dtype == np.float32 and not np.isnan(got).any()
    assert extras["class_names"] == ["ant", "bee", "cow"] and (labels == y).all()
    assert extras["missing"] == {"f1": 2}
    # The filled values are the column's mean over the rows that have one.
    assert got[3, 1] == pytest.approx(np.delete(x[:, 1], [3, 7]).mean(), abs=1e-4)
    np.testing.assert_allclose(got[:, 0], x[:, 0], atol=1e-5)


@pytest.mark.parametrize(
    ("options", "code", "param", "message"),
    [
        (DataOptions(), "invalid_spec", "data.label_column", "need data.label_column"),
        (DataOptions(label_column="kind"), "invalid_spec", "data.label_column", "'kind' is not in"),
        (DataOptions(label_column="species", feature_columns=["f0", "zz"]), "invalid_spec",
         "data.feature_columns", r"\['zz'\] are not in"),
        (DataOptions(label_column="species"), "invalid_data", "data.feature_columns",
         "feature column 'note' .* not numeric"),
    ],
    ids=["no-label-column", "label-absent", "feature-absent", "non-numeric"],
)
def test_table_errors_name_the_column(tmp_path, options, code, param, message):
    x, y = table_arrays(n=10)
    path = write_csv(tmp_path / "t.csv", x, y)
    with pytest.raises(EngineError, match=message) as err:
        load_dataset(str(path), None, options=options)
    assert (err.value.code, err.value.param) == (code, param)


def test_parquet_with_integer_labels(tmp_path):
    x, y = table_arrays()
    x[5, 2] = np.nan
    table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "d": x[:, 3], "target": y.astype(np.int32)})
    pq.write_table(table, tmp_path / "t.parquet")
    assert detect_format(tmp_path / "t.parquet") == "parquet"
    got, labels, extras = load_dataset(str(tmp_path / "t.parquet"), None, options=DataOptions(label_column="target"))
    assert got.shape == (90, 4) and (labels == y).all() and labels.dtype == np.int64
    assert extras["class_names"] is None and extras["missing"] == {"c": 1}
    pq.write_table(pa.table({"a": x[:, 0], "target": pa.array([None] + y[1:].tolist())}), tmp_path / "n.parquet")
    with pytest.raises(EngineError, match="1 empty values") as err:
        load_dataset(str(tmp_path / "n.parquet"), None, options=DataOptions(label_column="target"))
    assert err.value.param == "data.label_column"


def test_duplicates_are_counted_by_exact_row_bytes():
    train = np.arange(20, dtype=np.float32).reshape(10, 2)
    val = np.concatenate([train[[2, 5]], np.full((3, 2), -1, np.float32)])
    assert count_duplicates(train, val) == 2


def test_validation_labels_follow_the_training_class_names():
    yv = np.array([0, 1, 1])  # val file named ["bee", "cow"]; train named ["ant", "bee", "cow"]
    assert formats.align_labels(yv, ["bee", "cow"], ["ant", "bee", "cow"]).tolist() == [1, 2, 2]
    with pytest.raises(EngineError, match="lacks: \\['yak'\\]"):
        formats.align_labels(yv, ["bee", "yak"], ["ant", "bee", "cow"])


def test_a_job_on_image_folders_writes_the_data_report_everywhere(tmp_path):
    path = image_zip(tmp_path / "split.zip", per_class=5, split=True)
    spec = {
        "student": {"architecture": {"name": "cnn2d", "config": {"channels": [4]}}},
        "method": {"type": "supervised"},
        "data": {"image_size": [8, 8]},
        "hyperparameters": {"epochs": 2, "batch_size": 8},
    }
    events = []

    class Events(Callback):
        def on_log(self, state, level, message, data):
            events.append((message, data))

    torch.manual_seed(0)
    result = run_distillation(
        RunInputs(job_id="job_test", spec=spec, teachers=[], train_data=str(path), validation_data=None,
                  output_dir=tmp_path / "out"), [Events()],
    )  # fmt: skip
    assert result.status == "succeeded"
    report = json.loads(result.artifacts["metrics.json"].read_text())["data_report"]
    assert report["class_names"] == ["cat", "dog", "emu"] and report["format"] == "images"
    assert [(c["name"], c["train"], c["validation"]) for c in report["class_balance"]] == [
        ("cat", 4, 1), ("dog", 4, 1), ("emu", 4, 1)]  # fmt: skip
    assert report["features"]["x"] == {"shape": [3, 8, 8], "dtype": "uint8", "model_dtype": "float32"}
    assert report["duplicates_train_validation"] == 0 and report["missing_values"] is None
    assert [d for m, d in events if m == "data report"] == [report]
    card = result.artifacts["model_card.md"].read_text()
    assert "## Data report" in card and "| 2 | emu | 4 | 1 |" in card
    assert result.summary["class_names"] == ["cat", "dog", "emu"]
