"""Upload checks of image-folder zips (central directory only) for the bounds too costly to provoke over HTTP."""

import io
import zipfile

import pytest
from PIL import Image

from app import file_checks
from app.file_checks import InvalidFile, validate_upload


def image_zip(path, count=6):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="PNG")
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(count):
            zf.writestr(f"{'ab'[i % 2]}/{i}.png", buf.getvalue())
    return path


def test_a_good_zip_is_described_by_its_folders(tmp_path):
    fmt, details = validate_upload(image_zip(tmp_path / "ok.zip"), "dataset")
    assert fmt == "images" and details["classes"] == ["a", "b"] and details["images"] == {"all": 6}
    assert details["layout"] == "class_folders" and details["has_labels"]


def test_entry_count_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(file_checks, "ZIP_MAX_ENTRIES", 5)
    with pytest.raises(InvalidFile, match="6 entries; at most 5"):
        validate_upload(image_zip(tmp_path / "many.zip"), "dataset")


def test_declared_total_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(file_checks, "ZIP_MAX_BYTES", 100)
    with pytest.raises(InvalidFile, match="would unpack to .* at most 100"):
        validate_upload(image_zip(tmp_path / "big.zip"), "dataset")


def test_a_zip_is_never_a_teacher(tmp_path):
    with pytest.raises(InvalidFile, match="safetensors"):
        validate_upload(image_zip(tmp_path / "t.zip"), "teacher")


def test_only_a_train_folder_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (2, 2)).save(buf, format="PNG")
    with zipfile.ZipFile(tmp_path / "t.zip", "w") as zf:
        zf.writestr("train/a/1.png", buf.getvalue())
    with pytest.raises(InvalidFile, match="train/ folder but not the other"):
        validate_upload(tmp_path / "t.zip", "dataset")
