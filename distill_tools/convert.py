"""`distill convert`: a PyTorch state-dict checkpoint (`.pt`/`.pth`) → safetensors, on the user's own machine.

The service never unpickles uploads, so a `.pt` file must become safetensors before it is uploaded. This runs
where the user's checkpoint already lives and is trusted: it reads it with `torch.load(weights_only=True)`
(tensors and plain containers only; anything else is refused, not executed), unwraps the usual training-script
wrappers, strips DataParallel/`torch.compile` prefixes and writes every tensor contiguous, each with its own
storage (safetensors refuses tensors that share memory, and the service expects every key present).

It lives outside `app/` (the API never imports torch) and imports torch inside `convert_checkpoint` only, so
`app.cli` can import it inside the `convert` command while the API and the rest of the CLI never load torch
(tests/test_layering.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["WRAPPER_KEYS", "ConversionError", "ConversionReport", "convert_checkpoint"]

# Where training scripts commonly keep the weights inside a saved dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
# Prefixes that wrappers add to every key: nn.DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why and what to do."""


@dataclass
class ConversionReport:
    output: Path
    tensors: int
    parameters: int  # elements over all tensors (buffers such as BatchNorm statistics included)
    sha256: str
    bytes: int
    unwrapped: list[str] = field(default_factory=list)  # the wrapper keys followed, outermost first
    stripped_prefix: str = ""
    ignored_keys: list[str] = field(default_factory=list)  # top-level entries beside the state dict


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "`distill convert` needs PyTorch on this machine to read a .pt checkpoint: pip install torch"
        ) from None
    return torch


def _load(torch, src: Path) -> Any:
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{src}: no such file") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, … for bad files
        text = str(e)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused is not None:
            raise ConversionError(
                f"{src.name} holds objects other than tensors and plain containers ({refused.group(1)}); "
                "they are not loaded, as unpickling them could run code. In your training code save only the "
                "weights: torch.save(model.state_dict(), 'model.pt')"
            ) from None
        # torch's weights_only errors put the cause after a long preamble; show the cause.
        cause = re.search(r"Unsupported[^\n]*", text)
        detail = cause.group(0) if cause else (text.strip().splitlines() or [""])[0]
        raise ConversionError(
            f"{src.name} is not a readable PyTorch checkpoint: {type(e).__name__}: {detail[:300]}"
        ) from None


def _is_state_dict(torch, obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _select(torch, obj: Any, key: str | None) -> tuple[dict, list[str], list[str]]:
    """The state dict inside `obj`: at `key` ("a/b" for nested dicts) or found through WRAPPER_KEYS."""
    path: list[str] = []
    ignored: list[str] = []
    if key is not None:
        for part in key.split("/"):
            if not isinstance(obj, dict) or part not in obj:
                have = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise ConversionError(
                    f"--key {key!r}: no entry {part!r} at {'/'.join(path) or 'the top'} (found: {have})"
                )
            ignored += [str(k) for k in obj if k != part] if not path else []
            obj = obj[part]
            path.append(part)
    else:
        while isinstance(obj, dict) and not _is_state_dict(torch, obj) and len(path) < 4:
            part = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if part is None:
                break
            if not path:
                ignored = [str(k) for k in obj if k != part]
            obj = obj[part]
            path.append(part)
    if not isinstance(obj, dict):
        where = f"at {'/'.join(path)!r}" if path else "in the file"
        raise ConversionError(
            f"expected a state dict (a dict of name → tensor) {where}, found {type(obj).__name__}"
        )
    if not obj:
        raise ConversionError("the state dict is empty: there are no tensors to convert")
    bad = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        k, v = bad
        hint = (
            f"; the top-level keys are {sorted(map(str, obj))[:20]}: choose the one holding the weights with --key"
            if not path and key is None
            else ""
        )
        raise ConversionError(
            f"entry {'/'.join([*path, str(k)])!r} is a {type(v).__name__}, not a tensor: only tensors can be "
            f"written to safetensors{hint}"
        )
    if not all(isinstance(k, str) for k in obj):
        raise ConversionError("state dict keys must be strings")
    return obj, path, ignored


def _strip_prefixes(state: dict) -> tuple[dict, str]:
    stripped = ""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped += prefix
                changed = True
    return state, stripped


def _own_storage(torch, state: dict) -> dict:
    """Contiguous CPU tensors, each with storage of its own (tied weights and views are copied)."""
    out, seen = {}, set()
    for name, t in state.items():
        if t.layout != torch.strided:
            raise ConversionError(
                f"tensor {name!r} is {t.layout}: only dense tensors can be written to safetensors"
            )
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        if (
            ptr in seen
            or not t.is_contiguous()
            or t.storage_offset()
            or t.untyped_storage().nbytes() != t.nbytes
        ):
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | None = None, *, key: str | None = None,
                       overwrite: bool = False) -> ConversionReport:  # fmt: skip
    """Read the state dict in `src` and write it to `dst` (default: `src` with a .safetensors suffix)."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.resolve() == src.resolve():
        raise ConversionError(f"the output {dst} would overwrite the checkpoint itself")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists; pass --force to overwrite it")
    torch = _import_torch()
    from safetensors.torch import save_file

    state, path, ignored = _select(torch, _load(torch, src), key)
    state, stripped = _strip_prefixes(state)
    if any(not k for k in state):
        raise ConversionError("a key is empty after stripping the wrapper prefix")
    tensors = _own_storage(torch, state)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "source": src.name})
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ConversionReport(
        output=dst, tensors=len(tensors), parameters=sum(t.numel() for t in tensors.values()),
        sha256=_sha256(dst), bytes=dst.stat().st_size, unwrapped=path, stripped_prefix=stripped,
        ignored_keys=ignored,
    )  # fmt: skip
