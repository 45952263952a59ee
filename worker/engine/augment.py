"""Input augmentation for consistent teaching ("function matching").

Beyer, Zhai, Royer, Markeeva, Anil & Kolesnikov 2022, "Knowledge distillation: A good
teacher is patient and consistent" (CVPR 2022, arXiv:2106.05237): the teacher must
score exactly the augmented input the student sees; aggressive mixing (mixup) then
turns every step into fresh points of the teacher's function to match.

``spec.augmentation`` is ``"none"``, one name, or a list of names or objects applied in
order (e.g. ``["shift", {"type": "mixup", "alpha": 1.0}]``). Each registered
augmentation maps a batch ``(x, labels)`` to ``(x', labels')`` with a caller-owned
generator, so a run (and a resumed epoch) draws the same numbers every time. Mixing
augmentations turn class ids into label distributions ``[B, K]``; every loss accepts
those (``F.cross_entropy`` takes probabilities, ``distill_loss`` too).

Teacher outputs under augmentation (``spec.teacher_outputs``):
``fresh`` — the teachers run on every augmented batch; ``pool`` — ``pool_size`` augmented
views of the training rows are made once, with their teacher outputs, and epoch e trains
on view e mod K (``build_pool``); ``cached`` — static inputs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import parse_config, require
from .errors import EngineError
from .registry import Registry

AUGMENTATIONS: Registry[type[Augmentation]] = Registry("augmentation type", "invalid_spec", "augmentation")
TEACHER_OUTPUTS = ("cached", "fresh", "pool")
_SPEC = "invalid_spec"


class Augmentation:
    """Base class: a typed ``Config`` and ``__call__(x, labels, generator)``."""

    name: ClassVar[str]  # the spec's ``type``
    Config: ClassVar[type]
    mixes_labels: ClassVar[bool] = False  # True: labels come back as distributions [B, K]
    float_only: ClassVar[bool] = True  # token ids cannot be blended or noised
    min_dims: ClassVar[int] = 1  # per-sample dims needed (1 vectors/sequences, 3 images)

    def __init__(self, config, param: str):
        self.config = config
        self.param = param

    def check_input(self, sample_shape: tuple[int, ...], floating: bool) -> None:
        name = type(self).name
        require(
            floating or not self.float_only,
            _SPEC,
            f"augmentation {name!r} needs float inputs; this data holds token ids",
            self.param,
        )
        require(
            len(sample_shape) >= self.min_dims,
            _SPEC,
            f"augmentation {name!r} needs samples with at least {self.min_dims} dimension(s), "
            f"got shape {list(sample_shape)}",
            self.param,
        )

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator):
        raise NotImplementedError


def _beta(alpha: float, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """n draws of Beta(α, α) from two Gamma draws (torch's Beta takes no generator)."""
    conc = torch.full((2, n), alpha, device=device)
    g = torch._standard_gamma(conc, generator=generator)
    return g[0] / (g[0] + g[1])


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return labels if labels.dim() == 2 else F.one_hot(labels, num_classes).float()


@dataclass
class MixConfig:
    alpha: float = 1.0  # the mixing weight λ ~ Beta(alpha, alpha)

    def __post_init__(self):
        require(
            math.isfinite(self.alpha) and 0 < self.alpha <= 100,
            _SPEC,
            f"alpha must be in (0, 100], got {self.alpha}",
            "alpha",
        )


@AUGMENTATIONS.register("mixup")
class Mixup(Augmentation):
    """mixup, Zhang, Cisse, Dauphin & Lopez-Paz 2018 (ICLR, arXiv:1710.09412):
    x' = λ·x_i + (1 − λ)·x_π(i), y' = λ·y_i + (1 − λ)·y_π(i), λ ~ Beta(α, α) per row,
    π a random permutation of the batch."""

    name = "mixup"
    Config = MixConfig
    mixes_labels = True
    num_classes: int = 0

    def __call__(self, x, labels, generator):
        n = len(x)
        lam = _beta(self.config.alpha, n, generator, x.device)
        perm = torch.randperm(n, generator=generator, device=x.device)
        shape = (n,) + (1,) * (x.dim() - 1)
        mixed = torch.lerp(x[perm], x, lam.view(shape).to(x.dtype))
        if labels is None:
            return mixed, None
        y = _one_hot(labels, self.num_classes)
        return mixed, torch.lerp(y[perm], y, lam[:, None])


@AUGMENTATIONS.register("cutmix")
class CutMix(Augmentation):
    """CutMix, Yun, Han, Oh, Chun, Choe & Yoo 2019 (ICCV, arXiv:1905.04899): a box of
    x_π(i) pasted into x_i, labels mixed by the pasted area; λ ~ Beta(α, α) sets the
    kept fraction. Images [C, H, W] get a rectangle, sequences [L] or [C, L] a segment
    (one box per batch, as in the paper)."""

    name = "cutmix"
    Config = MixConfig
    mixes_labels = True
    num_classes: int = 0

    def __call__(self, x, labels, generator):
        n = len(x)
        lam = float(_beta(self.config.alpha, 1, generator, x.device)[0])
        perm = torch.randperm(n, generator=generator, device=x.device)
        spatial = x.shape[2:] if x.dim() == 4 else x.shape[-1:]
        cut = math.sqrt(1.0 - lam) if len(spatial) == 2 else 1.0 - lam
        box = []
        for size in spatial:
            width = round(size * cut)
            centre = int(torch.randint(size, (1,), generator=generator, device=x.device))
            box.append((max(centre - width // 2, 0), min(centre - width // 2 + width, size)))
        out = x.clone()
        index = (..., *[slice(a, b) for a, b in box])
        out[index] = x[perm][index]
        kept = 1.0 - math.prod(b - a for a, b in box) / math.prod(spatial)
        if labels is None:
            return out, None
        y = _one_hot(labels, self.num_classes)
        return out, kept * y + (1.0 - kept) * y[perm]


@dataclass
class NoiseConfig:
    std: float = 0.1  # Gaussian noise, as a fraction of the training inputs' standard deviation

    def __post_init__(self):
        require(
            math.isfinite(self.std) and 0 < self.std <= 10,
            _SPEC,
            f"std must be in (0, 10], got {self.std}",
            "std",
        )


@AUGMENTATIONS.register("noise")
class Noise(Augmentation):
    """Additive Gaussian noise: x' = x + ε, ε ~ N(0, (std·σ_x)²), σ_x the training inputs' std."""

    name = "noise"
    Config = NoiseConfig
    scale: float = 1.0  # σ_x, set from the data by ``parse_augmentation``

    def __call__(self, x, labels, generator):
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + eps * (self.config.std * self.scale), labels


@dataclass
class ShiftConfig:
    max_shift: int = 4  # a random shift in [-max_shift, max_shift] positions along each spatial axis

    def __post_init__(self):
        require(
            1 <= self.max_shift <= 1024,
            _SPEC,
            f"max_shift must be in [1, 1024], got {self.max_shift}",
            "max_shift",
        )


@AUGMENTATIONS.register("shift")
class Shift(Augmentation):
    """Translation by a random whole number of positions per row (zeros shifted in):
    sequences along their length, images along height and width."""

    name = "shift"
    Config = ShiftConfig
    float_only = False

    def __call__(self, x, labels, generator):
        m = self.config.max_shift
        axes = (-2, -1) if x.dim() == 4 else (-1,)
        out = x
        for axis in axes:
            size = x.shape[axis]
            shift = torch.randint(-m, m + 1, (len(x),), generator=generator, device=x.device)
            src = torch.arange(size, device=x.device)[None, :] - shift[:, None]  # [B, size]
            valid = (src >= 0) & (src < size)
            shape = [len(x)] + [1] * (x.dim() - 1)
            shape[axis] = size
            index = src.clamp(0, size - 1).view(shape).expand_as(out)
            out = torch.gather(out, axis, index) * valid.view(shape).to(out.dtype)
        return out, labels


class Pipeline:
    """The spec's augmentations, applied in order."""

    def __init__(self, steps: list[Augmentation]):
        self.steps = steps

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def mixes_labels(self) -> bool:
        return any(s.mixes_labels for s in self.steps)

    def __call__(self, x, labels, generator):
        for step in self.steps:
            x, labels = step(x, labels, generator)
        return x, labels

    def describe(self) -> list[dict]:
        return [{"type": type(s).name, **vars(s.config)} for s in self.steps]


def parse_augmentation(raw, *, sample_shape, floating: bool, num_classes: int, input_std: float) -> Pipeline:
    """``spec.augmentation`` as a ``Pipeline`` (empty for ``"none"`` / null), checked against the data."""
    if raw is None or raw == "none":
        return Pipeline([])
    items = raw if isinstance(raw, list) else [raw]
    require(len(items) <= 8, _SPEC, f"augmentation lists at most 8 steps, got {len(items)}", "augmentation")
    steps = []
    for i, item in enumerate(items):
        param = "augmentation" if not isinstance(raw, list) else f"augmentation[{i}]"
        if isinstance(item, str):
            item = {"type": item}
        if not isinstance(item, dict):
            raise EngineError(_SPEC, f"{param} must be a name or an object with a 'type'", param=param)
        params = dict(item)
        cls = AUGMENTATIONS.get(params.pop("type", None))
        step = cls(parse_config(cls.Config, params, code=_SPEC, prefix=param), param)
        step.check_input(tuple(sample_shape), floating)
        if isinstance(step, Noise):
            step.scale = input_std
        if cls.mixes_labels:
            step.num_classes = num_classes
        steps.append(step)
    return Pipeline(steps)


def epoch_generator(seed: int, epoch: int, device: torch.device, salt: int = 0) -> torch.Generator:
    """A generator for one epoch's augmentation draws: the same numbers on every attempt."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch) * 7919 + salt + 1)
    return g


POOL_BYTES = 2 << 30  # a pool's views (inputs, labels, teacher logits) must fit in this many bytes


def pool_bytes(n: int, sample_bytes: int, num_classes: int, num_teachers: int, size: int) -> int:
    """Bytes of a pool of ``size`` views: inputs, label distributions (float32), fp16 logits."""
    return size * n * (sample_bytes + 4 * num_classes + 2 * num_classes * num_teachers)


@torch.no_grad()  # not inference_mode: the views are training inputs, saved for backward
def pool_views(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    teachers: list,
    teacher_dtypes: list[torch.dtype],
    augmentation: Pipeline,
    *,
    size: int,
    seed: int,
    device: torch.device,
    batch_size: int,
    autocast_context,
) -> list[tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]]:
    """``size`` augmented copies of the rows, each with the teachers' logits on exactly those inputs.

    View k is drawn with its own seeded generator, over a seeded shuffle of the rows (so
    mixing partners differ between views), batch by batch as in training. Returns per
    view ``(inputs, labels, [fp16 logits per teacher])``, on ``x``'s device. Deterministic
    for a given seed.
    """
    views = []
    n = len(x)
    for k in range(size):
        generator = epoch_generator(seed, k, device, salt=104729)
        order = torch.randperm(n, generator=generator, device=device).to(x.device)
        xs, ys, logits = [], [], [[] for _ in teachers]
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = x[idx].to(device)
            yb = labels[idx].to(device) if labels is not None else None
            xb, yb = augmentation(xb, yb, generator)
            with autocast_context():
                for out, teacher, dtype in zip(logits, teachers, teacher_dtypes):
                    out.append(teacher(xb.to(dtype)).half().to(x.device))
            xs.append(xb.to(x.device))
            if yb is not None:
                ys.append(yb.to(x.device))
        views.append((torch.cat(xs), torch.cat(ys) if ys else None, [torch.cat(o) for o in logits]))
    return views
