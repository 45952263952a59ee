"""Augmentation and teacher outputs: what each augmentation does, that the teacher scores the
student's exact batch, that a pool is deterministic, and that bad combinations fail naming the field."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from worker.engine import EngineError, RunInputs, TeacherInput, build_model, recipe, run_distillation
from worker.engine.augment import epoch_generator, parse_augmentation, pool_views
from worker.engine.callbacks import CallbackList, TrainState
from worker.engine.methods import parse_method
from worker.engine.trainer import Split, TrainConfig, fit
from worker.engine.weights import freeze, save_model

CPU = torch.device("cpu")


def pipeline(raw, shape=(12,), classes=3, floating=True, std=1.0):
    return parse_augmentation(raw, sample_shape=shape, floating=floating, num_classes=classes, input_std=std)


def test_mixup_blends_rows_and_labels_with_the_same_weight():
    x = torch.eye(8) * 10
    y = torch.arange(8) % 3
    xo, yo = pipeline("mixup", shape=(8,))(x, y, epoch_generator(0, 0, CPU))
    assert torch.allclose(yo.sum(1), torch.ones(8))
    # Each output row is λ·x_i + (1-λ)·x_j, so its mass splits between two one-hot rows like its label does.
    assert torch.allclose(xo.sum(1), torch.full((8,), 10.0))
    lam = xo.max(1).values / 10
    assert torch.all(lam >= 0.5 - 1e-6)  # the larger share, whichever row it belongs to


def test_cutmix_labels_follow_the_pasted_area():
    x = torch.zeros(6, 1, 8, 8)
    x[3:] = 1.0
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    aug = pipeline({"type": "cutmix", "alpha": 1.0}, shape=(1, 8, 8), classes=2)
    compared = 0
    for epoch in range(5):
        xo, yo = aug(x, y, epoch_generator(0, epoch, CPU))
        # Where a row's partner differs in class, its pixel mean is exactly the pasted fraction.
        pasted = torch.where(y == 0, xo.mean((1, 2, 3)), 1 - xo.mean((1, 2, 3)))
        label_share = torch.where(y == 0, yo[:, 1], yo[:, 0])
        differs = pasted > 0
        assert torch.allclose(pasted[differs], label_share[differs], atol=1e-6)
        compared += int(differs.sum())
    assert compared > 0  # some rows really got a box from the other class


def test_shift_moves_rows_and_fills_zeros_and_works_on_token_ids():
    x = torch.arange(1, 11).repeat(50, 1)
    xo, _ = pipeline({"type": "shift", "max_shift": 3}, shape=(10,), floating=False)(
        x, None, epoch_generator(1, 0, CPU)
    )
    assert xo.dtype == torch.int64
    for row in xo:
        nz = row[row != 0]
        assert torch.all(nz[1:] - nz[:-1] == 1) and len(nz) >= 7  # a contiguous window, at most 3 cut off
    assert len({tuple(r.tolist()) for r in xo}) > 1


def test_noise_is_scaled_by_the_input_std_and_refuses_token_ids():
    x = torch.zeros(2000, 4)
    xo, _ = pipeline({"type": "noise", "std": 0.5}, shape=(4,), std=4.0)(x, None, epoch_generator(0, 0, CPU))
    assert abs(float(xo.std()) - 2.0) < 0.1
    with pytest.raises(EngineError) as err:
        pipeline("noise", floating=False)
    assert err.value.param == "augmentation"
    with pytest.raises(EngineError) as err:
        pipeline(["shift", "blur"])
    assert err.value.param == "augmentation" and "blur" in str(err.value)
    with pytest.raises(EngineError) as err:
        pipeline([{"type": "mixup", "alpha": -1}])
    assert err.value.param == "augmentation[0].alpha"


def test_same_seed_same_draws_other_epoch_other_draws():
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    aug = pipeline(["shift", "mixup", "noise"])
    a = aug(x, y, epoch_generator(3, 1, CPU))
    b = aug(x, y, epoch_generator(3, 1, CPU))
    c = aug(x, y, epoch_generator(3, 2, CPU))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


class InputSpy:
    """Records the input of every forward call of a module."""

    def __init__(self, module):
        self.inputs = []
        module.register_forward_hook(lambda m, args, out: self.inputs.append(args[0].detach().clone()))


def test_the_teacher_scores_exactly_the_augmented_batch_the_student_trains_on():
    torch.manual_seed(0)
    x, y = torch.randn(200, 12), torch.randint(0, 3, (200,))
    teacher = freeze(build_model({"name": "mlp", "config": {"hidden_sizes": [16]}}, (12,), 3))
    student = build_model({"name": "mlp", "config": {"hidden_sizes": [8]}}, (12,), 3)
    teacher_spy, student_spy = InputSpy(teacher), InputSpy(student)
    fit(
        student=student,
        loss_fn=parse_method({"type": "kd", "temperature": 1.0, "alpha": 1.0}, 3, 1),
        teachers=[teacher],
        teacher_weights=[1.0],
        train=Split(x, y, teacher_x=[x]),
        val=Split(x[:20], y[:20]),
        val_reference=None,
        config=TrainConfig(epochs=2, batch_size=64),
        state=TrainState(job_id="spy"),
        callbacks=CallbackList([]),
        device=CPU,
        augmentation=pipeline(["shift", "mixup", "noise"]),
    )
    # Validation also runs the student (unaugmented); training calls come first in each epoch.
    train_calls = [t for t in student_spy.inputs if len(t) != 20]
    assert len(teacher_spy.inputs) == len(train_calls) == 2 * 4
    for seen_by_teacher, seen_by_student in zip(teacher_spy.inputs, train_calls):
        assert torch.equal(seen_by_teacher, seen_by_student)
    assert not any(torch.equal(t, x[: len(t)]) for t in train_calls)  # really augmented


def test_pool_views_are_deterministic_under_a_seed_and_differ_between_views():
    torch.manual_seed(0)
    x, y = torch.randn(100, 12), torch.randint(0, 3, (100,))
    teacher = freeze(build_model({"name": "mlp", "config": {"hidden_sizes": [16]}}, (12,), 3))
    aug = pipeline(["noise", "mixup"])

    def views(seed):
        return pool_views(x, y, [teacher], [torch.float32], aug, size=3, seed=seed, device=CPU, batch_size=32,
                          autocast_context=contextlib.nullcontext)  # fmt: skip

    a, b, c = views(0), views(0), views(1)
    for (xa, ya, la), (xb, yb, lb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(la[0], lb[0])
    assert not torch.equal(a[0][0], a[1][0])  # views differ
    assert not torch.equal(a[0][0], c[0][0])  # seeds differ
    for xv, yv, (lv,) in a:  # each view's logits are the teacher's on exactly that view's inputs
        assert torch.allclose(lv.float(), teacher(xv).half().float())
        assert yv.shape == (100, 3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small 3-class problem, files and a trained teacher for run_distillation."""
    folder = tmp_path_factory.mktemp("aug")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, size=(3, 12)).astype(np.float32)
    y = rng.integers(0, 3, 600)
    x = (centres[y] + rng.normal(0, 1, size=(600, 12))).astype(np.float32)
    np.savez(folder / "train.npz", x=x[:500], y=y[:500])
    np.savez(folder / "val.npz", x=x[500:], y=y[500:])
    arch = {"name": "mlp", "config": {"hidden_sizes": [32]}}
    teacher = build_model(arch, (12,), 3)
    save_model(teacher, folder / "teacher.safetensors", {"architecture": arch})
    return folder, TeacherInput(
        architecture=arch, weights_path=folder / "teacher.safetensors", sha256="0" * 64
    )


def run(tiny, tmp_path, method=None, **spec_extra):
    folder, teacher = tiny
    spec = {
        "teachers": [{}],
        "student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [8]}}},
        "method": method or {"type": "kd"},
        "hyperparameters": {"epochs": 2, "batch_size": 64, "baseline": True},
        **spec_extra,
    }
    inputs = RunInputs(job_id="aug", spec=spec, teachers=[teacher], train_data=str(folder / "train.npz"),
                       validation_data=str(folder / "val.npz"), output_dir=tmp_path / "out")  # fmt: skip
    return run_distillation(inputs, [])


def test_pool_run_reports_mode_and_trains_the_baseline_with_the_same_augmentation(tiny, tmp_path):
    result = run(tiny, tmp_path, augmentation="mixup", teacher_outputs="pool", pool_size=2)
    assert result.summary["teacher_outputs"] == "pool"
    assert result.summary["augmentation"] == [{"type": "mixup", "alpha": 1.0}]
    assert result.summary["baseline_accuracy"] is not None


@pytest.mark.parametrize(
    ("method", "extra", "param"),
    [
        (None, {"augmentation": "mixup", "teacher_outputs": "cached"}, "teacher_outputs"),
        (None, {"teacher_outputs": "pool"}, "teacher_outputs"),
        (None, {"augmentation": "mixup", "teacher_outputs": "pool", "pool_size": 100}, "pool_size"),
        ({"type": "feature"}, {"augmentation": "mixup", "teacher_outputs": "pool"}, "teacher_outputs"),
        (None, {"teacher_outputs": "sometimes"}, "teacher_outputs"),
    ],
)
def test_inconsistent_teacher_output_settings_fail_naming_the_field(tiny, tmp_path, method, extra, param):
    with pytest.raises(EngineError) as err:
        run(tiny, tmp_path, method, **extra)
    assert err.value.code == "invalid_spec" and err.value.param == param


# --------------------------------------------------------------------------- recipe search


def test_successive_halving_keeps_the_better_half_and_stays_within_budget():
    pool = [recipe.Candidate({"method.temperature": t}) for t in (1.0, 2.0, 4.0, 8.0, 16.0)]
    quality = {1.0: 0.2, 2.0: 0.9, 4.0: 0.7, 8.0: 0.5, 16.0: 0.1}
    calls = []

    def probe(cand, epochs, rows):
        calls.append((cand.overrides["method.temperature"], epochs, rows))
        return (
            quality[cand.overrides["method.temperature"]] + 0.01 * epochs * rows
        )  # longer probes score higher

    chosen, spent = recipe.successive_halving(
        pool, budget=6.0, epochs_cap=10, probe=probe, log=lambda *a, **k: None
    )
    assert chosen.overrides == {"method.temperature": 2.0}
    assert spent <= 6.0 + 1e-9
    rounds = [len(c.rounds) for c in pool]
    assert rounds == [1, 3, 3, 2, 1]  # 5 → 3 → 2 → 1 over ⌈log2 5⌉ = 3 rounds
    assert sum(e * r for _, e, r in calls) == pytest.approx(spent)


def test_auto_alpha_is_refused_where_alpha_is_not_the_kd_mix():
    with pytest.raises(EngineError) as err:
        recipe.searched({"method": {"type": "dkd", "alpha": "auto"}})
    assert err.value.param == "method.alpha"
    grid = recipe.searched({"method": {"type": "kd", "temperature": "auto"}})
    assert grid == {"method.temperature": recipe.TEMPERATURES}
    assert recipe.searched({"method": {"type": "kd"}, "recipe": "auto"}, has_labels=False)[
        "method.alpha"
    ] == (1.0,)


def test_recipe_auto_chooses_within_budget_and_reports_every_probe(tiny, tmp_path):
    result = run(tiny, tmp_path, recipe="auto", recipe_budget=1.0)
    report = result.summary["recipe"]
    assert set(report["searched"]) == {"method.temperature", "method.alpha", "augmentation"}
    assert len(report["candidates"]) == 16
    assert 0 < report["spent_epochs"] <= report["budget_epochs"] == 2.0
    finalists = [
        c
        for c in report["candidates"]
        if len(c["rounds"]) == max(len(x["rounds"]) for x in report["candidates"])
    ]
    assert report["chosen"] in [c["settings"] for c in finalists]
    assert result.summary["baseline_accuracy"] is not None
    assert report["shipped"] in ("student", "baseline", "own-settings baseline")
    assert result.summary["val_accuracy"] >= result.summary["baseline_accuracy"]
    # A chosen augmentation other than the job's own brings the own-settings baseline, and the job beats it too.
    own = result.summary["own_settings_baseline_accuracy"]
    assert (own is not None) == (report["chosen"].get("augmentation", "none") != "none")
    assert own is None or result.summary["val_accuracy"] >= own


def test_when_no_distillation_setting_wins_the_baseline_ships_and_the_job_says_so(tiny, tmp_path):
    """A teacher that was never trained: teacher-alone KD from it loses to the baseline at every temperature."""
    result = run(tiny, tmp_path, {"type": "kd", "temperature": "auto", "alpha": 1.0})
    report = result.summary["recipe"]
    assert report["shipped"] == "baseline"
    assert result.summary["val_accuracy"] == result.summary["baseline_accuracy"]
    assert report["distilled_val_accuracy"] < result.summary["baseline_accuracy"]
    # The exported weights are the baseline's: they score its accuracy on the validation rows.
    folder, _ = tiny
    val = np.load(folder / "val.npz")
    model = build_model({"name": "mlp", "config": {"hidden_sizes": [8]}}, (12,), 3)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(result.artifacts["model.safetensors"]))
    model.eval()
    with torch.no_grad():
        acc = float(
            (model(torch.from_numpy(val["x"])).argmax(1) == torch.from_numpy(val["y"])).float().mean()
        )
    assert acc == pytest.approx(result.summary["baseline_accuracy"], abs=1e-6)


def test_a_search_that_changed_the_augmentation_also_beats_the_users_own_settings(tiny, tmp_path):
    """The search picked mixup for a job the user sent without augmentation: the final run trains the
    mixup baseline (the KD-gain yardstick) and the user's own no-augmentation baseline, and ships the best."""
    from worker.engine import run as run_module

    folder, teacher = tiny
    report = {"searched": ["augmentation"], "budget_epochs": 1.0, "spent_epochs": 1.0,
              "chosen": {"augmentation": "mixup"}, "candidates": [], "own_augmentation": None}  # fmt: skip
    spec = {
        "teachers": [{}],
        "student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [8]}}},
        # An untrained teacher and no hard labels: the distilled student loses to both baselines.
        "method": {"type": "kd", "temperature": 4.0, "alpha": 1.0},
        "hyperparameters": {"epochs": 2, "batch_size": 64, "baseline": True},
        "augmentation": "mixup",
    }
    inputs = RunInputs(job_id="own", spec=spec, teachers=[teacher], train_data=str(folder / "train.npz"),
                       validation_data=str(folder / "val.npz"), output_dir=tmp_path / "out",
                       recipe_report=report)  # fmt: skip
    events = []

    class Log(run_module.Callback):
        def on_log(self, state, level, message, data):
            events.append(message)

    result = run_module._run(inputs, [Log()])
    s = result.summary
    assert "own-settings baseline finished" in events and "baseline finished" in events
    baselines = {"baseline": s["baseline_accuracy"], "own-settings baseline": s["own_settings_baseline_accuracy"]}
    assert s["val_accuracy"] == max(s["recipe"]["distilled_val_accuracy"], *baselines.values())
    assert s["recipe"]["shipped"] == max(baselines, key=baselines.get)
    assert "own_augmentation" not in s["recipe"]
    history = json.loads(result.artifacts["metrics.json"].read_text())["history"]
    assert history  # the distilled student's own curve is kept even when a baseline ships
