"""Data set files and built-in data sets, read without ever unpickling.

A data set is ``x`` (float, or uint8 images scaled to [0, 1], or integer token
ids), optional ``y`` (int64 class ids) and optional ``x_teacher`` (the teacher's
modality, paired row by row). Files are ``.npz`` read with ``allow_pickle=False``
or ``.safetensors``; anything else is rejected before its bytes are interpreted.

Data larger than memory: a safetensors file bigger than ``memory_limit`` (default
``DATA_MEMORY_LIMIT``, 1 GiB) is never loaded whole. Its ``x`` / ``x_teacher``
come back as ``mapped.MappedRows`` (read through a memory map, a batch of rows at a
time, converted on the fly); labels ``y`` (8 bytes a row) are read into memory.
``.npz`` files are zip archives and always load whole: large data should be
safetensors.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import EngineError
from .formats import DataOptions, detect_format, read_images, read_table
from .mapped import MappedRows, open_safetensors

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("mnist1d", "mnist1d:test", "digits")
MNIST1D_SAMPLES = 25_000  # generated; split 80/20 into train and test by the generator
# safetensors files up to this size are loaded into memory (fastest); larger ones are memory-mapped.
DATA_MEMORY_LIMIT = 1024**3
_CODE = "invalid_data"


# --------------------------------------------------------------------------- reading files


def _read_arrays(path: Path, memory_limit: int | None = None, options: DataOptions | None = None) -> tuple[str, dict]:
    """Return (format, {name: array}) for any data file kind ``formats.detect_format`` knows.

    Image folders and tables add ``class_names`` (and ``missing``, ``validation``) beside the arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError(_CODE, f"data file {path.name!r} does not exist")
    # Sniffed from the content rather than the extension: uploads are often renamed.
    fmt = detect_format(path)
    if fmt == "npz":
        return fmt, _read_npz(path)
    if fmt == "safetensors":
        limit = DATA_MEMORY_LIMIT if memory_limit is None else memory_limit
        return fmt, _map_safetensors(path) if path.stat().st_size > limit else _read_safetensors(path)
    options = options or DataOptions()
    if fmt == "images":
        return fmt, read_images(path, options)
    return fmt, read_table(path, fmt, options)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise EngineError(_CODE, f"cannot read {path.name!r} as .npz: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise EngineError(_CODE, f"{path.name!r} is not an .npz archive")
    arrays = {}
    with archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as err:
                # numpy refuses object arrays with allow_pickle=False before unpickling anything.
                if "allow_pickle" in str(err) or "Object arrays" in str(err):
                    raise EngineError(
                        _CODE,
                        f"array {name!r} in {path.name!r} holds Python objects (dtype=object); "
                        "only numeric arrays are accepted, pickled data is never loaded",
                        param=name,
                    ) from None
                raise EngineError(
                    _CODE, f"cannot read array {name!r} in {path.name!r}: {err}", param=name
                ) from None
            except (OSError, zipfile.BadZipFile, EOFError) as err:
                raise EngineError(
                    _CODE, f"cannot read array {name!r} in {path.name!r}: {err}", param=name
                ) from None
    return arrays


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types, also for bf16 (no numpy dtype)
        raise EngineError(_CODE, f"cannot read {path.name!r} as safetensors: {err}") from None


def _map_safetensors(path: Path) -> dict[str, MappedRows]:
    try:
        return open_safetensors(path)
    except (ValueError, OSError) as err:
        raise EngineError(_CODE, f"cannot read {path.name!r} as safetensors: {err}") from None


# --------------------------------------------------------------------------- checking arrays


def _check_x(name: str, x):
    """Validate an input array and convert it to the dtype models consume (a mapped array: lazily)."""
    if x.dtype == object or x.dtype.kind not in "fiu":
        raise EngineError(_CODE, f"{name!r} must be a numeric array, got dtype {x.dtype}", param=name)
    if x.ndim not in (2, 3, 4):
        raise EngineError(
            _CODE,
            f"{name!r} must be [N, F], [N, L], [N, C, L] or [N, C, H, W]; got shape {list(x.shape)}",
            param=name,
        )
    if x.shape[0] == 0:
        raise EngineError(_CODE, f"{name!r} has no rows", param=name)
    if isinstance(x, MappedRows):
        if x.dtype == np.uint8:
            return x.astype(np.float32, divisor=255.0)
        return x.astype(np.int64 if x.dtype.kind in "iu" else np.float32)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind in "iu":
        # Integer inputs other than uint8 are token ids for embedding models.
        return x.astype(np.int64, copy=False)
    return x.astype(np.float32, copy=False)


def _check_y(y, n: int) -> np.ndarray:
    if isinstance(y, MappedRows) and y.dtype != object and y.dtype.kind in "iu" and y.ndim == 1:
        y = y.to_numpy()  # labels are small (8 bytes a row): kept in memory
    if y.dtype == object or y.dtype.kind not in "iu":
        raise EngineError(_CODE, f"'y' must hold integer class ids, got dtype {y.dtype}", param="y")
    if y.ndim != 1:
        raise EngineError(_CODE, f"'y' must be one-dimensional [N], got shape {list(y.shape)}", param="y")
    if len(y) != n:
        raise EngineError(_CODE, f"'x' has {n} rows but 'y' has {len(y)}", param="y")
    if len(y) and int(y.min()) < 0:
        raise EngineError(_CODE, f"'y' must be class ids >= 0, found {int(y.min())}", param="y")
    return y.astype(np.int64, copy=False)


def _pack_tokens(arrays: dict, label: str) -> dict:
    """``input_ids`` [N, L] (+ ``attention_mask``, default all ones) → ``x`` = [N, 2, L] int64.

    Packing the mask with the ids lets every batch, teacher cache and the ONNX graph carry it
    as one input (``hf.py`` unpacks it); token arrays are loaded into memory.
    """
    if "x" in arrays:
        raise EngineError(_CODE, f"{label} holds both 'x' and 'input_ids'; give one of them", param="input_ids")
    ids = arrays.pop("input_ids")
    ids = ids.to_numpy() if isinstance(ids, MappedRows) else ids
    if ids.dtype == object or ids.dtype.kind not in "iu" or ids.ndim != 2 or not len(ids):
        raise EngineError(
            _CODE, f"'input_ids' must be integer token ids [N, L], got {ids.dtype} {list(ids.shape)}",
            param="input_ids",
        )  # fmt: skip
    mask = arrays.pop("attention_mask", None)
    if mask is None:
        mask = np.ones_like(ids)
    mask = mask.to_numpy() if isinstance(mask, MappedRows) else mask
    if mask.shape != ids.shape or mask.dtype == object or mask.dtype.kind not in "iub":
        raise EngineError(
            _CODE, f"'attention_mask' must be integers of the shape of 'input_ids' {list(ids.shape)}, "
            f"got {mask.dtype} {list(mask.shape)}", param="attention_mask",
        )  # fmt: skip
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
        raise EngineError(_CODE, "'attention_mask' must hold 0 and 1 only", param="attention_mask")
    return {**arrays, "x": np.stack([ids.astype(np.int64), mask.astype(np.int64)], axis=1)}


def _check_arrays(arrays: dict[str, np.ndarray], label: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    if "input_ids" in arrays:
        arrays = _pack_tokens(dict(arrays), label)
    elif "attention_mask" in arrays:
        raise EngineError(_CODE, f"{label} has 'attention_mask' without 'input_ids'", param="input_ids")
    if "x" not in arrays:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise EngineError(_CODE, f"{label} has no array named 'x' (found: {found})", param="x")
    x = _check_x("x", arrays["x"])
    y = _check_y(arrays["y"], len(x)) if "y" in arrays else None
    extras: dict = {}
    if "x_teacher" in arrays:
        xt = _check_x("x_teacher", arrays["x_teacher"])
        if len(xt) != len(x):
            raise EngineError(
                _CODE, f"'x' has {len(x)} rows but 'x_teacher' has {len(xt)}", param="x_teacher"
            )
        extras["x_teacher"] = xt
    return x, y, extras


def array_identity(*arrays) -> str:
    """sha256 over dtypes, shapes and bytes: the data identity in cache keys.

    A mapped array contributes its own identity (the file's sha256, its place in the
    file, its rows and conversion), so a 4 GB file is hashed once, not per view.
    """
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        if isinstance(a, MappedRows):
            h.update(f"mapped:{a.identity()};".encode())
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{list(a.shape)};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


# --------------------------------------------------------------------------- public API


def load_dataset(
    source: str, cache_dir: Path | None, memory_limit: int | None = None, options: DataOptions | None = None
) -> tuple[np.ndarray | MappedRows, np.ndarray | None, dict]:
    """Load ``source`` (a local file path or ``builtin:NAME``) as ``(x, y, extras)``.

    ``extras`` holds ``x_teacher`` when present, plus ``format``, ``identity``
    (a content hash used in teacher-cache keys), ``mapped`` (True when ``x`` is
    read through a memory map: a safetensors file larger than ``memory_limit``,
    default ``DATA_MEMORY_LIMIT``), ``stored_dtype`` (of ``x`` in the file),
    ``class_names`` (image folders, tables with string labels; else None),
    ``missing`` (tables: filled values per feature column) and, for an image zip
    with ``train/`` and ``val/`` folders, ``validation``: the ``(x, y)`` of ``val/``.
    ``options`` (``spec.data``) says how image folders and tables become arrays.
    """
    source = str(source)
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        arrays = _load_builtin(name, cache_dir)
        fmt = "builtin"
    else:
        fmt, arrays = _read_arrays(Path(source), memory_limit, options)
    label = Path(source).name if fmt != "builtin" else source
    stored_dtype = str(arrays["x"].dtype) if "x" in arrays else None
    x, y, extras = _check_arrays(arrays, label)
    if "validation" in arrays:
        xv, yv, _ = _check_arrays(arrays["validation"], f"{label} val/")
        extras["validation"] = (xv, yv)
    extras["format"] = fmt
    extras["stored_dtype"] = stored_dtype
    extras["class_names"] = arrays.get("class_names")
    extras["missing"] = arrays.get("missing")
    extras["mapped"] = isinstance(x, MappedRows)
    extras["identity"] = array_identity(x, y, extras.get("x_teacher"))
    return x, y, extras


def validate_data_file(path: Path, memory_limit: int | None = None, options: DataOptions | None = None) -> dict:
    """Inspect an uploaded data file without training on it.

    Returns ``{"format", "n", "x_shape", "x_dtype", "classes"}`` where ``x_shape`` is
    per sample, ``x_dtype`` the stored dtype and ``classes`` = max(y)+1 (None without y).
    Raises ``EngineError("invalid_data")`` for object arrays, a missing ``x``, a
    length mismatch or non-integer ``y``.
    """
    fmt, arrays = _read_arrays(Path(path), memory_limit, options)
    stored_dtype = str(arrays["x"].dtype) if "x" in arrays else None
    x, y, extras = _check_arrays(arrays, Path(path).name)
    return {
        "format": fmt,
        "n": len(x),
        "x_shape": [int(d) for d in x.shape[1:]],
        "x_dtype": stored_dtype,
        "classes": int(y.max()) + 1 if y is not None and len(y) else None,
        "has_x_teacher": "x_teacher" in extras,
    }


def take_rows(a, idx: np.ndarray):
    """Rows ``idx`` of ``a``: a copy for an in-memory array, a view by index for a mapped one."""
    if a is None:
        return None
    return a.subset(idx) if isinstance(a, MappedRows) else a[idx]


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, val_idx) holding out ``fraction`` of ``n`` rows."""
    if not 0.0 < fraction < 1.0:
        raise EngineError(
            "invalid_spec",
            f"validation_fraction must be in (0, 1) when no validation file is given, got {fraction}",
            param="hyperparameters.validation_fraction",
        )
    n_val = round(n * fraction)
    if n_val < 1 or n - n_val < 1:
        raise EngineError(
            _CODE,
            f"{n} rows cannot be split into train and validation with validation_fraction={fraction}",
            param="train_file",
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --------------------------------------------------------------------------- built-in data sets


def _load_builtin(name: str, cache_dir: Path | None) -> dict[str, np.ndarray]:
    if name == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

        digits = load_digits()
        return {"x": (digits.data / 16.0).astype(np.float32), "y": digits.target.astype(np.int64)}
    if name in ("mnist1d", "mnist1d:test"):
        arrays = _mnist1d(cache_dir)
        if name == "mnist1d":
            return {"x": arrays["x"], "y": arrays["y"]}
        return {"x": arrays["x_test"], "y": arrays["y_test"]}
    valid = ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
    raise EngineError(_CODE, f"unknown built-in data set {name!r}; valid: {valid}", param="train_file")


def _mnist1d(cache_dir: Path | None) -> dict[str, np.ndarray]:
    """MNIST-1D (Greydanus 2020) generated locally: 20,000 train / 5,000 test sequences of length 40.

    The package's default is 5,000 samples; distillation needs a transfer set large enough for the
    teacher's soft targets to matter (the project's benchmarks use 20k).

    Uses ``mnist1d.data.make_dataset`` (pure generation; the package's download path
    is ``get_dataset``, which is never called). The generator reseeds numpy's and
    Python's global RNGs, so their states are restored afterwards.
    """
    cached = Path(cache_dir) / "builtin" / "mnist1d-v2-25k.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as f:
                return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # noqa: BLE001, S110 - a damaged cache entry is simply rebuilt below
            pass
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        args = get_dataset_args()
        args.num_samples = MNIST1D_SAMPLES
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {
        "x": raw["x"].astype(np.float32),
        "y": raw["y"].astype(np.int64),
        "x_test": raw["x_test"].astype(np.float32),
        "y_test": raw["y_test"].astype(np.int64),
    }
    if cached is not None:
        atomic_write_npz(cached, arrays)
    return arrays


def atomic_write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def describe_source(source: str | None) -> str:
    if source is None:
        return "none"
    return source if source.startswith(BUILTIN_PREFIX) else Path(source).name


__all__ = [
    "array_identity",
    "describe_source",
    "load_dataset",
    "split_validation",
    "take_rows",
    "validate_data_file",
]
