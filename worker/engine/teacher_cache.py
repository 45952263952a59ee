"""Teacher outputs computed once per run and, with a cache folder, once per (teacher, data).

A frozen teacher on unaugmented inputs gives the same logits every epoch, so the
loop reads them from here instead of running the teacher per step; a KD epoch
then costs about what a student-only epoch costs. Train logits are kept as fp16
(half the memory; logits need no more precision for a softened KL); validation
logits stay fp32 because they feed the reported teacher accuracy and agreement.

On-disk entries are keyed by sha256(teacher weights sha256, architecture, class
count, data identity, dtype), stored as safetensors, and written atomically.

Train logits of data larger than memory: on a CPU run, logits bigger than
``LOGITS_MEMORY_LIMIT`` are never held whole. They are computed a batch at a
time, written to a safetensors file (the cache entry when there is a key and a
cache folder, else an anonymous file in ``spill_dir``, unlinked once mapped) and
read back through a memory map like mapped data (``mapped.MappedRows``). On an
accelerator they live in device memory whatever their size.

Methods that also need the teachers' intermediate outputs (``teacher_taps``) get
them from ``teacher_outputs``: logits and tapped features together, fp16, in
memory only, when they fit the runner's budget (``features.feature_bytes``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import EngineError
from .features import predict_with_features
from .mapped import MappedRows, open_safetensors, write_safetensors_header

CACHE_VERSION = "teacher-logits/1"
_FP16_MAX = 65504.0
# On CPU, train logits above this size are streamed to disk and memory-mapped rather than held in memory.
LOGITS_MEMORY_LIMIT = 256 * 1024**2
_BATCH = 1024


def cache_key(
    teacher_sha256: str, architecture: dict, num_classes: int, data_identity: str, dtype: torch.dtype
) -> str:
    blob = json.dumps(
        [CACHE_VERSION, teacher_sha256, architecture, num_classes, data_identity, str(dtype)], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def teacher_logits(
    teacher: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    *,
    who: str,
    dtype: torch.dtype,
    cache_dir: Path | None = None,
    key: str | None = None,
    spill_dir: Path | None = None,
) -> tuple[torch.Tensor | MappedRows, bool]:
    """Logits of ``teacher`` on every row of ``x`` as ``dtype``; returns (logits, cache_hit).

    The logits are a tensor on ``device``; or, given ``spill_dir`` (the caller accepts
    mapped logits) on CPU when they exceed ``LOGITS_MEMORY_LIMIT``, ``MappedRows`` over
    the cache entry (with a key and ``cache_dir``) or over an unlinked file in ``spill_dir``.
    """
    path = (
        Path(cache_dir) / "teacher_logits" / f"{key}.safetensors" if cache_dir is not None and key else None
    )
    shape = (len(x), teacher.num_classes)
    large = (
        spill_dir is not None
        and device.type == "cpu"
        and shape[0] * shape[1] * dtype.itemsize > LOGITS_MEMORY_LIMIT
    )
    if path is not None and path.is_file():
        cached = _read(path, mapped=large)
        if cached is not None and tuple(cached.shape) == shape and _dtype(cached) == dtype:
            if isinstance(cached, MappedRows) and not large:
                cached = cached.to_device(device)
            return (cached if large else cached.to(device)), True
    if large:
        return _stream_to_file(
            teacher, x, device, who=who, dtype=dtype, path=path, spill_dir=spill_dir
        ), False
    # Filled a batch at a time: memory is the result plus one batch, never an fp32 copy of everything.
    logits = torch.empty(shape, dtype=dtype, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)  # one host sync at the end, not per batch
    for start, batch in _batches(teacher, x, device):
        finite &= torch.isfinite(batch).all()
        logits[start : start + len(batch)] = _narrow(batch, dtype)
    if not finite:
        raise _non_finite(who)
    if path is not None:
        _write(path, logits)
    return logits, False


def _batches(teacher: nn.Module, x, device: torch.device):
    """(first row, fp32 logits) per batch of ``x``, in eval mode (the previous mode restored at the end)."""
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, len(x), _BATCH):
            with torch.inference_mode():
                batch = teacher(x[start : start + _BATCH].to(device, non_blocking=True)).float()
            yield start, batch
    finally:
        teacher.train(was_training)


def _narrow(batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits as the cache's dtype; fp16 is clamped to its range first (no inf from large logits)."""
    if dtype == torch.float16:
        batch = batch.clamp(-_FP16_MAX, _FP16_MAX)
    return batch.to(dtype)


def teacher_outputs(
    teacher: nn.Module, x: torch.Tensor, taps: list[str], device: torch.device, *, who: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the tapped intermediate outputs of ``teacher`` on every row, both fp16 on ``device``."""
    logits, feats = predict_with_features(teacher, x, taps, device, dtype=torch.float32)
    if not torch.isfinite(logits).all() or not all(torch.isfinite(f).all() for f in feats.values()):
        raise EngineError(
            "non_finite_loss",
            f"{who} produced NaN or infinite outputs on the data; check the inputs for inf/NaN values",
            param="train_file",
        )

    def half(t: torch.Tensor) -> torch.Tensor:
        return t.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)

    return half(logits), {name: half(f) for name, f in feats.items()}


def _non_finite(who: str) -> EngineError:
    return EngineError(
        "non_finite_loss",
        f"{who} produced NaN or infinite logits on the data; check the inputs for inf/NaN values",
        param="train_file",
    )


def _stream_to_file(
    teacher: nn.Module,
    x,
    device: torch.device,
    *,
    who: str,
    dtype: torch.dtype,
    path: Path | None,
    spill_dir: Path | None,
) -> MappedRows:
    """Logits a batch at a time into a safetensors file, then mapped: memory stays at one batch.

    With ``path`` (a cache entry) the file is written atomically and kept; without, it
    is a temp file in ``spill_dir`` that is unlinked as soon as it is mapped (the map
    keeps its pages reachable until the run drops it).
    """
    folder = path.parent if path is not None else Path(spill_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=(path.name if path is not None else "teacher-logits"),
                               suffix=".tmp")  # fmt: skip
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    try:
        with os.fdopen(fd, "wb") as f:
            expected = write_safetensors_header(f, "logits", np_dtype, (len(x), teacher.num_classes))
            written = 0
            for _, batch in _batches(teacher, x, device):
                if not torch.isfinite(batch).all():
                    raise _non_finite(who)
                data = _narrow(batch, dtype).cpu().contiguous().numpy()
                f.write(data.data)
                written += data.nbytes
            if written != expected:
                raise RuntimeError(f"wrote {written} bytes of logits, expected {expected}")
            f.flush()
            os.fsync(f.fileno())
        if path is not None:
            os.replace(tmp, path)
            return open_safetensors(path)["logits"]
        mapped = open_safetensors(Path(tmp))["logits"]
        Path(tmp).unlink()
        return mapped
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dtype(t) -> torch.dtype:
    return t.torch_dtype if isinstance(t, MappedRows) else t.dtype


def _read(path: Path, mapped: bool = False) -> torch.Tensor | MappedRows | None:
    """A cache entry: loaded whole, or (large ones) mapped. None when it cannot be read."""
    try:
        if mapped or path.stat().st_size > LOGITS_MEMORY_LIMIT:
            return open_safetensors(path)["logits"]
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")["logits"]
    except Exception:  # noqa: BLE001 - a damaged entry is recomputed and overwritten
        return None


def _write(path: Path, logits: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"logits": logits.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
