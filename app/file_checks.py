"""Upload validation by content, without unpickling, loading tensors, inflating or decoding anything:
safetensors headers, npz members' .npy headers, an image-folder zip's central directory, a CSV's header line,
a Parquet file's magic bytes, and the two members of a Hugging Face ``save_pretrained`` zip.

Each check reads only headers (bounded sizes), so a hostile file costs bounded memory. The worker repeats the
zip checks (worker/engine/formats.py, same limits) and does what is too costly here: decoding images,
reading tables, and Parquet's column names (reading its footer needs pyarrow, a worker dependency).
"""

import csv
import io
import json
import stat
import struct
import zipfile
from math import prod
from pathlib import Path, PurePosixPath

import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
DATA_ARRAYS = {"x", "y", "x_teacher"}
# Image-folder zips: the same bounds as the worker's (worker/engine/formats.py).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_FOLDERS = ("train", "val")
ZIP_MAX_ENTRIES = 100_000
ZIP_MAX_BYTES = 4 * 1024**3  # declared uncompressed total
ZIP_MAX_RATIO = 200  # uncompressed / compressed, per entry
MAX_CSV_HEADER_BYTES = 1024 * 1024
TABLE_FORMATS = ("csv", "parquet")
# Hugging Face families the worker builds and tests (worker/engine/hf.py FAMILIES; a test keeps them equal).
HF_FAMILIES = {
    "bert": "BertForSequenceClassification",
    "distilbert": "DistilBertForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
}
HF_MEMBERS = ("config.json", "model.safetensors")
MAX_HF_CONFIG_BYTES = 1024 * 1024
MAX_HF_WEIGHTS_BYTES = 16 * 1024**3
# Float weights barely compress; a member that claims to inflate far more is refused (zip bomb).
MAX_HF_COMPRESSION_RATIO = 100


class InvalidFile(ValueError):
    """The upload is not what it claims to be; the message says what is wrong."""


def sniff_format(path: Path) -> str:
    """``npz``, ``images``, ``safetensors``, ``parquet`` or ``csv`` by content (uploads are often renamed)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"PK\x03\x04":
        return "npz" if _is_npz(path) else "images"
    if head[:4] == b"PAR1":
        return "parquet"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        raise InvalidFile("pickle data is refused: upload weights as safetensors and arrays as npz or safetensors")
    if _looks_like_text(head):
        return "csv"
    raise InvalidFile("unrecognised file format: expected safetensors, npz, a zip of image folders, CSV or Parquet")


def _is_npz(path: Path) -> bool:
    """An npz holds top-level .npy members only; any other zip is read as image folders."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise InvalidFile(f"not a valid zip archive: {e}") from None
    return bool(names) and all(n.endswith(".npy") and "/" not in n for n in names)


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # the read may have cut a multi-byte character
    return True


def inspect_safetensors(path: Path) -> dict:
    """Parse and check the header: sizes, dtypes, offsets inside the data area, no overlaps."""
    with open(path, "rb") as f:
        return _inspect_safetensors_stream(f, path.stat().st_size)


def _inspect_safetensors_stream(f, size: int) -> dict:
    """The checks of ``inspect_safetensors`` on an open binary stream of ``size`` bytes (a zip member too)."""
    raw_len = f.read(8)
    if len(raw_len) < 8:
        raise InvalidFile("truncated safetensors file: no header length")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > MAX_HEADER_BYTES:
        raise InvalidFile(f"safetensors header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > size:
        raise InvalidFile("truncated safetensors file: header length beyond the end of the file")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidFile(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidFile("safetensors header must be a JSON object")
    data_len = size - 8 - header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidFile("safetensors __metadata__ must map strings to strings")
    spans, tensors = [], {}
    for name, info in header.items():
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise InvalidFile(f"tensor {name!r}: entry must have dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise InvalidFile(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InvalidFile(f"tensor {name!r}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidFile(f"tensor {name!r}: data_offsets must be two integers")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise InvalidFile(f"tensor {name!r}: data_offsets [{start}, {end}] outside the {data_len}-byte data area")
        if end - start != prod(shape) * DTYPE_BYTES[dtype]:
            raise InvalidFile(f"tensor {name!r}: {end - start} bytes do not hold {dtype} of shape {shape}")
        spans.append((start, end, name))
        tensors[name] = {"dtype": dtype, "shape": shape}
    spans.sort()
    for (s1, e1, n1), (s2, e2, n2) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            raise InvalidFile(f"tensors {n1!r} and {n2!r} overlap")
    if not tensors:
        raise InvalidFile("safetensors file holds no tensors")
    return {"tensors": tensors, "metadata": metadata}


def inspect_npz(path: Path) -> dict:
    """Read each member's .npy header only; object arrays (which would need unpickling) are refused."""
    tensors = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy") or "/" in info.filename:
                    raise InvalidFile(f"npz member {info.filename[:100]!r} is not a .npy array")
                with zf.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }.get(version)
                    if read_header is None:
                        raise InvalidFile(f"npz member {info.filename[:100]!r}: unsupported .npy version {version}")
                    shape, _fortran, dtype = read_header(member)
                if dtype.hasobject:
                    raise InvalidFile(f"array {info.filename[:-4]!r} holds Python objects, which are refused")
                tensors[info.filename[:-4]] = {"dtype": dtype.str, "shape": list(shape)}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        if isinstance(e, InvalidFile):
            raise
        raise InvalidFile(f"not a valid npz archive: {e}") from None
    if not tensors:
        raise InvalidFile("npz archive holds no arrays")
    return {"tensors": tensors, "metadata": {}}


def _pack_token_shapes(tensors: dict) -> dict:
    """``input_ids`` [N, L] (+ ``attention_mask``) is token data; the worker packs it into ``x`` [N, 2, L]."""
    if "x" in tensors:
        raise InvalidFile("dataset holds both 'x' and 'input_ids'; give one of them")
    ids, mask = tensors["input_ids"], tensors.get("attention_mask")
    if len(ids["shape"]) != 2 or not _is_integer(ids["dtype"]):
        raise InvalidFile(f"'input_ids' must be integer token ids [N, L], got {ids['dtype']} {ids['shape']}")
    if mask is not None and (mask["shape"] != ids["shape"] or not _is_integer(mask["dtype"])):
        raise InvalidFile(f"'attention_mask' must be integers of the shape of 'input_ids' {ids['shape']}, "
                          f"got {mask['dtype']} {mask['shape']}")  # fmt: skip
    rest = {k: v for k, v in tensors.items() if k not in ("input_ids", "attention_mask")}
    return {**rest, "x": {"dtype": ids["dtype"], "shape": [ids["shape"][0], 2, ids["shape"][1]]}}


def _is_integer(dtype: str) -> bool:
    return dtype[:1] in ("I", "U") or dtype[1:2] in ("i", "u", "b")


def _check_dataset(tensors: dict) -> dict:
    tokens = "input_ids" in tensors
    if tokens:
        tensors = _pack_token_shapes(tensors)
    elif "attention_mask" in tensors:
        raise InvalidFile("dataset has 'attention_mask' without 'input_ids'")
    if "x" not in tensors:
        raise InvalidFile(f"dataset must hold an array named 'x' (found {sorted(tensors)})")
    n = tensors["x"]["shape"][0] if tensors["x"]["shape"] else None
    if n is None or len(tensors["x"]["shape"]) < 2:
        raise InvalidFile(f"'x' must have shape [N, ...], got {tensors['x']['shape']}")
    for name in ("y", "x_teacher"):
        if name in tensors:
            shape = tensors[name]["shape"]
            if not shape or shape[0] != n:
                raise InvalidFile(f"'{name}' has {shape[0] if shape else 0} rows but 'x' has {n}")
    if "y" in tensors:
        y = tensors["y"]
        if len(y["shape"]) != 1:
            raise InvalidFile(f"'y' must be 1-D class ids, got shape {y['shape']}")
        if not any(k in y["dtype"] for k in ("i", "u", "I64", "I32", "U8", "I16", "U16", "U32", "U64", "I8")):
            raise InvalidFile(f"'y' must hold integer class ids, got dtype {y['dtype']}")
    return {"rows": n, "x_shape": tensors["x"]["shape"][1:], "has_labels": "y" in tensors,
            "has_x_teacher": "x_teacher" in tensors, "tokens": tokens}  # fmt: skip


def inspect_hf_archive(path: Path) -> dict:
    """A zipped ``save_pretrained`` folder: exactly config.json and model.safetensors (at the root or in one
    folder), a config of a supported family's sequence classifier with no remote code, a valid header."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            names = [i.filename for i in infos]
            if names and all(n.endswith(".npy") for n in names):
                raise InvalidFile("teacher weights must be a safetensors file or a zipped save_pretrained folder; "
                                  "this zip is an npz data set (upload it with purpose=dataset)")  # fmt: skip
            if any(n.endswith(("data.pkl", ".bin", ".pt", ".pth", ".ckpt")) for n in names):
                raise InvalidFile("pickled PyTorch weights (pytorch_model.bin / data.pkl) are refused: save with "
                                  "save_pretrained's default safetensors format (model.safetensors)")  # fmt: skip
            members = {n.rsplit("/", 1)[-1]: i for n, i in zip(names, infos, strict=True)}
            folders = {n.rsplit("/", 1)[0] if "/" in n else "" for n in names}
            if sorted(members) != sorted(HF_MEMBERS) or len(infos) != len(HF_MEMBERS) or len(folders) != 1:
                missing = [m for m in HF_MEMBERS if m not in members]
                raise InvalidFile(
                    f"a Hugging Face teacher zip holds exactly {' and '.join(HF_MEMBERS)} (as save_pretrained "
                    f"writes them); {'missing ' + ', '.join(missing) if missing else 'found ' + str(names[:10])}"
                )
            config_info, weights_info = members["config.json"], members["model.safetensors"]
            if config_info.file_size > MAX_HF_CONFIG_BYTES:
                raise InvalidFile(f"config.json is larger than {MAX_HF_CONFIG_BYTES} bytes")
            if weights_info.file_size > MAX_HF_WEIGHTS_BYTES:
                raise InvalidFile(f"model.safetensors is larger than {MAX_HF_WEIGHTS_BYTES} bytes")
            for info in (config_info, weights_info):
                if info.file_size > MAX_HF_COMPRESSION_RATIO * info.compress_size + 1024 * 1024:
                    raise InvalidFile(f"{info.filename} claims to inflate {info.file_size} bytes from "
                                      f"{info.compress_size}; refused")  # fmt: skip
            try:
                config = json.loads(zf.read(config_info))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InvalidFile(f"config.json is not valid JSON: {e}") from None
            with zf.open(weights_info) as f:
                weights = _inspect_safetensors_stream(f, weights_info.file_size)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InvalidFile(f"not a valid zip archive: {e}") from None
    return {**_check_hf_config(config), "tensors": len(weights["tensors"]), "weights_bytes": weights_info.file_size}


def _check_hf_config(config) -> dict:
    if not isinstance(config, dict):
        raise InvalidFile("config.json must be a JSON object")
    if "auto_map" in config:
        raise InvalidFile("config.json has auto_map (custom code from the hub); remote code is never run: use a "
                          f"built-in family ({', '.join(HF_FAMILIES)})")  # fmt: skip
    model_type = config.get("model_type")
    if model_type not in HF_FAMILIES:
        raise InvalidFile(f"config.json model_type {str(model_type)[:50]!r} is not supported; supported: "
                          f"{', '.join(HF_FAMILIES)}")  # fmt: skip
    architectures = config.get("architectures")
    if architectures != [HF_FAMILIES[model_type]]:
        raise InvalidFile(f"config.json architectures must be [{HF_FAMILIES[model_type]!r}] (a sequence "
                          f"classifier saved with save_pretrained), got {str(architectures)[:100]}")  # fmt: skip
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) else config.get("num_labels")
    if not isinstance(num_labels, int) or num_labels < 2:
        raise InvalidFile(f"config.json must describe at least 2 labels (id2label), got {num_labels!r}")
    if model_type == "llama" and config.get("pad_token_id") is None:
        raise InvalidFile("config.json pad_token_id is null: a decoder classifies at the last non-pad token, so "
                          "set pad_token_id before save_pretrained")  # fmt: skip
    sizes = {"num_hidden_layers": ("n_layers",), "hidden_size": ("dim",), "num_attention_heads": ("n_heads",),
             "vocab_size": (), "max_position_embeddings": ()}  # fmt: skip
    details = {"model_type": model_type, "num_labels": num_labels}
    for key, aliases in sizes.items():
        value = next((config[k] for k in (key, *aliases) if k in config), None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidFile(f"config.json {key} must be a positive integer, got {str(value)[:50]}")
        details[key] = value
    return details


def inspect_image_zip(path: Path) -> dict:
    """The central directory only: bounds against zip bombs, no path escapes or links, the folder layout."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise InvalidFile(f"not a valid zip archive: {e}") from None
    if len(infos) > ZIP_MAX_ENTRIES:
        raise InvalidFile(f"the zip has {len(infos)} entries; at most {ZIP_MAX_ENTRIES} are accepted")
    total = sum(i.file_size for i in infos)
    if total > ZIP_MAX_BYTES:
        raise InvalidFile(f"the zip would unpack to {total} bytes; at most {ZIP_MAX_BYTES} are accepted")
    counts: dict[str, dict[str, int]] = {}
    for info in infos:
        member = info.filename
        parts = PurePosixPath(member.replace("\\", "/")).parts
        if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":"):
            raise InvalidFile(f"zip member {member[:200]!r} has an absolute path")
        if ".." in parts:
            raise InvalidFile(f"zip member {member[:200]!r} leaves the archive ('..')")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidFile(f"zip member {member[:200]!r} is a symbolic link")
        if info.file_size > ZIP_MAX_RATIO * max(info.compress_size, 1):
            raise InvalidFile(f"zip member {member[:200]!r} is compressed more than {ZIP_MAX_RATIO}:1 "
                              f"({info.file_size} bytes from {info.compress_size})")  # fmt: skip
        if info.is_dir() or any(p == "__MACOSX" or p.startswith(".") for p in parts):
            continue
        if PurePosixPath(member).suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidFile(f"zip member {member[:200]!r} is not a .png, .jpg or .jpeg image")
        if len(parts) == 2:
            split, label = "all", parts[0]
        elif len(parts) == 3 and parts[0] in SPLIT_FOLDERS:
            split, label = parts[0], parts[1]
        else:
            raise InvalidFile(f"zip member {member[:200]!r} is not at class_name/image or train|val/class_name/image")
        counts.setdefault(split, {}).setdefault(label, 0)
        counts[split][label] += 1
    if not counts:
        raise InvalidFile("the zip holds no .png, .jpg or .jpeg images in class folders")
    if "all" in counts and len(counts) > 1:
        raise InvalidFile("the zip mixes class folders at the top with train/ and val/ folders")
    if len(counts) == 1 and "all" not in counts:
        raise InvalidFile(f"the zip has a {next(iter(counts))}/ folder but not the other: give both train/ and "
                          "val/, or put the class folders at the top")  # fmt: skip
    unknown = sorted(set(counts.get("val", {})) - set(counts.get("train", {})))
    if unknown:
        raise InvalidFile(f"val/ has classes that train/ lacks: {unknown[:10]}")
    return {"layout": "class_folders" if "all" in counts else "train_val", "classes": sorted(counts.get("train") or
            counts["all"]), "images": {split: sum(c.values()) for split, c in counts.items()},
            "has_labels": True, "has_x_teacher": False}  # fmt: skip


def inspect_csv(path: Path) -> dict:
    """The header line: comma-separated, unique, non-empty column names."""
    with open(path, "rb") as f:
        first = f.readline(MAX_CSV_HEADER_BYTES + 1)
    if len(first) > MAX_CSV_HEADER_BYTES:
        raise InvalidFile(f"the CSV header line is longer than {MAX_CSV_HEADER_BYTES} bytes")
    try:
        columns = next(csv.reader(io.StringIO(first.decode("utf-8-sig"))), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise InvalidFile(f"cannot read the CSV header line: {e}") from None
    if len(columns) < 2:
        raise InvalidFile("a CSV data set needs a header line with at least two comma-separated columns "
                          "(features and a label)")  # fmt: skip
    if any(not c for c in columns) or len(set(columns)) != len(columns):
        raise InvalidFile("CSV column names must be non-empty and unique")
    return {"columns": columns, "has_labels": True, "has_x_teacher": False}


def inspect_parquet(path: Path) -> dict:
    """Magic bytes at both ends and a footer that fits the file; the schema is read by the worker."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 12:
            raise InvalidFile("truncated Parquet file")
        f.seek(size - 8)
        tail = f.read(8)
    footer = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or footer > size - 12:
        raise InvalidFile("truncated or malformed Parquet file (no footer)")
    return {"columns": None, "has_labels": True, "has_x_teacher": False}


def validate_upload(path: Path, purpose: str) -> tuple[str, dict]:
    """Return (format, details) or raise InvalidFile."""
    fmt = sniff_format(path)
    if purpose == "teacher":
        if fmt in ("npz", "images"):  # a zip: the Hugging Face save_pretrained folder
            return "hf_zip", inspect_hf_archive(path)
        if fmt != "safetensors":
            raise InvalidFile("teacher weights must be a safetensors file or a zipped save_pretrained folder")
        return fmt, inspect_safetensors(path)
    if fmt == "images":
        return fmt, inspect_image_zip(path)
    if fmt == "csv":
        return fmt, inspect_csv(path)
    if fmt == "parquet":
        return fmt, inspect_parquet(path)
    details = inspect_safetensors(path) if fmt == "safetensors" else inspect_npz(path)
    details.update(_check_dataset(details["tensors"]))
    return fmt, details
