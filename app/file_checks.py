"""Upload validation by content, without unpickling or loading tensors: safetensors headers and npz members.

Each check reads only headers (bounded sizes), so a hostile file costs bounded memory.
"""

import json
import struct
import zipfile
from math import prod
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
DATA_ARRAYS = {"x", "y", "x_teacher"}


class InvalidFile(ValueError):
    """The upload is not what it claims to be; the message says what is wrong."""


def sniff_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "npz"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        raise InvalidFile("pickle data is refused: upload weights as safetensors and arrays as npz or safetensors")
    raise InvalidFile("unrecognised file format: expected safetensors or npz")


def inspect_safetensors(path: Path) -> dict:
    """Parse and check the header: sizes, dtypes, offsets inside the data area, no overlaps."""
    size = path.stat().st_size
    with open(path, "rb") as f:
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


def _check_dataset(tensors: dict) -> dict:
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
            "has_x_teacher": "x_teacher" in tensors}  # fmt: skip


def validate_upload(path: Path, purpose: str) -> tuple[str, dict]:
    """Return (format, details) or raise InvalidFile."""
    fmt = sniff_format(path)
    if purpose == "teacher":
        if fmt != "safetensors":
            raise InvalidFile("teacher weights must be a safetensors file")
        return fmt, inspect_safetensors(path)
    details = inspect_safetensors(path) if fmt == "safetensors" else inspect_npz(path)
    details.update(_check_dataset(details["tensors"]))
    return fmt, details
