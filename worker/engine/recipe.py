"""Recipe search: ``"recipe": "auto"``, ``"temperature": "auto"``, ``"alpha": "auto"``.

Defaults copied from papers can hurt a given student (DKD's CIFAR β hurt a small MLP on
MNIST-1D; the best temperature flips with the student's width), so the service can choose
on the job's own validation split. The search is successive halving (Jamieson &
Talwalkar 2016, arXiv:1502.07943): every candidate gets a short probe run, the better half
by validation accuracy goes on with twice the probe, until one is left. The probes' total
cost is bounded by ``recipe_budget`` × epochs, counted in full-data epochs: a probe of e
epochs on a fraction f of the training rows costs e·f.

What is searched: ``temperature`` over {1, 2, 4, 8} and ``alpha`` (the KD mix) over
{0.5, 1}, each when the method has it and the spec says ``auto`` or ``recipe`` is ``auto``;
under ``recipe: auto`` also ``augmentation`` ∈ {none, mixup} when the spec's is ``none``,
the inputs are floats and the teachers read the student's input. The chosen settings then
train the job's student with a same-budget, same-augmentation baseline beside it, and the
job ships whichever is better on validation (saying so when it is the baseline).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import require
from .methods import METHODS

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
ALPHAS = (0.5, 1.0)
_SPEC = "invalid_spec"


@dataclass
class Candidate:
    overrides: dict  # {"method.temperature": 2.0, "augmentation": "mixup", ...}
    rounds: list[dict] = field(default_factory=list)  # per probe: epochs, rows fraction, val_accuracy

    @property
    def score(self) -> float:
        acc = self.rounds[-1]["val_accuracy"] if self.rounds else None
        return -1.0 if acc is None else acc


def searched(spec: dict, *, has_labels: bool = True) -> dict[str, tuple]:
    """The settings to search and their values (empty: no search)."""
    method = spec.get("method") if isinstance(spec.get("method"), dict) else {}
    recipe = spec.get("recipe")
    require(recipe in (None, "auto"), _SPEC, f"recipe must be 'auto' or null, got {recipe!r}", "recipe")
    cls = METHODS.get(method.get("type"))
    fields = getattr(cls.Config, "__dataclass_fields__", {})
    kd_alpha = "alpha" in fields and method.get("type") != "dkd"  # DKD's alpha weighs TCKD, not the KD mix
    for key in ("temperature", "alpha"):
        if method.get(key) == "auto":
            require(
                key in fields and (key != "alpha" or kd_alpha),
                _SPEC,
                f"method {method.get('type')!r} has no {key} to choose",
                f"method.{key}",
            )
    out: dict[str, tuple] = {}
    if "temperature" in fields and (recipe == "auto" or method.get("temperature") == "auto"):
        out["method.temperature"] = TEMPERATURES
    if kd_alpha and (recipe == "auto" or method.get("alpha") == "auto"):
        out["method.alpha"] = ALPHAS if has_labels else (1.0,)  # without labels only teacher-alone KD
    return out


def candidates(spec: dict, *, floating_inputs: bool, has_labels: bool) -> list[Candidate]:
    grid = searched(spec, has_labels=has_labels)
    method = spec.get("method") or {}
    cls = METHODS.get(method.get("type"))
    if (
        spec.get("recipe") == "auto"
        and spec.get("augmentation", "none") in ("none", None, [])
        and floating_inputs
        and cls.teacher_input == "x"
    ):
        grid["augmentation"] = ("none", "mixup")
    if not grid:
        return []
    keys = list(grid)
    return [Candidate(dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]


def apply(spec: dict, overrides: dict) -> dict:
    """``spec`` with ``overrides`` ({"method.temperature": 2.0, ...}) set and the search keys removed."""
    out = copy.deepcopy(spec)
    out.pop("recipe", None)
    for key, value in overrides.items():
        target, name = (out["method"], key.split(".", 1)[1]) if key.startswith("method.") else (out, key)
        target[name] = value
        if key == "augmentation" and value == "none" and out.get("teacher_outputs") == "pool":
            out["teacher_outputs"] = None
    return out


def successive_halving(
    pool: list[Candidate], *, budget: float, epochs_cap: int, probe: Callable[[Candidate, int, float], float | None],
    log,
) -> tuple[Candidate, float]:  # fmt: skip
    """Halve ``pool`` by validation accuracy until one candidate is left; returns it and the cost spent.

    Each of the ⌈log2 m⌉ rounds gets an equal share of ``budget``; a round with k candidates
    gives each ``share / k`` full-data epochs: e = ⌊share / k⌋ epochs (at most ``epochs_cap``)
    on all rows, or one epoch on that fraction of the rows when the share is under an epoch.
    """
    rounds = max(1, math.ceil(math.log2(len(pool))))
    share = budget / rounds
    spent = 0.0
    alive = list(pool)
    for r in range(rounds):
        each = share / len(alive)
        epochs = max(1, min(epochs_cap, math.floor(each)))
        rows = min(1.0, each / epochs)
        for cand in alive:
            acc = probe(cand, epochs, rows)
            cand.rounds.append(
                {"round": r + 1, "epochs": epochs, "rows": round(rows, 4), "val_accuracy": acc}
            )
            spent += epochs * rows
            log("info", "recipe probe", round=r + 1, settings=cand.overrides, epochs=epochs, rows=round(rows, 4),
                val_accuracy=acc)  # fmt: skip
        alive.sort(key=lambda c: c.score, reverse=True)  # stable: ties keep the grid's order
        alive = alive[: max(1, math.ceil(len(alive) / 2))] if r < rounds - 1 else alive[:1]
    return alive[0], spent
