"""`training_curves.png`: per-epoch loss terms and validation accuracy of a finished run.

Drawn on a bare `Figure` with the Agg canvas rather than through pyplot: no global backend, no GUI, and
nothing shared between threads, so a worker without a display (or one running several jobs) is safe.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["training_curves_figure", "write_training_curves"]


def _finite(values: list) -> list[float]:
    # NaN is matplotlib's "no point here": a missing or non-finite value leaves a gap instead of failing.
    return [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def training_curves_figure(
    *,
    history: list[dict],
    method: str,
    baseline_history: list[dict] = (),
    teacher_accuracy: list[float | None] = (),
    title: str | None = None,
) -> Figure:
    """Left: the total training loss and every term the method logged. Right: the student's (and the
    same-budget baseline's) validation accuracy, with one horizontal line per teacher."""
    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    fig.suptitle(title or f"method: {method}")

    epochs = [row["epoch"] for row in history]
    ax_loss.plot(epochs, _finite([row.get("train_loss") for row in history]), marker=".", label="total", lw=2)
    terms = list(dict.fromkeys(name for row in history for name in (row.get("losses") or {})))
    for name in terms:
        ax_loss.plot(epochs, _finite([(row.get("losses") or {}).get(name) for row in history]), marker=".",
                     lw=1, label=name)  # fmt: skip
    ax_loss.set(title="training loss by term", xlabel="epoch", ylabel="loss")
    ax_loss.grid(alpha=0.3)
    if history:
        ax_loss.legend(fontsize="small")

    ax_acc.plot(epochs, _finite([row.get("val_accuracy") for row in history]), marker=".", lw=2,
                label=f"student ({method})")  # fmt: skip
    if baseline_history:
        ax_acc.plot([row["epoch"] for row in baseline_history],
                    _finite([row.get("val_accuracy") for row in baseline_history]), marker=".", lw=1.5,
                    ls="--", label="baseline (supervised, same budget)")  # fmt: skip
    for i, acc in enumerate(teacher_accuracy):
        if acc is not None and math.isfinite(acc):
            label = "teacher" if len(teacher_accuracy) == 1 else f"teacher {i + 1}"
            ax_acc.axhline(acc, color=f"C{3 + i}", ls=":", lw=1.5, label=f"{label} ({100 * acc:.1f}%)")
    ax_acc.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
    ax_acc.grid(alpha=0.3)
    if history or baseline_history or any(a is not None for a in teacher_accuracy):
        ax_acc.legend(fontsize="small", loc="lower right")

    return fig


def write_training_curves(path: Path, **series) -> None:
    """Draw `training_curves_figure(**series)` to a PNG at `path`, atomically."""
    fig = training_curves_figure(**series)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
