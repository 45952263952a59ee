"""Distillation methods: one registered loss module per ``method.type``.

The trainer knows no method by name. It asks the registry for the class named by
``method.type``, builds it from its typed ``Config``, lets it wrap the student
(optional), and on every step hands it a ``StepBatch`` and receives
``(total_loss, {term: tensor})``. Adding a method (dkd, multi_teacher, feature,
...) means registering one more class here, nothing else.

Class attributes tell the trainer what the method needs:

- ``uses_teachers``: teachers are loaded, evaluated and passed in.
- ``min_teachers`` / ``max_teachers``: how many teachers the spec may name.
- ``teacher_input``: which data array the teachers read (``x`` or ``x_teacher``).
- ``cacheable``: the loss only needs teacher *logits* on the unaugmented rows, so
  they can be computed once per run instead of every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import parse_config, require
from .errors import EngineError
from .registry import Registry

METHODS: Registry[type[DistillationLoss]] = Registry("method type", "invalid_spec", "method.type")


@dataclass
class StepBatch:
    """Everything a loss may look at for one optimizer step."""

    student_logits: torch.Tensor  # [B, K] float32, carries grad
    targets: torch.Tensor | None  # [B] int64 class ids; None if the data has no labels
    teacher_logits: list[torch.Tensor] = field(
        default_factory=list
    )  # one [B, K] float32 per teacher, no grad
    teacher_weights: list[float] = field(default_factory=list)  # the spec's per-teacher weights
    x: torch.Tensor | None = None  # the student's input batch
    epoch: int = 0  # 0-based epoch, for warm-up schedules


class DistillationLoss(nn.Module):
    """Base class. Subclasses set ``Config`` and implement ``forward``."""

    Config: ClassVar[type]
    uses_teachers: ClassVar[bool] = True
    min_teachers: ClassVar[int] = 1
    max_teachers: ClassVar[int | None] = None
    teacher_input: ClassVar[str] = "x"
    cacheable: ClassVar[bool] = True

    def __init__(self, config, num_classes: int, num_teachers: int):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.num_teachers = num_teachers

    @property
    def requires_labels(self) -> bool:
        return True

    def wrap_student(self, student: nn.Module) -> nn.Module:
        """Hook for methods that change the student (fake quantisation, auxiliary heads)."""
        return student

    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def parse_method(method: dict, num_classes: int, num_teachers: int) -> DistillationLoss:
    """Build the loss module named by ``method["type"]`` from the spec."""
    if not isinstance(method, dict):
        raise EngineError("invalid_spec", "method must be an object with a 'type'", param="method")
    params = dict(method)
    cls = METHODS.get(params.pop("type", None))
    config = parse_config(cls.Config, params, code="invalid_spec", prefix="method")
    if cls.uses_teachers:
        if num_teachers < cls.min_teachers:
            raise EngineError(
                "invalid_spec",
                f"method {method['type']!r} needs at least {cls.min_teachers} teacher(s), the spec has {num_teachers}",
                param="teachers",
            )
        if cls.max_teachers is not None and num_teachers > cls.max_teachers:
            raise EngineError(
                "invalid_spec",
                f"method {method['type']!r} takes at most {cls.max_teachers} teacher(s), the spec has {num_teachers}"
                + ("; use multi_teacher for ensembles" if cls.max_teachers == 1 else ""),
                param="teachers",
            )
    return cls(config, num_classes=num_classes, num_teachers=num_teachers if cls.uses_teachers else 0)


def method_names() -> list[str]:
    return METHODS.names()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) at temperature T, averaged over the batch (no T^2 factor)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


# --------------------------------------------------------------------------- supervised


@dataclass
class SupervisedConfig:
    """``supervised`` takes no parameters."""


@METHODS.register("supervised")
class SupervisedLoss(DistillationLoss):
    """Cross-entropy with the labels; no teacher. The from-scratch baseline every KD
    result is compared with (maximum-likelihood training; Goodfellow, Bengio &
    Courville 2016, "Deep Learning", ch. 6).

    L = CE(z_s, y) = −log softmax(z_s)_y, averaged over the batch.
    """

    Config = SupervisedConfig
    uses_teachers = False
    min_teachers = 0

    def forward(self, batch: StepBatch):
        ce = F.cross_entropy(batch.student_logits, batch.targets)
        return ce, {"ce": ce}


# --------------------------------------------------------------------------- kd


@dataclass
class KDConfig:
    temperature: float = 4.0  # T > 0 softens both distributions; higher shows more "dark knowledge"
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to label CE

    def __post_init__(self):
        require(
            math.isfinite(self.temperature) and self.temperature > 0,
            "invalid_spec",
            f"temperature must be a positive number, got {self.temperature}",
            "temperature",
        )
        require(
            0.0 <= self.alpha <= 1.0, "invalid_spec", f"alpha must be in [0, 1], got {self.alpha}", "alpha"
        )


@METHODS.register("kd")
class KDLoss(DistillationLoss):
    """Vanilla knowledge distillation, Hinton, Vinyals & Dean 2015, "Distilling the
    Knowledge in a Neural Network" (arXiv:1503.02531).

    L = (1 − α)·CE(z_s, y) + α·T²·KL(p_t ‖ p_s),  p = softmax(z / T).

    The T² factor keeps the soft-target gradients on the same scale as the hard
    ones when T changes (the soft gradients shrink as 1/T²). Reported terms are the
    unweighted ``ce`` and ``kl`` (KL at temperature T, before T²).
    """

    Config = KDConfig
    max_teachers = 1

    @property
    def requires_labels(self) -> bool:
        return self.config.alpha < 1.0

    def forward(self, batch: StepBatch):
        t, alpha = self.config.temperature, self.config.alpha
        kl = kd_kl(batch.student_logits, batch.teacher_logits[0], t)
        total = alpha * t * t * kl
        terms = {"kl": kl}
        if alpha < 1.0:
            ce = F.cross_entropy(batch.student_logits, batch.targets)
            total = total + (1.0 - alpha) * ce
            terms["ce"] = ce
        return total, terms
