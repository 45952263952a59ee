"""Distillation methods: one registered loss module per ``method.type``.

The trainer knows no method by name. It asks the registry for the class named by
``method.type``, builds it from its typed ``Config``, lets it wrap the student
(optional), and on every step hands it a ``StepBatch`` and receives
``(total_loss, {term: tensor})``. Adding a method means registering one more
class, nothing else. This module holds the registry, the base class and the
output-based methods (supervised, kd, dkd, multi_teacher, cross_modal,
teacher_assistant); ``methods_features.py`` (feature, attention, relation),
``self_distill.py`` and ``quantization.py`` register the rest.

Class attributes tell the runner what the method needs:

- ``uses_teachers``: the job's teachers are loaded, evaluated and passed in.
- ``min_teachers`` / ``max_teachers``: how many teachers the spec may name.
- ``teacher_input``: which data array the teachers read (``x`` or ``x_teacher``).
- ``cacheable``: the loss only needs teacher outputs (logits, tapped features) on
  the unaugmented rows, so they can be computed once per run instead of every step.
- ``is_baseline``: the method *is* the supervised baseline (no separate baseline run).

Instance hooks (all optional, all generic; see ``DistillationLoss``):
``student_taps`` / ``teacher_taps`` (intermediate outputs captured by forward
hooks, delivered in ``StepBatch``), ``setup`` (build learned parts from shapes seen
on a probe batch), ``wrap_student``, ``validation_metrics``, ``export_model``,
``write_artifacts`` and ``stages`` (methods that train a chain of models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import parse_config, require
from .errors import EngineError
from .kernels import soft_target_terms
from .registry import Registry

METHODS: Registry[type[DistillationLoss]] = Registry("method type", "invalid_spec", "method.type")
_SPEC = "invalid_spec"


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
    student_features: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # tap name -> float32 student output (carries grad), for the names in ``student_taps``
    teacher_features: list[dict[str, torch.Tensor]] = field(
        default_factory=list
    )  # per teacher: tap name -> float32 output (no grad), for the names in ``teacher_taps``
    soft_targets: torch.Tensor | None = (
        None  # [B, K] the loss's ``soft_targets`` when precomputed for all rows
    )


@dataclass
class Probe:
    """A few input rows, for ``setup`` to observe feature shapes before training."""

    x: torch.Tensor  # student input rows, on the device
    teacher_x: list[torch.Tensor] = field(default_factory=list)  # per teacher, its input rows


@dataclass
class Stage:
    """One model trained by a method. Most methods train one; chains (TAKD, born-again) train several."""

    name: str  # shown in metrics, e.g. "assistant 1", "generation 2", "student"
    loss: DistillationLoss  # the loss this stage trains with
    teachers: str = "spec"  # "spec": the job's teachers; "previous": the stage before's model; "none"
    architecture: dict | None = None  # None: the job's student architecture
    param: str = "student.architecture"  # where ``architecture`` sits in the spec, for errors
    epochs: int | None = None  # None: hyperparameters.epochs


class DistillationLoss(nn.Module):
    """Base class. Subclasses set ``Config`` and implement ``forward``.

    Learned parts of a loss (a FitNets regressor, self-distillation exits) are
    submodules of the loss module: the optimizer and the checkpoint include them,
    the exported model does not.
    """

    Config: ClassVar[type]
    uses_teachers: ClassVar[bool] = True
    min_teachers: ClassVar[int] = 1
    max_teachers: ClassVar[int | None] = None
    teacher_input: ClassVar[str] = "x"
    cacheable: ClassVar[bool] = True
    is_baseline: ClassVar[bool] = False

    def __init__(self, config, num_classes: int, num_teachers: int):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.num_teachers = num_teachers
        # Intermediate outputs the loss needs (module paths or "embedding"; see features.py).
        self.student_taps: list[str] = []
        self.teacher_taps: list[str] = []

    @property
    def requires_labels(self) -> bool:
        return True

    def wrap_student(self, student: nn.Module) -> nn.Module:
        """Hook for methods that change the student (fake quantisation). Module paths must survive it."""
        return student

    def setup(self, student: nn.Module, teachers: list[nn.Module], probe: Probe) -> None:
        """Called once per run, before the optimizer exists: check module paths, build learned parts."""

    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def soft_targets(
        self, teacher_logits: list[torch.Tensor], teacher_weights: list[float], targets: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The per-row target distribution ``[B, K]`` this loss distils toward, or None.

        A loss that returns one reads the teachers' logits only through it (``targets_of``),
        so with cached teacher outputs the trainer computes it once for every row and
        hands each step its rows in ``StepBatch.soft_targets`` instead of the logits.
        """
        return None

    def targets_of(self, batch: StepBatch) -> torch.Tensor:
        """This step's soft targets: precomputed, or from the step's teacher logits."""
        if batch.soft_targets is not None:
            return batch.soft_targets
        return self.soft_targets(batch.teacher_logits, batch.teacher_weights, batch.targets)

    def validation_metrics(
        self, student: nn.Module, x: torch.Tensor, y: torch.Tensor | None, device: torch.device
    ) -> dict:
        """Extra JSON-able numbers for the epoch row's ``method_metrics`` (e.g. every exit's accuracy)."""
        return {}

    def export_model(self, student: nn.Module) -> nn.Module:
        """The plain architecture to save and export (quantisation folds its fake-quant here)."""
        return student

    def write_artifacts(
        self,
        student: nn.Module,
        out_dir: Path,
        metadata: dict,
        x: torch.Tensor,
        y: torch.Tensor | None,
        device: torch.device,
    ) -> tuple[dict[str, Path], dict]:
        """Extra artifact files ``{name: path}`` and summary numbers for ``method_metrics``."""
        return {}, {}

    def stages(self) -> list[Stage]:
        """The models this method trains, in order; the last one is the job's student."""
        return [Stage("student", self, "spec" if self.uses_teachers else "none")]


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


# --------------------------------------------------------------------------- shared pieces


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) at temperature T, averaged over the batch (no T^2 factor)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class ids of ``targets``: themselves, or the heaviest class of mixed (soft) labels."""
    return targets if targets.dim() == 1 else targets.argmax(-1)


class _SoftTargetLoss(torch.autograd.Function):
    """(1 − α)·CE(z, y) + α·T²·KL(q ‖ softmax(z/T)) with its gradient formed in the forward pass.

    The gradient in closed form (``kernels.soft_target_terms``) takes a handful of tensor
    operations, or one fused pass on the CPU, where autograd's graph of the same
    expression takes about three times as many; on small students the step is dominated
    by per-op overhead, so this is what brings a KD step close to a supervised one. ``y``
    is class ids ``[B]`` or a label distribution ``[B, K]`` (mixed labels). Returns the
    total and the unweighted ``kl`` and ``ce`` (the last two carry no gradient).
    """

    @staticmethod
    def forward(ctx, z, q, y, temperature: float, alpha: float):
        total, kl, ce, grad = soft_target_terms(z, q, y, temperature, alpha)
        ctx.save_for_backward(grad)
        if ce is None:
            ctx.mark_non_differentiable(kl)
            return total, kl
        ctx.mark_non_differentiable(kl, ce)
        return total, kl, ce

    @staticmethod
    def backward(ctx, grad_total, *_):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    soft_targets: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 − α)·CE + α·T²·KL(q ‖ p_s), the Hinton mix shared by every KD-based method; CE only when α < 1.

    ``soft_targets`` q is the target distribution at temperature T (one teacher's
    softmax(z_t/T), or fused teachers). Terms: ``kl`` (at T, before T²), ``ce``.
    """
    if alpha < 1.0:
        total, kl, ce = _SoftTargetLoss.apply(student_logits, soft_targets, targets, temperature, alpha)
        return total, {"kl": kl, "ce": ce}
    total, kl = _SoftTargetLoss.apply(student_logits, soft_targets, targets, temperature, alpha)
    return total, {"kl": kl}


def check_temperature(t: float) -> None:
    require(
        math.isfinite(t) and 0 < t <= 100, _SPEC, f"temperature must be in (0, 100], got {t}", "temperature"
    )


def check_unit(value: float, name: str) -> None:
    require(0.0 <= value <= 1.0, _SPEC, f"{name} must be in [0, 1], got {value}", name)


def check_weight(value: float, name: str, upper: float = 1e6) -> None:
    require(
        math.isfinite(value) and 0.0 <= value <= upper,
        _SPEC,
        f"{name} must be a number in [0, {upper:g}], got {value}",
        name,
    )


@dataclass
class FeaturePair:
    """One ``pairs`` entry: a student module path and the teacher module path it learns from."""

    student: str
    teacher: str


def parse_pairs(raw: list[dict], *, default: list[dict] | None = None) -> list[FeaturePair]:
    """``pairs`` entries as ``FeaturePair``s; each must be {"student": path, "teacher": path}."""
    out = []
    for i, entry in enumerate(raw if raw else (default or [])):
        param = f"pairs[{i}]"
        require(
            isinstance(entry, dict), _SPEC, f"{param} must be an object with 'student' and 'teacher'", param
        )
        extra = sorted(set(entry) - {"student", "teacher"})
        require(not extra, _SPEC, f"unknown key {extra[:1]} in {param}; valid keys: student, teacher", param)
        for side in ("student", "teacher"):
            value = entry.get(side)
            require(
                isinstance(value, str) and value != "",
                _SPEC,
                f"{param}.{side} must be a module path (a non-empty string)",
                f"{param}.{side}",
            )
        out.append(FeaturePair(entry["student"], entry["teacher"]))
    return out


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
    is_baseline = True

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

    def soft_targets(self, teacher_logits, teacher_weights, targets):
        return torch.softmax(teacher_logits[0] / self.config.temperature, dim=-1)

    def forward(self, batch: StepBatch):
        c = self.config
        return distill_loss(
            batch.student_logits, self.targets_of(batch), batch.targets, c.temperature, c.alpha
        )


# --------------------------------------------------------------------------- dkd


@dataclass
class DKDConfig:
    alpha: float = 1.0  # weight of the target-class term TCKD
    beta: float = 8.0  # weight of the non-target-class term NCKD
    temperature: float = 4.0  # softening temperature for both terms
    warmup_epochs: int = 5  # the KD terms ramp linearly from 1/warmup_epochs to 1 over this many epochs
    ce_weight: float = 1.0  # weight of cross-entropy with the labels

    def __post_init__(self):
        check_weight(self.alpha, "alpha", 100.0)
        check_weight(self.beta, "beta", 100.0)
        check_temperature(self.temperature)
        require(
            0 <= self.warmup_epochs <= 10_000,
            _SPEC,
            f"warmup_epochs must be in [0, 10000], got {self.warmup_epochs}",
            "warmup_epochs",
        )
        check_weight(self.ce_weight, "ce_weight", 100.0)


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD, teacher's target probability) at temperature T, in nats.

    b = [p_y, 1 − p_y] is the binary target/non-target split and p̂ the softmax over
    the non-target classes only (the target column removed), so that
    KL(p_t ‖ p_s) = TCKD + (1 − p_t,y)·NCKD exactly (Zhao et al. 2022, eq. 4).
    Computed in log space: log(1 − p_y) is the logsumexp of the non-target log-probabilities.
    """
    b, k = student_logits.shape
    target = F.one_hot(targets, k).bool()
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    # Binary (target, rest) log-probabilities: [B, 2].
    log_b_s = torch.stack([log_p_s[target], log_p_s[~target].view(b, k - 1).logsumexp(-1)], dim=-1)
    log_b_t = torch.stack([log_p_t[target], log_p_t[~target].view(b, k - 1).logsumexp(-1)], dim=-1)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1)
    # Distributions over the non-target classes only.
    log_q_s = F.log_softmax(student_logits[~target].view(b, k - 1) / temperature, dim=-1)
    log_q_t = F.log_softmax(teacher_logits[~target].view(b, k - 1) / temperature, dim=-1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1)
    return tckd, nckd, log_b_t[:, 0].exp()


@METHODS.register("dkd")
class DKDLoss(DistillationLoss):
    """Decoupled knowledge distillation, Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled
    Knowledge Distillation" (CVPR 2022, arXiv:2203.08679).

    KL(p_t ‖ p_s) = TCKD + (1 − p_t,y)·NCKD, where TCKD = KL(b_t ‖ b_s) on the binary
    target/non-target probabilities b = [p_y, 1 − p_y] and NCKD = KL(p̂_t ‖ p̂_s) on the
    distributions over the non-target classes. Classical KD couples NCKD to the
    teacher's confidence (1 − p_t,y); DKD weighs the two parts freely:

    L = w_ce·CE(z_s, y) + r(e)·T²·(α·TCKD + β·NCKD),  r(e) = min(1, (e + 1)/E_warm)

    with e the 0-based epoch and E_warm = ``warmup_epochs`` (0 = no warm-up), a linear
    ramp of the distillation terms as in the paper's training recipe. Defaults α = 1,
    β = 8, T = 4 follow the paper's CIFAR-100 settings; the paper warms up over 20 of
    240 epochs, our default of 5 suits the much shorter default run (30 epochs).
    Needs labels (the target class defines the split; with mixed labels, the heaviest
    class). Terms: ``ce``, ``tckd``,
    ``nckd`` (batch means at T, before T² and weights).
    """

    Config = DKDConfig
    max_teachers = 1

    def forward(self, batch: StepBatch):
        c, t = self.config, self.config.temperature
        # Mixed labels (mixup, cutmix): the split is on the heaviest class; CE keeps the mixture.
        tckd, nckd, _ = dkd_terms(
            batch.student_logits, batch.teacher_logits[0], hard_labels(batch.targets), t
        )
        tckd, nckd = tckd.mean(), nckd.mean()
        ramp = 1.0 if c.warmup_epochs == 0 else min(1.0, (batch.epoch + 1) / c.warmup_epochs)
        ce = F.cross_entropy(batch.student_logits, batch.targets)
        total = c.ce_weight * ce + ramp * t * t * (c.alpha * tckd + c.beta * nckd)
        return total, {"ce": ce, "tckd": tckd, "nckd": nckd}


# --------------------------------------------------------------------------- multi_teacher

FUSIONS = ("mean", "weighted", "confidence")


@dataclass
class MultiTeacherConfig:
    fusion: str = "mean"  # mean | weighted (the teachers' spec `weight`) | confidence (per sample, CA-MKD)
    temperature: float = 4.0  # softening temperature
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to label CE

    def __post_init__(self):
        require(
            self.fusion in FUSIONS,
            _SPEC,
            f"unknown fusion {self.fusion!r}; valid: {', '.join(FUSIONS)}",
            "fusion",
        )
        check_temperature(self.temperature)
        check_unit(self.alpha, "alpha")


def fusion_weights(
    fusion: str, teacher_logits: list[torch.Tensor], spec_weights: list[float], targets: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample teacher weights ``[B, K_teachers]`` that sum to 1 over the teachers."""
    b, n = teacher_logits[0].shape[0], len(teacher_logits)
    device = teacher_logits[0].device
    if fusion == "mean":
        return torch.full((b, n), 1.0 / n, device=device)
    if fusion == "weighted":
        w = torch.tensor(spec_weights or [1.0] * n, dtype=torch.float32, device=device)
        return (w / w.sum()).expand(b, n)
    # confidence: a teacher that assigns the label a higher probability (lower CE) weighs more.
    ce = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in teacher_logits], dim=-1)
    return torch.softmax(-ce, dim=-1)


@METHODS.register("multi_teacher")
class MultiTeacherLoss(DistillationLoss):
    """Distillation from an ensemble of K ≥ 2 teachers (architectures may differ). You, Xu,
    Xu & Tao 2017, "Learning from Multiple Teacher Networks" (KDD 2017), for averaged
    soft targets; Zhang, Chen & Wang 2022, "Confidence-Aware Multi-Teacher Knowledge
    Distillation" (CA-MKD, ICASSP 2022, arXiv:2201.00007), for per-sample weights
    from each teacher's cross-entropy on the label.

    p̄ = Σ_k w_k·softmax(z_k / T)        (the fused target distribution)
    L = (1 − α)·CE(z_s, y) + α·T²·KL(p̄ ‖ p_s)

    ``fusion``: ``mean`` w_k = 1/K; ``weighted`` w_k = weight_k / Σ weight (the teachers'
    spec ``weight``); ``confidence`` w_k(x) = softmax_k(−CE(z_k(x), y)) per sample
    (needs labels). CA-MKD applies its weights to per-teacher KL terms; we apply them
    to the teachers' probabilities, so every fusion yields one target distribution.
    Teacher logits come from the per-run cache like ``kd``'s. Terms: ``ce``, ``kl``.
    """

    Config = MultiTeacherConfig
    min_teachers = 2

    @property
    def requires_labels(self) -> bool:
        return self.config.alpha < 1.0 or self.config.fusion == "confidence"

    def soft_targets(self, teacher_logits, teacher_weights, targets):
        c = self.config
        w = fusion_weights(c.fusion, teacher_logits, teacher_weights, targets)
        probs = torch.stack([torch.softmax(z / c.temperature, dim=-1) for z in teacher_logits], dim=1)
        return (w.unsqueeze(-1) * probs).sum(1)  # [B, K]

    def forward(self, batch: StepBatch):
        c = self.config
        return distill_loss(
            batch.student_logits, self.targets_of(batch), batch.targets, c.temperature, c.alpha
        )


# --------------------------------------------------------------------------- cross_modal


@dataclass
class CrossModalConfig:
    temperature: float = 4.0  # softening temperature
    alpha: float = 1.0  # 1 = learn from the teacher alone, no labels needed

    def __post_init__(self):
        check_temperature(self.temperature)
        check_unit(self.alpha, "alpha")


@METHODS.register("cross_modal")
class CrossModalLoss(KDLoss):
    """Cross-modal distillation (supervision transfer), Gupta, Hoffman & Malik 2016,
    "Cross Modal Distillation for Supervision Transfer" (CVPR 2016, arXiv:1507.00448).

    The teacher reads its own modality ``x_teacher``, the student reads ``x``; the rows
    are paired, so the teacher's outputs on x_teacher[i] supervise the student on x[i]:

    L = (1 − α)·CE(z_s(x), y) + α·T²·KL(p_t(x_teacher) ‖ p_s(x))

    With α = 1 (the default, as in the paper's transfer to an unlabelled modality)
    no labels are needed; validation accuracy is reported when the validation data has
    labels and teacher agreement always. (The paper transfers mid-level features; we
    transfer the output distribution, which needs no architecture correspondence.)
    Terms: ``kl``, ``ce`` when α < 1.
    """

    # The loss is KD's; only the teacher's input and the default alpha differ.
    Config = CrossModalConfig
    teacher_input = "x_teacher"


# --------------------------------------------------------------------------- teacher_assistant


@dataclass
class TeacherAssistantConfig:
    assistants: list[dict] = field(default_factory=list)  # architectures, largest first: {"name", "config"}
    temperature: float = 4.0  # softening temperature of every link
    alpha: float = 0.5  # weight of the distillation term of every link
    assistant_epochs: int | None = None  # epochs per assistant; None = hyperparameters.epochs

    def __post_init__(self):
        require(
            1 <= len(self.assistants) <= 8,
            _SPEC,
            f"assistants must list 1 to 8 architectures, got {len(self.assistants)}",
            "assistants",
        )
        for i, arch in enumerate(self.assistants):
            require(
                isinstance(arch.get("name"), str),
                _SPEC,
                f"assistants[{i}] must be an architecture object with a 'name'",
                f"assistants[{i}].name",
            )
        check_temperature(self.temperature)
        check_unit(self.alpha, "alpha")
        require(
            self.assistant_epochs is None or 1 <= self.assistant_epochs <= 10_000,
            _SPEC,
            f"assistant_epochs must be in [1, 10000] or null, got {self.assistant_epochs}",
            "assistant_epochs",
        )


@METHODS.register("teacher_assistant")
class TeacherAssistantLoss(KDLoss):
    """Teacher-assistant knowledge distillation (TAKD), Mirzadeh, Farajtabar, Li, Levine,
    Matsukawa & Ghasemzadeh 2020, "Improved Knowledge Distillation via Teacher
    Assistant" (AAAI 2020, arXiv:1902.03393).

    A chain teacher → assistant_1 → … → assistant_n → student bridges a large
    capacity gap; every link is plain KD from the model before it:

    L = (1 − α)·CE(z_s, y) + α·T²·KL(p_prev ‖ p_s)   (every link; p_prev from the model before it)

    Each assistant trains for ``assistant_epochs`` (default: the job's epochs) with the
    job's other hyperparameters; its logits are cached once before the next link
    trains. Every link's validation accuracy is reported in ``summary["stages"]``;
    only the final student is exported. Terms: ``kl``, ``ce`` when α < 1.
    """

    # Every link's loss is KD's; the chain is what differs.
    Config = TeacherAssistantConfig

    def stages(self) -> list[Stage]:
        c = self.config
        link = KDConfig(temperature=c.temperature, alpha=c.alpha)
        chain = [
            Stage(
                f"assistant {i + 1}",
                KDLoss(link, num_classes=self.num_classes, num_teachers=1),
                teachers="spec" if i == 0 else "previous",
                architecture=arch,
                param=f"method.assistants[{i}]",
                epochs=c.assistant_epochs,
            )
            for i, arch in enumerate(c.assistants)
        ]
        return chain + [Stage("student", self, teachers="previous")]
