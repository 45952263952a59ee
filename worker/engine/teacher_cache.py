"""Teacher outputs computed once per run and, with a cache folder, once per (teacher, data).

A frozen teacher on unaugmented inputs gives the same logits every epoch, so the
loop reads them from here instead of running the teacher per step; a KD epoch
then costs about what a student-only epoch costs. Train logits are kept as fp16
(half the memory; logits need no more precision for a softened KL); validation
logits stay fp32 because they feed the reported teacher accuracy and agreement.

On-disk entries are keyed by sha256(teacher weights sha256, architecture, class
count, data identity, dtype), stored as safetensors, and written atomically.

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
from .trainer import predict

CACHE_VERSION = "teacher-logits/1"
_FP16_MAX = 65504.0


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
) -> tuple[torch.Tensor, bool]:
    """Logits of ``teacher`` on every row of ``x`` as ``dtype`` on ``device``; returns (logits, cache_hit)."""
    path = (
        Path(cache_dir) / "teacher_logits" / f"{key}.safetensors" if cache_dir is not None and key else None
    )
    if path is not None and path.is_file():
        cached = _read(path)
        if cached is not None and cached.shape == (len(x), teacher.num_classes) and cached.dtype == dtype:
            return cached.to(device), True
    logits = predict(teacher, x, device)
    if not torch.isfinite(logits).all():
        raise EngineError(
            "non_finite_loss",
            f"{who} produced NaN or infinite logits on the data; check the inputs for inf/NaN values",
            param="train_file",
        )
    if dtype == torch.float16:
        logits = logits.clamp(-_FP16_MAX, _FP16_MAX)
    logits = logits.to(dtype)
    if path is not None:
        _write(path, logits)
    return logits, False


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


def _read(path: Path) -> torch.Tensor | None:
    from safetensors.torch import load_file

    try:
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
