"""training_curves.png: the figure's series, and a valid PNG for runs with and without a baseline or teacher."""

import math

from PIL import Image

from worker.engine.plots import training_curves_figure, write_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows(n: int, terms: dict[str, float], acc0: float = 0.5, phase: str = "train") -> list[dict]:
    return [{"phase": phase, "epoch": e, "train_loss": 2.0 / e, "losses": {k: v / e for k, v in terms.items()},
             "val_accuracy": acc0 + 0.05 * e} for e in range(1, n + 1)]  # fmt: skip


def labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def assert_png(path, size=(1100, 420)):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.load()  # decodes every pixel: a truncated file fails here
        assert img.format == "PNG" and img.size == size


def test_kd_run_with_baseline_and_teacher_draws_every_series(tmp_path):
    fig = training_curves_figure(history=rows(4, {"ce": 1.0, "kl": 0.5}), method="kd",
                                 baseline_history=rows(4, {"ce": 1.0}, acc0=0.4, phase="baseline"),
                                 teacher_accuracy=[0.93], title="blobs · method kd")  # fmt: skip
    loss_ax, acc_ax = fig.axes
    assert fig._suptitle.get_text() == "blobs · method kd"
    assert labels(loss_ax) == ["total", "ce", "kl"]
    assert [list(line.get_xdata()) for line in loss_ax.get_lines()] == [[1, 2, 3, 4]] * 3
    assert list(loss_ax.get_lines()[2].get_ydata()) == [0.5, 0.25, 0.5 / 3, 0.125]
    assert labels(acc_ax) == ["student (kd)", "baseline (supervised, same budget)", "teacher (93.0%)"]
    teacher_line = acc_ax.get_lines()[2]
    assert list(teacher_line.get_ydata()) == [0.93, 0.93]  # axhline: horizontal at the teacher's accuracy
    write_training_curves(tmp_path / "curves.png", history=rows(4, {"ce": 1.0, "kl": 0.5}), method="kd",
                          baseline_history=rows(4, {"ce": 1.0}), teacher_accuracy=[0.93])  # fmt: skip
    assert_png(tmp_path / "curves.png")
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left behind


def test_supervised_run_without_baseline_or_teacher(tmp_path):
    fig = training_curves_figure(history=rows(3, {"ce": 1.0}), method="supervised")
    acc_ax = fig.axes[1]
    assert fig._suptitle.get_text() == "method: supervised"
    assert labels(acc_ax) == ["student (supervised)"]
    write_training_curves(tmp_path / "c.png", history=rows(3, {"ce": 1.0}), method="supervised",
                          teacher_accuracy=[None])  # fmt: skip
    assert_png(tmp_path / "c.png")


def test_gaps_in_the_series_and_an_empty_history_still_draw(tmp_path):
    history = rows(3, {"ce": 1.0})
    history[1]["val_accuracy"] = None  # e.g. no validation labels
    history[2]["losses"]["ce"] = math.inf
    fig = training_curves_figure(history=history, method="self_distill", teacher_accuracy=[0.9, 0.8])
    acc = list(fig.axes[1].get_lines()[0].get_ydata())
    assert math.isnan(acc[1]) and acc[0] == 0.55
    assert math.isnan(list(fig.axes[0].get_lines()[1].get_ydata())[2])
    assert labels(fig.axes[1])[1:] == ["teacher 1 (90.0%)", "teacher 2 (80.0%)"]
    write_training_curves(tmp_path / "empty.png", history=[], method="kd")
    assert_png(tmp_path / "empty.png")
