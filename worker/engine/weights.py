"""Weights in and out: safetensors only, strict key and shape matching."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from torch import nn

from .errors import EngineError

MODEL_FORMAT = "distill-model/1"


def load_weights_strict(model: nn.Module, path: Path, who: str, param: str | None = None) -> None:
    """Load a safetensors file into ``model``; every key and shape must match exactly.

    The error names the first offending key in the model's own order (then any
    extra key in the file), because "which tensor is wrong" is the one thing the
    user needs to fix an export script.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise EngineError(
            "weights_mismatch", f"{who}: cannot read the weights file as safetensors: {err}", param
        ) from None
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in tensors:
            raise EngineError(
                "weights_mismatch", f"{who}: key {key!r} is missing from the weights file", param
            )
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise EngineError(
                "weights_mismatch",
                f"{who}: key {key!r} has shape {list(got.shape)}, architecture expects {list(ref.shape)}",
                param,
            )
        if (
            got.dtype.is_floating_point != ref.dtype.is_floating_point
            and key.split(".")[-1] != "num_batches_tracked"
        ):
            raise EngineError(
                "weights_mismatch",
                f"{who}: key {key!r} has dtype {got.dtype}, architecture expects {ref.dtype}",
                param,
            )
    for key in tensors:
        if key not in expected:
            raise EngineError(
                "weights_mismatch",
                f"{who}: key {key!r} in the weights file is not part of the architecture",
                param,
            )
    # Cast (e.g. fp16/bf16 exports) to the model's dtypes; load_state_dict copies into place.
    cast = {k: tensors[k].to(expected[k].dtype) for k in expected}
    model.load_state_dict(cast, strict=True)


def freeze(model: nn.Module) -> nn.Module:
    """Teachers never train: no grads, eval-mode BN/dropout."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_model(model: nn.Module, path: Path, metadata: dict) -> None:
    """Write the state dict as safetensors; ``metadata`` values are stored as JSON strings."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    header = {"format": json.dumps(MODEL_FORMAT)}
    header.update({k: json.dumps(v) for k, v in metadata.items()})
    save_safetensors_atomic(tensors, Path(path), header)


def save_safetensors_atomic(tensors: dict, path: Path, header: dict[str, str]) -> None:
    """Write under a temporary name in the same folder, then rename: readers never see a partial file."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model_metadata(path: Path) -> dict:
    """Read the ``__metadata__`` of a job's ``model.safetensors`` (no tensors are loaded).

    Returns the decoded values: ``architecture``, ``input_shape``, ``num_classes``,
    ``job_id``, ``method``, ``val_accuracy`` (and ``format``). A later job uses this
    to build the architecture when it names the model as a teacher via ``from_job``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise EngineError("weights_mismatch", f"{path.name}: not a safetensors file ({err})") from None
    raw = header.get("__metadata__") or {}
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    for required in ("architecture", "input_shape", "num_classes"):
        if required not in out:
            raise EngineError(
                "weights_mismatch",
                f"{path.name}: metadata has no {required!r}; only models written by this service carry their architecture",
            )
    return out


def read_num_classes(path: Path) -> int | None:
    """A teacher's class count without building it: the metadata of a model this service
    wrote, else the first dimension of its ``head.weight`` (every architecture's final
    linear layer is named ``head``). None when neither is there."""
    from safetensors import safe_open

    try:
        return int(read_model_metadata(path)["num_classes"])
    except (EngineError, TypeError, ValueError, KeyError):
        pass
    try:
        with safe_open(str(path), framework="pt") as f:
            if "head.weight" in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                return int(f.get_slice("head.weight").get_shape()[0])
    except Exception:  # noqa: BLE001 - unreadable here means "unknown"; loading reports the real error
        return None
    return None
