"""Arrays of a safetensors file read through a memory map: data larger than memory.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}}``) and the arrays' bytes, each
little-endian and C-contiguous. ``open_safetensors`` maps the file once and
gives each array as ``MappedRows``: nothing is read until rows are asked for.

``MappedRows`` stands in for the in-memory data array wherever the engine
touches data: ``len``, ``shape``, ``dtype`` (numpy, after conversion),
``nbytes``, ``device`` (cpu), and ``rows[idx]`` (a slice, an index array or a
LongTensor) returning a torch tensor of just those rows, converted to the
output dtype (``uint8`` images to float32 / 255, other integers to int64).
``subset(idx)`` is a view by row index (the validation split), ``astype`` a
view with another output dtype (what a model reads).

Resident memory. Pages a process touches through a map count in its RSS until
unmapped, even though the kernel could drop them, and a fault maps more than
the page touched: on current kernels with large page-cache folios a single
touched byte maps a whole 2 MiB folio (measured on this project's 6.18
kernel; ``madvise(MADV_RANDOM)`` / ``MADV_NOHUGEPAGE`` do not change it). So:

- contiguous reads (slices: validation, the teacher pass, hashing-free chunk
  passes, copies to a device) go through the map, and every map counts the
  bytes its reads may have made resident and, past ``RELEASE_BYTES``, drops its
  pages from the process with ``madvise(MADV_DONTNEED)``; the page cache keeps
  the bytes, so the next read is a minor fault;
- random row gathers (training batches) do not touch the map at all: the
  batch's indices are sorted, runs of consecutive rows merged, and each run is
  read with ``os.preadv`` straight into the batch buffer (page cache only, no
  mapping), then put back in the order asked.

RSS stays bounded by about ``RELEASE_BYTES`` per open file, whatever its size.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# Drop a map's pages from the process after reads that may have touched this much of it.
RELEASE_BYTES = 64 * 1024**2
# Rows per chunk for whole-array passes (hashing, min/max, copies to a device): about this many bytes.
CHUNK_BYTES = 16 * 1024**2
# What one fault may map beyond the bytes asked for, at each end of a contiguous read (a large folio).
_MAP_GRANULE = 2 * 1024**2

# safetensors dtype names → little-endian numpy dtypes (BF16 and F8 have no numpy dtype).
_DTYPES = {
    "BOOL": "|b1",
    "U8": "|u1",
    "I8": "|i1",
    "U16": "<u2",
    "I16": "<i2",
    "F16": "<f2",
    "U32": "<u4",
    "I32": "<i4",
    "F32": "<f4",
    "U64": "<u8",
    "I64": "<i8",
    "F64": "<f8",
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class MappedFile:
    """One read-only map of a file, shared by every array (and view) in it; see the module doc."""

    def __init__(self, path: Path, release_bytes: int = RELEASE_BYTES):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)  # kept for positional reads (row gathers)
        weakref.finalize(self, os.close, self.fd)
        self.size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        self.release_bytes = release_bytes
        self.releases = 0  # how often the pages were dropped (for tests and benchmarks)
        self._touched = 0
        self._sha256: str | None = None

    def touched(self, nbytes: int) -> None:
        """Count bytes a read may have made resident; drop the pages once past the budget."""
        self._touched += nbytes
        if self._touched >= self.release_bytes:
            self.release()

    def release(self) -> None:
        self._touched = 0
        self.releases += 1
        if hasattr(mmap, "MADV_DONTNEED"):
            self.mm.madvise(mmap.MADV_DONTNEED)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from the file at ``offset`` with positional reads (nothing is mapped)."""
        while len(buf):
            n = os.preadv(self.fd, [buf], offset)
            if n <= 0:
                raise OSError(f"{self.path.name}: unexpected end of file at byte {offset}")
            buf, offset = buf[n:], offset + n

    def sha256(self) -> str:
        """The file's content hash, read with ordinary reads (page cache only, nothing mapped); memoised."""
        if self._sha256 is None:
            h = hashlib.sha256()
            buf = bytearray(CHUNK_BYTES)
            with open(self.path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(memoryview(buf)[:n])
            self._sha256 = h.hexdigest()
        return self._sha256


class MappedRows:
    """Rows of one array of a mapped file, read on demand (see the module doc)."""

    def __init__(
        self,
        file: MappedFile,
        raw: np.ndarray,
        *,
        name: str,
        offset: int = 0,
        rows: np.ndarray | None = None,
        dtype: np.dtype | None = None,
        divisor: float | None = None,
    ):
        self.file = file
        self.raw = raw  # the whole stored array, a read-only view of the map
        self.name = name
        self.offset = offset  # of the array's bytes in the file
        self.rows = rows  # row indices into raw (a view by index), or None for all rows
        self.dtype = np.dtype(dtype if dtype is not None else raw.dtype)  # what reads return
        self.divisor = divisor  # uint8 images: converted to float32 and divided by 255
        self.torch_dtype = torch.from_numpy(np.empty(0, self.dtype)).dtype
        self._row_bytes = raw.dtype.itemsize * math.prod(raw.shape[1:])

    # ---- array-like metadata ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.raw.shape[1:])

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def nbytes(self) -> int:
        return len(self) * self.dtype.itemsize * math.prod(self.raw.shape[1:])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return len(self.raw) if self.rows is None else len(self.rows)

    def __repr__(self) -> str:
        return (
            f"MappedRows({self.file.path.name}:{self.name}, shape={list(self.shape)}, dtype={self.dtype}, "
            f"{'all rows' if self.rows is None else 'by index'})"
        )

    # ---- views --------------------------------------------------------------------------------
    def _view(self, **changes) -> MappedRows:
        args = {
            "name": self.name,
            "offset": self.offset,
            "rows": self.rows,
            "dtype": self.dtype,
            "divisor": self.divisor,
        } | changes
        return MappedRows(self.file, self.raw, **args)

    def subset(self, idx) -> MappedRows:
        """A view of rows ``idx`` (no data is read or copied)."""
        idx = np.asarray(idx, dtype=np.int64)
        return self._view(rows=idx if self.rows is None else self.rows[idx])

    def astype(self, dtype, divisor: float | None = None) -> MappedRows:
        """A view whose reads return ``dtype`` (a numpy or torch dtype)."""
        if isinstance(dtype, torch.dtype):
            dtype = torch.empty(0, dtype=dtype).numpy().dtype
        dtype = np.dtype(dtype)
        if dtype == self.dtype and divisor is None:
            return self
        return self._view(dtype=dtype, divisor=divisor if divisor is not None else self.divisor)

    # ---- reads --------------------------------------------------------------------------------
    def read(self, key) -> np.ndarray:
        """Rows ``key`` (a slice, an int or an index array) as a new, converted numpy array."""
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)):
            return self.read(np.array([key]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if self.rows is None and step == 1:
                out = np.array(self.raw[start:stop])  # contiguous: a sequential read through the map
                self.file.touched(out.nbytes + 2 * _MAP_GRANULE)
                return self._convert(out)
            key = np.arange(start, stop, step)
        idx = np.asarray(key, dtype=np.int64)
        if self.rows is not None:
            idx = self.rows[idx]
        return self._convert(self._gather(idx))

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` of the stored array by positional reads, in file order, returned in the order asked."""
        n = len(self.raw)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        out = np.empty((len(idx), *self.raw.shape[1:]), dtype=self.raw.dtype)
        if not len(idx) or not self._row_bytes:
            return out
        sorted_rows = out if np.array_equal(order, np.arange(len(idx))) else np.empty_like(out)
        buf = memoryview(sorted_rows).cast("B")
        rb = self._row_bytes
        # Runs of consecutive rows become one read each.
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for s, e in zip([0, *breaks.tolist()], [*breaks.tolist(), len(ordered)]):
            self.file.pread_into(buf[s * rb : e * rb], self.offset + int(ordered[s]) * rb)
        if sorted_rows is not out:
            out[order] = sorted_rows
        return out

    def __getitem__(self, key) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.read(key)))

    def _convert(self, a: np.ndarray) -> np.ndarray:
        if self.divisor is not None:
            a = a.astype(np.float32) / np.float32(self.divisor)
        return a.astype(self.dtype, copy=False)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """All rows in order, converted, a chunk of about ``chunk_bytes`` at a time."""
        step = max(1, chunk_bytes // max(1, self._row_bytes))
        for start in range(0, len(self), step):
            yield self.read(slice(start, start + step))

    def to_numpy(self) -> np.ndarray:
        """Every row in memory (for small arrays such as labels)."""
        return self.read(slice(None))

    def to_device(self, device: torch.device) -> torch.Tensor:
        """Every row as one tensor on ``device``, copied a chunk at a time (host memory stays bounded)."""
        out = torch.empty(self.shape, dtype=self.torch_dtype, device=device)
        start = 0
        for chunk in self.chunks():
            out[start : start + len(chunk)].copy_(torch.from_numpy(chunk))
            start += len(chunk)
        return out

    def min(self):
        return min(c.min() for c in self.chunks())

    def max(self):
        return max(c.max() for c in self.chunks())

    def identity(self) -> str:
        """A content hash: the file's sha256, where the array sits in it, the view's rows and conversion."""
        h = hashlib.sha256(b"mapped-rows/1;")
        h.update(self.file.sha256().encode())
        h.update(
            f"{self.offset};{self.raw.dtype.str};{list(self.raw.shape)};{self.dtype.str};{self.divisor};".encode()
        )
        if self.rows is None:
            h.update(b"all")
        else:
            h.update(np.ascontiguousarray(self.rows, dtype="<i8").tobytes())
        return h.hexdigest()


def is_mapped(a) -> bool:
    return isinstance(a, MappedRows)


# --------------------------------------------------------------------------- safetensors


def open_safetensors(path: Path, release_bytes: int = RELEASE_BYTES) -> dict[str, MappedRows]:
    """Map ``path`` and return its arrays as ``MappedRows``; raises ``ValueError`` for a malformed file."""
    file = MappedFile(path, release_bytes)
    if file.size < 8:
        raise ValueError("file too short for a safetensors header")
    n = int.from_bytes(file.mm[:8], "little")
    if 8 + n > file.size:
        raise ValueError(f"header of {n} bytes does not fit a {file.size}-byte file")
    try:
        header = json.loads(bytes(file.mm[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")  # noqa: TRY004 - a malformed file, reported as such
    base = 8 + n
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name!r}: malformed header entry") from None
        if dtype_name not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype_name} has no numpy equivalent")
        dtype = np.dtype(_DTYPES[dtype_name])
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape}")
        count = math.prod(shape)
        if not (0 <= begin <= end <= file.size - base) or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: data offsets {begin}..{end} do not fit its shape or the file")
        raw = np.frombuffer(file.mm, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        arrays[name] = MappedRows(file, raw, name=name, offset=base + begin)
    return arrays


def write_safetensors_header(f, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Write the header of a one-tensor safetensors file to ``f``; the caller writes the bytes after it.

    Returns the number of data bytes expected. The header is padded with spaces to
    a multiple of 8 bytes, as the safetensors writer does.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header = json.dumps(
        {name: {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [0, nbytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    f.write(len(header).to_bytes(8, "little"))
    f.write(header)
    return nbytes
