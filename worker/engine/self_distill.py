"""``self_distill``: a network taught by its own deepest head, and born-again generations."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import require
from .errors import EngineError
from .features import EMBEDDING, FeatureTap, check_path, feature_shapes, global_pool
from .methods import (
    METHODS,
    DistillationLoss,
    Probe,
    Stage,
    StepBatch,
    check_temperature,
    check_unit,
    check_weight,
    kd_kl,
)

_SPEC = "invalid_spec"


@dataclass
class SelfDistillConfig:
    exits: list[str] | None = (
        None  # student module paths for auxiliary heads; None = the architecture's stages
    )
    temperature: float = 3.0  # softening temperature of every KL term
    alpha: float = (
        0.5  # per exit: (1 - alpha)·CE + alpha·T²·KL toward the final head; also the born-again weight
    )
    feature_weight: float = 0.1  # weight of the exits' feature L2 toward the final embedding
    generations: int = 1  # born-again generations (1 = no born-again)

    def __post_init__(self):
        if self.exits is not None:
            require(len(self.exits) <= 16, _SPEC, "exits may list at most 16 module paths", "exits")
            require(
                len(set(self.exits)) == len(self.exits), _SPEC, "exits must not repeat a module path", "exits"
            )
        check_temperature(self.temperature)
        check_unit(self.alpha, "alpha")
        check_weight(self.feature_weight, "feature_weight")
        require(
            1 <= self.generations <= 10,
            _SPEC,
            f"generations must be in [1, 10], got {self.generations}",
            "generations",
        )


class ExitHead(nn.Module):
    """Auxiliary head on an intermediate stage: global average pool, a linear bottleneck to
    the final embedding's width (the feature compared with the deepest one), ReLU, linear classifier."""

    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()
        self.project = nn.Linear(channels, width)
        self.classify = nn.Linear(width, num_classes)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(global_pool(f))
        return h, self.classify(F.relu(h))


@METHODS.register("self_distill")
class SelfDistillLoss(DistillationLoss):
    """Self-distillation, Zhang, Song, Gao, Chen, Bao & Ma 2019, "Be Your Own Teacher:
    Improve the Performance of Convolutional Neural Networks via Self Distillation"
    (ICCV 2019, arXiv:1905.08094); born-again generations, Furlanello, Lipton,
    Tschannen, Itti & Anandkumar 2018, "Born Again Neural Networks" (ICML 2018,
    arXiv:1805.04770). No teacher.

    Auxiliary heads (``ExitHead``: pool + linear) sit on the ``exits``; the final head
    C teaches every exit i:

    L = CE(z_C, y) + Σ_i [(1 − α)·CE(z_i, y) + α·T²·KL(p_C ‖ p_i) + λ·‖h_i − f_C‖²]

    with f_C the penultimate embedding, h_i the exit's bottleneck feature (same
    width), ‖·‖² the mean squared error, and p_C, f_C detached (the deepest head
    teaches, it is not pulled toward the shallow ones). Born-again (``generations``
    = n > 1): generation g ≥ 2 is the same architecture, freshly initialised and
    trained with the same loss, except that its final head also learns from
    generation g − 1's logits z_{g−1} (cached once, frozen):

    CE(z_C, y) → (1 − α)·CE(z_C, y) + α·T²·KL(p_{g−1} ‖ p_C)

    Only the last generation is exported, as the plain network with its final head
    (exits are training-time only). Epoch rows report every exit's validation
    accuracy in ``method_metrics.exit_accuracy``; ``summary["stages"]`` reports each
    generation's. Default exits: the architecture's ``stage_paths`` (the ends of
    all but the last stage). Terms: ``ce``, ``exit_ce``, ``exit_kl``,
    ``exit_feature`` (sums over exits) and ``born_again_kl`` (generations ≥ 2).
    """

    Config = SelfDistillConfig
    uses_teachers = False
    min_teachers = 0

    def __init__(self, config, num_classes: int, num_teachers: int):
        super().__init__(config, num_classes, num_teachers)
        self.exits: list[str] = list(config.exits or [])
        self.heads = nn.ModuleList()

    def setup(self, student: nn.Module, teachers: list[nn.Module], probe: Probe) -> None:
        if self.config.exits is None:
            self.exits = list(getattr(student, "stage_paths", []))
        for i, path in enumerate(self.exits):
            check_path(student, path, who="the student", param=f"method.exits[{i}]")
        if not self.exits and self.config.generations == 1:
            raise EngineError(
                _SPEC,
                "self_distill has no exits: the student architecture has a single stage; name module paths "
                "in exits or set generations >= 2 for born-again training",
                param="method.exits",
            )
        self.student_taps = [*self.exits, EMBEDDING]
        shapes = feature_shapes(student, probe.x, self.student_taps)
        width = math.prod(shapes[EMBEDDING])
        self.heads = nn.ModuleList(ExitHead(shapes[p][0], width, self.num_classes) for p in self.exits)

    def forward(self, batch: StepBatch):
        c, t = self.config, self.config.temperature
        z_final, y = batch.student_logits, batch.targets
        ce = F.cross_entropy(z_final, y)
        terms = {"ce": ce}
        total = ce
        if batch.teacher_logits:  # born-again: the previous generation teaches the final head
            ba = kd_kl(z_final, batch.teacher_logits[0], t)
            total = (1.0 - c.alpha) * ce + c.alpha * t * t * ba
            terms["born_again_kl"] = ba
        if self.heads:
            f_final = batch.student_features[EMBEDDING].flatten(1).detach()
            z_teach = z_final.detach()
            exit_ce = exit_kl = exit_feature = z_final.new_zeros(())
            for path, head in zip(self.exits, self.heads):
                h, z = head(batch.student_features[path])
                exit_ce = exit_ce + F.cross_entropy(z, y)
                exit_kl = exit_kl + kd_kl(z, z_teach, t)
                exit_feature = exit_feature + F.mse_loss(h, f_final)
            total = (
                total
                + (1.0 - c.alpha) * exit_ce
                + c.alpha * t * t * exit_kl
                + c.feature_weight * exit_feature
            )
            terms.update(exit_ce=exit_ce, exit_kl=exit_kl, exit_feature=exit_feature)
        return total, terms

    @torch.inference_mode()
    def validation_metrics(self, student, x, y, device) -> dict:
        if y is None or not self.heads or len(x) == 0:
            return {}
        was_training = student.training
        student.eval()
        correct = torch.zeros(len(self.exits) + 1, device=device)
        with FeatureTap(student, self.exits) as tap:
            for i in range(0, len(x), 1024):
                logits = student(x[i : i + 1024].to(device))
                yb = y[i : i + 1024].to(device)
                feats = tap.take()
                preds = [head(feats[p])[1] for p, head in zip(self.exits, self.heads)] + [logits]
                correct += torch.stack([(z.argmax(-1) == yb).sum() for z in preds]).float()
        student.train(was_training)
        acc = (correct / len(x)).tolist()
        return {"exit_accuracy": dict(zip([*self.exits, "final"], acc))}

    def stages(self) -> list[Stage]:
        n = self.config.generations
        losses = [SelfDistillLoss(self.config, self.num_classes, 0) for _ in range(n - 1)] + [self]
        return [
            Stage(
                f"generation {g + 1}" if n > 1 else "student",
                loss,
                teachers="none" if g == 0 else "previous",
            )
            for g, loss in enumerate(losses)
        ]
