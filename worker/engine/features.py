"""Intermediate outputs of a model, captured with forward hooks ("taps").

Methods that distil intermediate knowledge (FitNets, attention transfer, RKD,
self-distillation) name the module outputs they need by their module path
(``model.named_modules()`` names, e.g. ``net.2``, ``layer1``, ``blocks.0``) or by the
alias ``embedding``: the input of the classifier head, i.e. the penultimate
embedding ``[B, D]`` that every ``Classifier`` computes in ``forward_features``.
The trainer attaches one ``FeatureTap`` per model and hands the captured tensors
to the loss in ``StepBatch``; it never needs to know which method asked for them.

Layout: captured 3-D tensors are always ``[B, C, L]`` (channels first). Models whose
3-D activations are ``[B, L, C]`` (the transformer) set
``sequence_channels_last = True`` and their captures are transposed.
"""

from __future__ import annotations

import math
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EngineError

EMBEDDING = "embedding"  # alias: the input of the model's classifier head
_LISTED_PATHS = 80  # how many valid module paths an error message lists


def module_paths(model: nn.Module) -> list[str]:
    """Every tappable name of ``model``: the ``embedding`` alias, then its submodule paths."""
    return [EMBEDDING] + [name for name, _ in model.named_modules() if name]


def check_path(model: nn.Module, path: str, *, who: str, param: str) -> None:
    """Raise ``invalid_spec`` naming ``path`` and listing the valid ones if ``model`` has no such module."""
    if path == EMBEDDING and isinstance(getattr(model, "head", None), nn.Module):
        return
    if path and path != EMBEDDING and path in dict(model.named_modules()):
        return
    valid = module_paths(model)
    shown = ", ".join(valid[:_LISTED_PATHS]) + (
        f", … ({len(valid)} in all)" if len(valid) > _LISTED_PATHS else ""
    )
    raise EngineError(
        "invalid_spec", f"{who} has no module {path!r}; valid module paths: {shown}", param=param
    )


class FeatureTap:
    """Forward hooks on the named modules of ``model``; ``take()`` returns what the last forward produced.

    Use as a context manager (or call ``close()``) so the hooks never outlive the
    training run: an exported model must not carry them.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = list(dict.fromkeys(names))
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        self._channels_last = bool(getattr(model, "sequence_channels_last", False))
        modules = dict(model.named_modules())
        for name in self.names:
            if name == EMBEDDING:
                handle = model.head.register_forward_pre_hook(self._pre_hook(name))
            else:
                handle = modules[name].register_forward_hook(self._hook(name))
            self._handles.append(handle)

    def _store(self, name: str, value) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0]
        if self._channels_last and value.dim() == 3:
            value = value.transpose(1, 2)
        self._outputs[name] = value

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._store(name, output)

        return hook

    def _pre_hook(self, name: str):
        def hook(_module, inputs):
            self._store(name, inputs[0])

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The captured outputs as float32 (the loss runs in fp32), and forget them."""
        out = {name: self._outputs[name].float() for name in self.names if name in self._outputs}
        self._outputs = {}
        return out

    def clear(self) -> None:
        """Forget captured outputs (e.g. the validation pass's) without converting them."""
        self._outputs = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.inference_mode()
def predict_with_features(
    model: nn.Module,
    x: torch.Tensor,
    names: list[str],
    device: torch.device,
    *,
    batch_size: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (fp32) and the named intermediate outputs (as ``dtype``) for all rows, in eval mode."""
    was_training = model.training
    model.eval()
    logits, feats = [], {name: [] for name in names}
    with FeatureTap(model, names) as tap:
        for i in range(0, len(x), batch_size):
            logits.append(model(x[i : i + batch_size].to(device, non_blocking=True)).float())
            for name, value in tap.take().items():
                feats[name].append(value.to(dtype))
    model.train(was_training)
    return torch.cat(logits), {name: torch.cat(v) for name, v in feats.items()}


def feature_shapes(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the named outputs, from one forward of a small probe batch."""
    _, feats = predict_with_features(model, x[:2], names, x.device)
    return {name: tuple(v.shape[1:]) for name, v in feats.items()}


def feature_bytes(shapes: dict[str, tuple[int, ...]], rows: int, dtype: torch.dtype = torch.float16) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return rows * item * sum(math.prod(s) for s in shapes.values())


# --------------------------------------------------------------------------- shape alignment


def global_pool(f: torch.Tensor) -> torch.Tensor:
    """``[B, C, *spatial]`` → ``[B, C]`` by averaging over the spatial dimensions."""
    return f if f.dim() == 2 else f.flatten(2).mean(-1)


def adaptive_pool(f: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Average-pool the spatial dimensions of ``[B, C, *spatial]`` to ``size`` (no-op when equal)."""
    if tuple(f.shape[2:]) == tuple(size):
        return f
    if f.dim() == 3:
        return F.adaptive_avg_pool1d(f, size)
    if f.dim() == 4:
        return F.adaptive_avg_pool2d(f, size)
    raise ValueError(f"cannot pool a {f.dim()}-D feature")


def aligned_shapes(s: tuple[int, ...], t: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sample shapes of a (student, teacher) feature pair after ``align`` (channels first)."""
    if len(s) == len(t) and len(s) >= 2:
        spatial = tuple(min(a, b) for a, b in zip(s[1:], t[1:]))
        return (s[0], *spatial), (t[0], *spatial)
    return (s[0],), (t[0],)


def align(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring a student and a teacher feature to the same spatial size.

    Same rank (``[B, C, L]`` or ``[B, C, H, W]``): the larger map is adaptively
    average-pooled down to the smaller one, per dimension. Different ranks (e.g. a
    conv map against an MLP's hidden vector): the one(s) with spatial dimensions are
    globally average-pooled to ``[B, C]``. Channel counts are left alone.
    """
    if fs.dim() == ft.dim() and fs.dim() >= 3:
        size = tuple(min(a, b) for a, b in zip(fs.shape[2:], ft.shape[2:]))
        return adaptive_pool(fs, size), adaptive_pool(ft, size)
    return global_pool(fs), global_pool(ft)
