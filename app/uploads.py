"""Streaming multipart upload: the body goes chunk by chunk to a temporary file, hashed on the way, and stops
at the size cap. Nothing is held whole in memory, and a slow body is cut off after the upload timeout."""

import asyncio
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from app.errors import ProblemError, invalid

MAX_FIELD_BYTES = 1024


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)


class _PartCollector:
    """python-multipart callbacks: the `file` part to disk, small text fields to memory."""

    def __init__(self, tmp_dir: Path, max_bytes: int):
        self.tmp_dir, self.max_bytes = tmp_dir, max_bytes
        self.fields: dict[str, str] = {}
        self.file_path: Path | None = None
        self.filename = ""
        self.size = 0
        self.hash = hashlib.sha256()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._out = None
        self._field_buf = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_cb,
            "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }  # fmt: skip

    def _part_begin(self):
        self._headers, self._name, self._field_buf = {}, "", bytearray()

    def _header_field_cb(self, data, start, end):
        self._header_field += data[start:end]

    def _header_value_cb(self, data, start, end):
        self._header_value += data[start:end]

    def _header_end(self):
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self.file_path is not None:
                raise ProblemError(422, "Send exactly one `file` part.", code="invalid_request")
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")
            self.file_path, self._out = Path(tmp), os.fdopen(fd, "wb")

    def _part_data(self, data, start, end):
        chunk = data[start:end]
        if self._name == "file":
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise ProblemError(413, f"Upload exceeds the {self.max_bytes}-byte limit.", code="upload_too_large")
            self.hash.update(chunk)
            self._out.write(chunk)
        else:
            self._field_buf += chunk
            if len(self._field_buf) > MAX_FIELD_BYTES:
                raise invalid(["body", self._name], "form field too long")

    def _part_end(self):
        if self._name == "file" and self._out is not None:
            self._out.close()
            self._out = None
        elif self._name:
            self.fields[self._name] = self._field_buf.decode("utf-8", "replace")

    def cleanup(self):
        if self._out is not None:
            self._out.close()
        if self.file_path is not None:
            self.file_path.unlink(missing_ok=True)


async def receive_upload(request: Request, *, tmp_dir: Path, max_bytes: int, timeout_s: float) -> ReceivedUpload:
    """Parse the multipart body as it arrives. The caller deletes `path` when done with it."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise invalid(["header", "content-type"], "expected multipart/form-data with a boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise ProblemError(413, f"Upload exceeds the {max_bytes}-byte limit.", code="upload_too_large")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    collector = _PartCollector(tmp_dir, max_bytes)
    parser = MultipartParser(options[b"boundary"], collector.callbacks())
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                parser.write(chunk)
        parser.finalize()
    except TimeoutError:
        collector.cleanup()
        raise ProblemError(408, f"Upload did not complete within {timeout_s:.0f} s.", code="upload_timeout") from None
    except ProblemError:
        collector.cleanup()
        raise
    except Exception as e:
        collector.cleanup()
        raise invalid(["body"], f"malformed multipart body: {e}") from None
    if collector.file_path is None:
        raise invalid(["body", "file"], "a `file` part is required")
    return ReceivedUpload(collector.file_path, collector.filename, collector.size, collector.hash.hexdigest(),
                          collector.fields)  # fmt: skip
