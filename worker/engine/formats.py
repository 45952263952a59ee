"""Data files beyond arrays: image folders in a zip, CSV and Parquet tables, and the per-job data report.

``detect_format`` is the one place the engine tells file kinds apart, by content
(uploads are often renamed): ``npz`` (a zip of top-level ``.npy`` members),
``images`` (any other zip), ``safetensors``, ``parquet`` (``PAR1`` magic) and
``csv`` (UTF-8 text). ``read_images`` and ``read_table`` turn the last three into
the same ``{"x", "y"}`` arrays the rest of the engine reads, plus what the data
report needs (class names, missing values).

Image zips are untrusted archives: the central directory is checked before a
byte is inflated (entry count, declared total size, per-entry compression
ratio, no absolute paths, ``..`` or symlinks), each member is read with a cap
at its declared size, and each image's pixel count is checked from its header
before Pillow decodes it (with Pillow's own decompression-bomb guard raised to
an error). The API repeats the central-directory checks at upload time.
"""

from __future__ import annotations

import hashlib
import io
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .config import parse_config
from .errors import EngineError

_CODE = "invalid_data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_FOLDERS = ("train", "val")
# Bounds on an image zip (the API's upload check uses the same numbers: app/file_checks.py).
ZIP_MAX_ENTRIES = 100_000
ZIP_MAX_BYTES = 4 * 1024**3  # declared uncompressed total
ZIP_MAX_RATIO = 200  # uncompressed / compressed, per entry
IMAGE_MAX_PIXELS = 40_000_000  # per image, read from its header before decoding
DECODED_MAX_BYTES = 4 * 1024**3  # the decoded, resized uint8 tensor of all images
TABLE_MAX_CELLS = 500_000_000
IMAGE_MODES = {"L": 1, "RGB": 3}


@dataclass
class DataOptions:
    """``spec.data``: how image folders and tables become arrays (array files need none)."""

    image_size: list[int] | None = None  # [H, W] every image is resized to
    image_mode: str = "RGB"  # "L" (1 channel) or "RGB" (3)
    label_column: str | None = None  # tables: the column holding class labels
    feature_columns: list[str] | None = None  # tables: the inputs; None = every other column

    def __post_init__(self):
        if self.image_size is not None and (
            len(self.image_size) != 2 or not all(1 <= s <= 1024 for s in self.image_size)
        ):
            raise EngineError("invalid_spec", f"image_size must be [H, W] with sides in [1, 1024], got "
                                              f"{self.image_size}", param="image_size")  # fmt: skip
        if self.image_mode not in IMAGE_MODES:
            raise EngineError("invalid_spec", f"image_mode must be one of {sorted(IMAGE_MODES)}, got "
                                              f"{self.image_mode!r}", param="image_mode")  # fmt: skip


def parse_data_options(raw) -> DataOptions:
    return parse_config(DataOptions, raw, code="invalid_spec", prefix="data")


# --------------------------------------------------------------------------- detection


def detect_format(path: Path) -> str:
    """``npz``, ``images``, ``safetensors``, ``parquet`` or ``csv``, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as err:
            raise EngineError(_CODE, f"{path.name!r} is not a readable zip archive: {err}") from None
        if names and all(n.endswith(".npy") and "/" not in n for n in names):
            return "npz"
        return "images"
    if head[:4] == b"PAR1":
        return "parquet"
    if len(head) >= 8 and 0 < int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{":
        return "safetensors"
    if _looks_like_text(head):
        return "csv"
    raise EngineError(
        _CODE,
        f"data file {path.name!r} is not an .npz, safetensors, image-folder zip, Parquet or CSV file",
    )


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        # The read may have cut a multi-byte character at its end.
        return err.start >= len(head) - 3
    return True


# --------------------------------------------------------------------------- image folders


@dataclass
class ImageEntry:
    info: zipfile.ZipInfo
    split: str | None  # "train" / "val", or None without split folders
    label: str


def check_image_zip(zf: zipfile.ZipFile, name: str) -> list[ImageEntry]:
    """The archive's image members after the safety and layout checks; raises ``EngineError``."""
    infos = zf.infolist()
    if len(infos) > ZIP_MAX_ENTRIES:
        raise EngineError(_CODE, f"{name!r} has {len(infos)} entries; at most {ZIP_MAX_ENTRIES} are accepted")
    total = sum(i.file_size for i in infos)
    if total > ZIP_MAX_BYTES:
        raise EngineError(_CODE, f"{name!r} would unpack to {total} bytes; at most {ZIP_MAX_BYTES} are accepted")
    entries = []
    for info in infos:
        member = info.filename
        path = PurePosixPath(member.replace("\\", "/"))
        if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":"):
            raise EngineError(_CODE, f"{name!r}: member {member[:200]!r} has an absolute path")
        if ".." in path.parts:
            raise EngineError(_CODE, f"{name!r}: member {member[:200]!r} leaves the archive ('..')")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise EngineError(_CODE, f"{name!r}: member {member[:200]!r} is a symbolic link")
        if info.file_size > ZIP_MAX_RATIO * max(info.compress_size, 1):
            raise EngineError(_CODE, f"{name!r}: member {member[:200]!r} is compressed more than "
                                     f"{ZIP_MAX_RATIO}:1 ({info.file_size} bytes from {info.compress_size})")  # fmt: skip
        if info.is_dir() or _ignored(path):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise EngineError(_CODE, f"{name!r}: member {member[:200]!r} is not a .png, .jpg or .jpeg image")
        if len(path.parts) == 2:
            entries.append(ImageEntry(info, None, path.parts[0]))
        elif len(path.parts) == 3 and path.parts[0] in SPLIT_FOLDERS:
            entries.append(ImageEntry(info, path.parts[0], path.parts[1]))
        else:
            raise EngineError(_CODE, f"{name!r}: member {member[:200]!r} is not at class_name/image or "
                                     "train|val/class_name/image")  # fmt: skip
    if not entries:
        raise EngineError(_CODE, f"{name!r} holds no .png, .jpg or .jpeg images in class folders")
    splits = {e.split for e in entries}
    if None in splits and len(splits) > 1:
        raise EngineError(_CODE, f"{name!r} mixes class folders at the top with train/ and val/ folders")
    if splits == {"train"} or splits == {"val"}:
        raise EngineError(_CODE, f"{name!r} has a {splits.pop()}/ folder but not the other: give both "
                                 "train/ and val/, or put the class folders at the top")  # fmt: skip
    train_classes = {e.label for e in entries if e.split != "val"}
    unknown = sorted({e.label for e in entries if e.split == "val"} - train_classes)
    if unknown:
        raise EngineError(_CODE, f"{name!r}: val/ has classes that train/ lacks: {unknown[:10]}")
    return entries


def _ignored(path: PurePosixPath) -> bool:
    """Metadata archivers add (macOS resource forks, dot files): skipped, not images."""
    return any(p == "__MACOSX" or p.startswith(".") for p in path.parts)


def read_images(path: Path, options: DataOptions) -> dict:
    """An image-folder zip as ``{"x", "y", "class_names"}`` (+ ``"validation": {"x", "y"}`` with train/ val/)."""
    name = Path(path).name
    if options.image_size is None:
        raise EngineError("invalid_spec", "image folders need data.image_size [H, W] to resize to",
                          param="data.image_size")  # fmt: skip
    from PIL import Image

    height, width = options.image_size
    channels = IMAGE_MODES[options.image_mode]
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise EngineError(_CODE, f"{name!r} is not a readable zip archive: {err}") from None
    with zf:
        entries = check_image_zip(zf, name)
        need = len(entries) * channels * height * width
        if need > DECODED_MAX_BYTES:
            raise EngineError(_CODE, f"{len(entries)} images at {channels}x{height}x{width} need {need} bytes "
                                     f"decoded; at most {DECODED_MAX_BYTES}: lower data.image_size",
                              param="data.image_size")  # fmt: skip
        class_names = sorted({e.label for e in entries if e.split != "val"})
        ids = {c: i for i, c in enumerate(class_names)}
        entries.sort(key=lambda e: (e.split or "", e.label, e.info.filename))
        x = np.empty((len(entries), channels, height, width), dtype=np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            for row, entry in enumerate(entries):
                x[row] = _decode(zf, entry.info, name, Image, options.image_mode, (width, height))
    y = np.array([ids[e.label] for e in entries], dtype=np.int64)
    split = np.array([e.split == "val" for e in entries])
    out = {"x": x[~split], "y": y[~split], "class_names": class_names}
    if split.any():
        out["validation"] = {"x": x[split], "y": y[split]}
    return out


def _decode(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, Image, mode: str, size) -> np.ndarray:
    member = info.filename[:200]
    try:
        with zf.open(info) as f:
            raw = f.read(info.file_size + 1)
        if len(raw) > info.file_size:
            raise EngineError(_CODE, f"{name!r}: member {member!r} is larger than its declared size")
        with Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"]) as im:
            if im.width * im.height > IMAGE_MAX_PIXELS:
                raise EngineError(_CODE, f"{name!r}: image {member!r} is {im.width}x{im.height} pixels; at "
                                         f"most {IMAGE_MAX_PIXELS} pixels an image are decoded")  # fmt: skip
            pixels = np.asarray(im.convert(mode).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    except EngineError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise EngineError(_CODE, f"{name!r}: image {member!r} is a decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise EngineError(_CODE, f"{name!r}: cannot decode image {member!r}: {err}") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


# --------------------------------------------------------------------------- tables


def read_table(path: Path, kind: str, options: DataOptions) -> dict:
    """A CSV or Parquet file as ``{"x", "y", "class_names", "missing"}``: numeric features, labels by column."""
    import pyarrow as pa

    name = Path(path).name
    if options.label_column is None:
        raise EngineError("invalid_spec", f"{kind} tables need data.label_column, the column holding the labels",
                          param="data.label_column")  # fmt: skip
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            if meta.num_rows * meta.num_columns > TABLE_MAX_CELLS:
                raise EngineError(_CODE, f"{name!r} has {meta.num_rows} rows x {meta.num_columns} columns; at "
                                         f"most {TABLE_MAX_CELLS} cells are read")  # fmt: skip
            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
    except (pa.ArrowException, OSError) as err:
        raise EngineError(_CODE, f"cannot read {name!r} as {kind}: {err}") from None
    columns = table.column_names
    if options.label_column not in columns:
        raise EngineError("invalid_spec", f"label column {options.label_column!r} is not in {name!r}; its "
                                          f"columns: {columns[:50]}", param="data.label_column")  # fmt: skip
    features = options.feature_columns or [c for c in columns if c != options.label_column]
    absent = [c for c in features if c not in columns]
    if absent:
        raise EngineError("invalid_spec", f"feature columns {absent[:10]} are not in {name!r}; its columns: "
                                          f"{columns[:50]}", param="data.feature_columns")  # fmt: skip
    if options.label_column in features:
        raise EngineError("invalid_spec", f"the label column {options.label_column!r} is also a feature column",
                          param="data.feature_columns")  # fmt: skip
    if not features:
        raise EngineError(_CODE, f"{name!r} has no feature columns besides the label column",
                          param="data.feature_columns")  # fmt: skip
    x = np.empty((table.num_rows, len(features)), dtype=np.float32)
    missing = {}
    for j, col in enumerate(features):
        values = table.column(col)
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
                or pa.types.is_boolean(values.type) or pa.types.is_null(values.type)):  # fmt: skip
            raise EngineError(_CODE, f"feature column {col!r} of {name!r} is {values.type}, not numeric; "
                                     "convert it, or leave it out of data.feature_columns",
                              param="data.feature_columns")  # fmt: skip
        column = values.to_numpy(zero_copy_only=False).astype(np.float32)
        nan = np.isnan(column)
        if nan.any():
            missing[col] = int(nan.sum())
            # Filled with the column's mean in this file, so one gap does not cost the row.
            column[nan] = np.nanmean(column) if not nan.all() else 0.0
        x[:, j] = column
    y, class_names = _labels(table.column(options.label_column), options.label_column, name, pa)
    return {"x": x, "y": y, "class_names": class_names, "missing": missing}


def _labels(column, label: str, name: str, pa) -> tuple[np.ndarray, list[str] | None]:
    if column.null_count:
        raise EngineError(_CODE, f"label column {label!r} of {name!r} has {column.null_count} empty values",
                          param="data.label_column")  # fmt: skip
    if pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
        return column.to_numpy(zero_copy_only=False).astype(np.int64), None
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or \
            pa.types.is_dictionary(column.type):  # fmt: skip
        values = np.array(column.cast(pa.string()).to_pylist(), dtype=object)
        class_names = sorted(set(values))
        ids = {c: i for i, c in enumerate(class_names)}
        return np.array([ids[v] for v in values], dtype=np.int64), class_names
    raise EngineError(_CODE, f"label column {label!r} of {name!r} is {column.type}; labels must be integer "
                             "class ids or strings (class names)", param="data.label_column")  # fmt: skip


def align_labels(yv: np.ndarray | None, val_names: list[str] | None, train_names: list[str] | None,
                 param: str = "validation_file") -> np.ndarray | None:  # fmt: skip
    """Validation labels renumbered to the training file's class names (both files named their classes)."""
    if yv is None or val_names is None or train_names is None or val_names == train_names:
        return yv
    ids = {c: i for i, c in enumerate(train_names)}
    unknown = sorted(set(val_names) - ids.keys())
    if unknown:
        raise EngineError(_CODE, f"the validation data has classes the training data lacks: {unknown[:10]}",
                          param=param)  # fmt: skip
    return np.array([ids[c] for c in val_names], dtype=np.int64)[yv]


# --------------------------------------------------------------------------- data report


def _rows_of(a):
    """``a``'s rows in chunks of numpy arrays (a mapped array is read a chunk at a time)."""
    if hasattr(a, "chunks"):
        yield from a.chunks()
        return
    for start in range(0, len(a), 65_536):
        yield np.asarray(a[start : start + 65_536])


def row_hashes(a) -> set[bytes]:
    hashes = set()
    for chunk in _rows_of(a):
        chunk = np.ascontiguousarray(chunk)
        flat = chunk.reshape(len(chunk), -1).view(np.uint8) if len(chunk) else chunk
        for row in flat:
            hashes.add(hashlib.blake2b(row.tobytes(), digest_size=16).digest())
    return hashes


def count_duplicates(train, val) -> int:
    """Validation rows whose exact bytes also occur in the training rows (leakage between the splits)."""
    seen = row_hashes(train)
    count = 0
    for chunk in _rows_of(val):
        chunk = np.ascontiguousarray(chunk)
        for row in chunk.reshape(len(chunk), -1).view(np.uint8):
            count += hashlib.blake2b(row.tobytes(), digest_size=16).digest() in seen
    return count


def class_balance(y: np.ndarray | None, num_classes: int) -> list[int] | None:
    if y is None:
        return None
    return [int(c) for c in np.bincount(np.asarray(y), minlength=num_classes)]


def data_report(*, fmt: str, x, y, xv, yv, num_classes: int, class_names: list[str] | None,
                stored_dtype: str | None, missing: dict | None, x_teacher=None) -> dict:  # fmt: skip
    """What the job trained on: class balance, shapes and dtypes, train/val duplicates, missing values."""
    train_counts, val_counts = class_balance(y, num_classes), class_balance(yv, num_classes)
    names = class_names or [str(i) for i in range(num_classes)]
    balance = [
        {"id": i, "name": names[i] if i < len(names) else str(i),
         "train": train_counts[i] if train_counts else None, "validation": val_counts[i] if val_counts else None}
        for i in range(num_classes)
    ]  # fmt: skip
    x_info = {"shape": [int(d) for d in x.shape[1:]], "dtype": stored_dtype or str(x.dtype), "model_dtype": str(x.dtype)}
    report = {
        "format": fmt,
        "rows": {"train": len(x), "validation": len(xv)},
        "features": {"x": x_info},
        "class_names": class_names,
        "class_balance": balance,
        "duplicates_train_validation": count_duplicates(x, xv),
        "missing_values": missing,
    }
    if x_teacher is not None:
        report["features"]["x_teacher"] = {"shape": [int(d) for d in x_teacher.shape[1:]],
                                           "dtype": str(x_teacher.dtype)}  # fmt: skip
    return report


__all__ = [
    "DataOptions",
    "align_labels",
    "check_image_zip",
    "count_duplicates",
    "data_report",
    "detect_format",
    "parse_data_options",
    "read_images",
    "read_table",
]
