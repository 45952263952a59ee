"""Intermediate-knowledge methods: ``feature`` (FitNets), ``attention`` (AT), ``relation`` (RKD).

All three add a term to the Hinton mix (1 − α)·CE + α·T²·KL. Their features come
from forward hooks named in ``pairs`` (student module path → teacher module path,
or ``embedding`` for the input of the classifier head); the trainer captures them
and passes them in ``StepBatch.student_features`` / ``teacher_features``. With
frozen teachers on unaugmented rows the teacher's features are cached once per run
when they fit the memory budget, like its logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import require
from .features import EMBEDDING, align, aligned_shapes, check_path, feature_shapes
from .methods import (
    METHODS,
    FeaturePair,
    KDLoss,
    Probe,
    StepBatch,
    check_temperature,
    check_unit,
    check_weight,
    parse_pairs,
)

_SPEC = "invalid_spec"


def _embedding_pair() -> list[dict]:
    return [{"student": EMBEDDING, "teacher": EMBEDDING}]


class PairedFeatureLoss(KDLoss):
    """Shared plumbing: ``pairs`` → taps, path checks; the KD part of the loss is ``KDLoss``'s."""

    def __init__(self, config, num_classes: int, num_teachers: int):
        super().__init__(config, num_classes, num_teachers)
        self.pairs: list[FeaturePair] = parse_pairs(config.pairs)
        self.student_taps = [p.student for p in self.pairs]
        self.teacher_taps = [p.teacher for p in self.pairs]

    def check_paths(self, student: nn.Module, teachers: list[nn.Module]) -> None:
        for i, pair in enumerate(self.pairs):
            check_path(student, pair.student, who="the student", param=f"method.pairs[{i}].student")
            for j, teacher in enumerate(teachers):
                check_path(teacher, pair.teacher, who=f"teacher {j}", param=f"method.pairs[{i}].teacher")

    def feature_pairs(self, batch: StepBatch):
        """(student feature, teacher feature) per pair; teacher features carry no grad."""
        teacher = batch.teacher_features[0]
        return [(batch.student_features[p.student], teacher[p.teacher]) for p in self.pairs]


# --------------------------------------------------------------------------- feature (FitNets)


@dataclass
class FeatureConfig:
    pairs: list[dict] = field(default_factory=_embedding_pair)  # [{"student": path, "teacher": path}]
    beta: float = 1.0  # weight of the hint (regression) term
    temperature: float = 4.0  # softening temperature of the KD term
    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to label CE

    def __post_init__(self):
        parse_pairs(self.pairs)
        require(1 <= len(self.pairs) <= 16, _SPEC, "pairs must list 1 to 16 entries", "pairs")
        check_weight(self.beta, "beta")
        check_temperature(self.temperature)
        check_unit(self.alpha, "alpha")


def make_regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """r: a 1×1 convolution for [C, L] / [C, H, W] maps, a linear layer for [D] vectors.

    The shapes are per sample, after ``features.align`` (same spatial size).
    """
    cs, ct = student_shape[0], teacher_shape[0]
    if len(student_shape) == 1:
        return nn.Linear(cs, ct)
    if len(student_shape) == 2:
        return nn.Conv1d(cs, ct, kernel_size=1)
    return nn.Conv2d(cs, ct, kernel_size=1)


@METHODS.register("feature")
class FeatureLoss(PairedFeatureLoss):
    """FitNets hints, Romero, Ballas, Kahou, Chassang, Gatta & Bengio 2015, "FitNets:
    Hints for Thin Deep Nets" (ICLR 2015, arXiv:1412.6550).

    L = (1 − α)·CE(z_s, y) + α·T²·KL(p_t ‖ p_s) + β·Σ_pairs ‖r(F_s) − F_t‖²

    F_s, F_t are the outputs of the paired student/teacher modules (forward hooks);
    ‖·‖² is the mean squared error over the batch and the feature's elements. The
    regressor r is a 1×1 convolution (``[C, L]`` / ``[C, H, W]`` maps) or a linear layer
    (``[D]`` vectors) from the student's to the teacher's channels, created from the
    shapes seen on a probe batch and trained with the student (it is in the optimizer
    and the checkpoint, not in the exported model). A spatial/length mismatch is
    resolved by adaptive average pooling of the larger map; maps of different rank
    are globally pooled to vectors. The paper trains the hint stage separately
    before KD; here both are optimised jointly, as in most later benchmarks.
    Default pair: the penultimate embeddings (``embedding``). Terms: ``kl``, ``ce``
    (α < 1), ``hint`` (the unweighted sum over pairs).
    """

    Config = FeatureConfig

    def __init__(self, config, num_classes: int, num_teachers: int):
        super().__init__(config, num_classes, num_teachers)
        self.regressors = nn.ModuleList()

    def setup(self, student: nn.Module, teachers: list[nn.Module], probe: Probe) -> None:
        self.check_paths(student, teachers)
        s_shapes = feature_shapes(student, probe.x, self.student_taps)
        t_shapes = feature_shapes(teachers[0], probe.teacher_x[0], self.teacher_taps)
        self.regressors = nn.ModuleList(
            make_regressor(*aligned_shapes(s_shapes[p.student], t_shapes[p.teacher])) for p in self.pairs
        )

    def forward(self, batch: StepBatch):
        total, terms = super().forward(batch)
        hint = batch.student_logits.new_zeros(())
        for regressor, (fs, ft) in zip(self.regressors, self.feature_pairs(batch)):
            fs, ft = align(fs, ft)
            hint = hint + F.mse_loss(regressor(fs), ft)
        terms["hint"] = hint
        return total + self.config.beta * hint, terms


# --------------------------------------------------------------------------- attention (AT)


@dataclass
class AttentionConfig:
    pairs: list[dict] = field(default_factory=list)  # required: [{"student": path, "teacher": path}]
    beta: float = 1000.0  # weight of the attention term (the paper's value)
    temperature: float = 4.0  # softening temperature of the KD term
    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to label CE

    def __post_init__(self):
        parse_pairs(self.pairs)
        require(
            1 <= len(self.pairs) <= 16,
            _SPEC,
            "pairs must list 1 to 16 {student, teacher} module paths, e.g. the outputs of matching stages",
            "pairs",
        )
        check_weight(self.beta, "beta")
        check_temperature(self.temperature)
        check_unit(self.alpha, "alpha")


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Q = Σ_c A_c² (p = 2) over the channels of ``[B, C, *spatial]``: ``[B, *spatial]``.

    A ``[B, D]`` vector has no spatial positions; each unit is taken as a position of
    a one-channel map, so Q = A².
    """
    return f.pow(2) if f.dim() == 2 else f.pow(2).sum(1)


def normalised_attention(qs: torch.Tensor, qt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Match the maps' sizes (adaptive average pooling of the larger), flatten, L2-normalise per sample."""
    if qs.shape[1:] != qt.shape[1:]:
        if qs.dim() == qt.dim() and qs.dim() >= 2:
            size = tuple(min(a, b) for a, b in zip(qs.shape[1:], qt.shape[1:]))
            pool = F.adaptive_avg_pool1d if qs.dim() == 2 else F.adaptive_avg_pool2d
            qs, qt = pool(qs.unsqueeze(1), size).squeeze(1), pool(qt.unsqueeze(1), size).squeeze(1)
        else:
            n = min(qs[0].numel(), qt[0].numel())
            qs = F.adaptive_avg_pool1d(qs.flatten(1).unsqueeze(1), n).squeeze(1)
            qt = F.adaptive_avg_pool1d(qt.flatten(1).unsqueeze(1), n).squeeze(1)
    return F.normalize(qs.flatten(1), dim=1), F.normalize(qt.flatten(1), dim=1)


@METHODS.register("attention")
class AttentionLoss(PairedFeatureLoss):
    """Attention transfer, Zagoruyko & Komodakis 2017, "Paying More Attention to
    Attention: Improving the Performance of Convolutional Neural Networks via Attention
    Transfer" (ICLR 2017, arXiv:1612.03928), activation-based, p = 2.

    Q = vec(Σ_c A_c²)   (per sample, A the paired module's output ``[C, *spatial]``)
    L = (1 − α)·CE(z_s, y) + α·T²·KL(p_t ‖ p_s) + β/2·Σ_pairs ‖Q_s/‖Q_s‖₂ − Q_t/‖Q_t‖₂‖²

    ‖·‖² is averaged over the batch and the map's positions, the scale at which the
    paper's β = 1000 (our default) was set. Maps of different spatial size are
    matched by adaptive average pooling of the larger one. No learned parameters.
    ``pairs`` is required (e.g. the ends of matching stages). Terms: ``kl``, ``ce``
    (α < 1), ``attention`` (the unweighted sum over pairs).
    """

    Config = AttentionConfig

    def setup(self, student: nn.Module, teachers: list[nn.Module], probe: Probe) -> None:
        self.check_paths(student, teachers)

    def forward(self, batch: StepBatch):
        total, terms = super().forward(batch)
        at = batch.student_logits.new_zeros(())
        for fs, ft in self.feature_pairs(batch):
            qs, qt = normalised_attention(attention_map(fs), attention_map(ft))
            at = at + (qs - qt).pow(2).mean()
        terms["attention"] = at
        return total + self.config.beta / 2 * at, terms


# --------------------------------------------------------------------------- relation (RKD)


@dataclass
class RelationConfig:
    pairs: list[dict] = field(
        default_factory=_embedding_pair
    )  # embeddings to relate; default the penultimate
    distance_weight: float = 25.0  # w_d (the paper's value)
    angle_weight: float = 50.0  # w_a (the paper's value)
    temperature: float = 4.0  # softening temperature of the KD term
    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to label CE

    def __post_init__(self):
        parse_pairs(self.pairs)
        require(1 <= len(self.pairs) <= 16, _SPEC, "pairs must list 1 to 16 entries", "pairs")
        check_weight(self.distance_weight, "distance_weight")
        check_weight(self.angle_weight, "angle_weight")
        check_temperature(self.temperature)
        check_unit(self.alpha, "alpha")


def rkd_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """ψ_D: pairwise Euclidean distances ``[B, B]`` divided by their mean over distinct pairs."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * e @ e.t()).clamp_min(eps).sqrt()
    off_diagonal = 1.0 - torch.eye(len(e), device=e.device, dtype=e.dtype)
    d = d * off_diagonal
    mean = d.sum() / off_diagonal.sum().clamp_min(1.0)
    return d / mean.clamp_min(eps)


def rkd_angles(e: torch.Tensor) -> torch.Tensor:
    """ψ_A: cos∠(e_i, e_j, e_k) = ⟨(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖⟩ for every triplet, ``[B, B, B]``."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = unit(e_i − e_j)
    return diff @ diff.transpose(1, 2)


@METHODS.register("relation")
class RelationLoss(PairedFeatureLoss):
    """Relational knowledge distillation, Park, Kim, Lu & Cho 2019, "Relational Knowledge
    Distillation" (CVPR 2019, arXiv:1904.05068).

    ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ,  μ the mean distance over the batch's distinct pairs
    ψ_A(t_i, t_j, t_k) = ⟨(t_i − t_j)/‖t_i − t_j‖, (t_k − t_j)/‖t_k − t_j‖⟩
    L = (1 − α)·CE(z_s, y) + α·T²·KL(p_t ‖ p_s)
        + Σ_pairs [w_d·Huber(ψ_D(s), ψ_D(t)) + w_a·Huber(ψ_A(s), ψ_A(t))]

    Huber is smooth-L1 with δ = 1, averaged over pairs/triplets. Relations are
    invariant to the embeddings' scale (distances are normalised by μ, angles are
    scale-free) and need no projection when the embedding widths differ. Embeddings
    default to the penultimate ones (the input of each model's head); other
    ``pairs`` are flattened to vectors. Defaults w_d = 25, w_a = 50 are the paper's.
    Terms: ``kl``, ``ce`` (α < 1), ``distance``, ``angle`` (unweighted sums over pairs).
    """

    Config = RelationConfig

    def setup(self, student: nn.Module, teachers: list[nn.Module], probe: Probe) -> None:
        self.check_paths(student, teachers)

    def forward(self, batch: StepBatch):
        c = self.config
        total, terms = super().forward(batch)
        dist = angle = batch.student_logits.new_zeros(())
        for fs, ft in self.feature_pairs(batch):
            fs, ft = fs.flatten(1), ft.flatten(1)
            # A zero weight skips its term: the angle term costs O(B³·D) a step, RKD-D alone far less.
            if c.distance_weight:
                dist = dist + F.smooth_l1_loss(rkd_distances(fs), rkd_distances(ft))
            if c.angle_weight:
                angle = angle + F.smooth_l1_loss(rkd_angles(fs), rkd_angles(ft))
        terms["distance"], terms["angle"] = dist, angle
        return total + c.distance_weight * dist + c.angle_weight * angle, terms
