"""End-to-end runs: artifacts, metrics, errors, cancel, checkpoint/resume, teacher cache."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from worker.engine import (
    CancelCallback,
    CheckpointCallback,
    EngineError,
    ProgressCallback,
    TeacherInput,
    read_model_metadata,
)
from worker.engine.architectures import CNN1d
from worker.engine.trainer import load_checkpoint

from .conftest import Recorder, blobs, make_spec, run, sha256, write_npz

ARTIFACTS = {"model.safetensors", "model.onnx", "metrics.json", "model_card.md", "training_curves.png"}
SUMMARY_KEYS = {
    "val_accuracy",
    "teacher_accuracy",
    "student_params",
    "teacher_params",
    "student_bytes",
    "agreement",
    "compression_ratio",
    "speedup",
    "student_latency_ms",
    "teacher_latency_ms",
    "baseline_accuracy",
    "kd_gain",
    "gap_recovered",
    "phases",
    "num_classes",
    "input_shape",
    "epochs_completed",
}


def test_supervised_run_writes_artifacts(tmp_path, blob_file):
    rec = Recorder()
    result = run(tmp_path, make_spec(epochs=2), blob_file, callbacks=[rec])
    assert result.status == "succeeded"
    assert set(result.artifacts) == ARTIFACTS and all(p.is_file() for p in result.artifacts.values())
    s = result.summary
    assert SUMMARY_KEYS <= set(s)
    assert s["teacher_accuracy"] == [] and s["agreement"] is None and s["compression_ratio"] is None
    assert s["epochs_completed"] == 2 and s["num_classes"] == 4 and s["input_shape"] == [12]
    assert s["val_accuracy"] > 0.8  # the blobs are easy
    assert {"load", "teacher_cache", "train", "export"} <= set(s["phases"])

    metrics = json.loads(result.artifacts["metrics.json"].read_text())
    assert metrics["summary"]["val_accuracy"] == s["val_accuracy"]
    row = metrics["history"][-1]
    assert {"epoch", "train_loss", "losses", "val_accuracy", "teacher_agreement", "seconds"} <= set(row)
    assert set(row["losses"]) == {"ce"} and row == rec.epoch_rows[-1]

    meta = read_model_metadata(result.artifacts["model.safetensors"])
    assert meta["job_id"] == "job_test" and meta["num_classes"] == 4 and meta["input_shape"] == [12]
    assert meta["architecture"]["name"] == "mlp" and meta["method"] == {"type": "supervised"}
    assert s["student_bytes"] == result.artifacts["model.safetensors"].stat().st_size

    # The ONNX model agrees with the saved weights on a dynamic batch.
    x, _ = blobs()
    session = ort.InferenceSession(str(result.artifacts["model.onnx"]), providers=["CPUExecutionProvider"])
    assert session.run(["logits"], {"x": x[:7]})[0].shape == (7, 4)
    assert s["onnx_max_abs_diff"] < 1e-4
    card = result.artifacts["model_card.md"].read_text()
    assert "## Intended use and limitations" in card and "mlp" in card


def test_kd_run_reports_teacher_metrics_and_baseline(tmp_path, blob_file, blob_teacher):
    spec = make_spec(
        method={"type": "kd", "temperature": 2.0, "alpha": 0.7},
        baseline=True,
        student={"name": "mlp", "config": {"hidden_sizes": [8]}},
    )
    reports = []
    rec = Recorder()
    result = run(
        tmp_path,
        spec,
        blob_file,
        teachers=[blob_teacher],
        callbacks=[rec, ProgressCallback(reports.append, min_interval_s=0.0)],
    )
    s = result.summary
    assert result.status == "succeeded"
    assert len(s["teacher_accuracy"]) == 1 and s["teacher_accuracy"][0] > 0.8
    assert 0.0 <= s["agreement"] <= 1.0
    assert s["compression_ratio"] == pytest.approx(s["teacher_params"][0] / s["student_params"])
    assert s["speedup"] > 0 and s["teacher_latency_ms"][0] > 0
    assert s["baseline_accuracy"] is not None
    assert s["kd_gain"] == pytest.approx(100 * (s["val_accuracy"] - s["baseline_accuracy"]))
    assert s["teacher_cache"] == "built"
    assert set(rec.epoch_rows[0]["losses"]) == {"ce", "kl"}
    assert "teacher evaluated" in rec.messages() and "teacher cache built" in rec.messages()
    metrics = json.loads(result.artifacts["metrics.json"].read_text())
    assert len(metrics["history"]) == 3 and len(metrics["baseline_history"]) == 3
    assert {r["phase"] for r in metrics["history"]} == {"train"}
    assert {r["phase"] for r in metrics["baseline_history"]} == {"baseline"}
    assert "baseline" in metrics["phases"]
    # One monotone progress fraction across the KD run and the baseline run.
    fractions = [r["fraction"] for r in reports]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {r["phase"] for r in reports} == {"train", "baseline"}
    assert any(r["metrics"] is not None for r in reports)
    card = result.artifacts["model_card.md"].read_text()
    assert "baseline" in card and "![Loss terms and validation accuracy by epoch](training_curves.png)" in card
    with Image.open(result.artifacts["training_curves.png"]) as img:
        img.load()
        assert img.format == "PNG" and img.size == (1100, 420)


def test_kd_student_on_digits_beats_chance(tmp_path):
    teacher_arch = {"name": "mlp", "config": {"hidden_sizes": [128]}}
    teacher = run(
        tmp_path,
        make_spec(student=teacher_arch, epochs=12, batch_size=64, validation_fraction=0.2),
        "builtin:digits",
        name="teacher",
        job_id="job_t",
    )
    path = teacher.artifacts["model.safetensors"]
    assert teacher.summary["val_accuracy"] > 0.9
    spec = make_spec(
        student={"name": "mlp", "config": {"hidden_sizes": [16]}},
        method={"type": "kd", "temperature": 4.0, "alpha": 0.9},
        epochs=12,
        batch_size=64,
        validation_fraction=0.2,
    )
    result = run(tmp_path, spec, "builtin:digits", teachers=[TeacherInput(teacher_arch, path, sha256(path))])
    s = result.summary
    assert s["val_accuracy"] > 0.8  # chance is 0.1
    assert s["agreement"] > 0.8
    assert s["compression_ratio"] > 5


def test_teacher_runs_once_per_run_not_per_epoch(tmp_path, blob_file, monkeypatch):
    # A cnn1d teacher over [N, 12] rows, so its forward calls can be counted by class.
    x, _ = blobs()
    arch = {"name": "cnn1d", "config": {"channels": 4, "num_layers": 2, "kernel_size": 3}}
    teacher = run(tmp_path, make_spec(student=arch, epochs=1), blob_file, name="t", job_id="job_t")
    t_input = TeacherInput(arch, teacher.artifacts["model.safetensors"], "")
    calls = []
    original = CNN1d.forward_features
    monkeypatch.setattr(CNN1d, "forward_features", lambda self, x: calls.append(len(x)) or original(self, x))
    spec = make_spec(method={"type": "kd", "temperature": 2.0, "alpha": 0.5})
    counts = {}
    for epochs in (1, 4):
        calls.clear()
        run(
            tmp_path,
            {**spec, "hyperparameters": {**spec["hyperparameters"], "epochs": epochs}},
            blob_file,
            name=f"s{epochs}",
            teachers=[t_input],
        )
        counts[epochs] = list(calls)
    assert counts[1] == counts[4]  # teacher work does not grow with epochs
    assert sum(counts[1][:2]) == len(x)  # one pass over the train rows (320) and the val rows (80)


def test_teacher_cache_on_disk_is_reused(tmp_path, blob_file, blob_teacher):
    spec = make_spec(method={"type": "kd", "temperature": 2.0, "alpha": 0.5})
    first_rec, second_rec = Recorder(), Recorder()
    first = run(
        tmp_path,
        spec,
        blob_file,
        name="a",
        teachers=[blob_teacher],
        cache_dir=tmp_path / "cache",
        callbacks=[first_rec],
    )
    second = run(
        tmp_path,
        spec,
        blob_file,
        name="b",
        teachers=[blob_teacher],
        cache_dir=tmp_path / "cache",
        callbacks=[second_rec],
    )
    assert first.summary["teacher_cache"] == "built" and second.summary["teacher_cache"] == "hit"
    assert "teacher cache hit" in second_rec.messages()
    assert second.summary["val_accuracy"] == first.summary["val_accuracy"]
    assert second.summary["teacher_accuracy"] == first.summary["teacher_accuracy"]


def test_teacher_architecture_can_come_from_model_metadata(tmp_path, blob_file, blob_teacher):
    # A from_job teacher: the engine's own model.safetensors names its architecture.
    from_job = TeacherInput({}, blob_teacher.weights_path, blob_teacher.sha256)
    result = run(
        tmp_path,
        make_spec(method={"type": "kd", "temperature": 2.0, "alpha": 0.5}),
        blob_file,
        teachers=[from_job],
    )
    assert result.summary["teacher_accuracy"][0] > 0.8


def test_teacher_is_not_modified_by_training(tmp_path, blob_file, blob_teacher):
    before = load_file(str(blob_teacher.weights_path))
    run(
        tmp_path,
        make_spec(method={"type": "kd", "temperature": 2.0, "alpha": 0.5}),
        blob_file,
        teachers=[blob_teacher],
    )
    after = load_file(str(blob_teacher.weights_path))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_teacher_weights_mismatch_fails_the_job(tmp_path, blob_file, blob_teacher):
    wrong = TeacherInput(
        {"name": "mlp", "config": {"hidden_sizes": [32, 64]}}, blob_teacher.weights_path, "x"
    )
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(method={"type": "kd"}), blob_file, teachers=[wrong])
    assert err.value.code == "weights_mismatch"
    assert str(err.value) == "teacher 0: key 'net.0.weight' has shape [64, 12], architecture expects [32, 12]"


def test_spec_errors(tmp_path, blob_file, blob_teacher):
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(method={"type": "distill_harder"}), blob_file, teachers=[blob_teacher])
    assert (err.value.code, err.value.param) == ("invalid_spec", "method.type")
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(method={"type": "kd"}), blob_file)
    assert (err.value.code, err.value.param) == ("invalid_spec", "teachers")
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(optimizer="lion"), blob_file)
    assert (err.value.code, err.value.param) == ("invalid_spec", "hyperparameters.optimizer")
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(warmup=3), blob_file)
    assert (err.value.code, err.value.param) == ("invalid_spec", "hyperparameters.warmup")
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(student={"name": "mlp", "config": {"width": 3}}), blob_file)
    assert (err.value.code, err.value.param) == ("invalid_architecture", "student.architecture.config.width")


def test_huge_learning_rate_fails_with_non_finite_loss(tmp_path, blob_file):
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(learning_rate=1e30, optimizer="sgd"), blob_file)
    assert err.value.code == "non_finite_loss"
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_inf_in_data_fails_with_non_finite_loss(tmp_path, blob_teacher):
    x, y = blobs()
    x[::7, 3] = np.inf  # in rows of both splits
    path = write_npz(tmp_path / "inf.npz", x=x, y=y)
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(epochs=1), path)
    assert err.value.code == "non_finite_loss"
    with pytest.raises(EngineError) as err:  # with a teacher it is caught while caching its logits
        run(tmp_path, make_spec(method={"type": "kd"}), path, teachers=[blob_teacher])
    assert err.value.code == "non_finite_loss"


def test_cancel_stops_without_artifacts(tmp_path, blob_file):
    polls = []

    def is_cancelled():
        polls.append(1)
        return len(polls) >= 4  # cancelled a few steps into the first epoch

    rec = Recorder()
    result = run(
        tmp_path, make_spec(epochs=50), blob_file, callbacks=[rec, CancelCallback(is_cancelled, 0.0)]
    )
    assert result.status == "cancelled"
    assert result.artifacts == {}
    assert result.summary["epochs_completed"] == 0
    out = tmp_path / "out"
    assert not any((out / name).exists() for name in ARTIFACTS)
    assert ("train_end", "train") not in rec.events


def test_cancel_after_an_epoch_keeps_the_checkpoint_but_writes_no_artifacts(tmp_path, blob_file):
    class CancelAtEpoch2(CancelCallback):
        def on_epoch_end(self, state):
            if state.epoch == 2:
                state.should_stop = True

    result = run(
        tmp_path,
        make_spec(epochs=10),
        blob_file,
        callbacks=[CheckpointCallback(), CancelAtEpoch2(lambda: False)],
    )
    assert result.status == "cancelled" and result.summary["epochs_completed"] == 2
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["epoch"] == 2
    assert not any((tmp_path / "out" / name).exists() for name in ARTIFACTS)


class Crash(Exception):
    pass


class CrashAfterCheckpoint(CheckpointCallback):
    """Simulates a worker dying right after the checkpoint of epoch ``at`` reached storage."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_checkpoint(self, state, path):
        if state.epoch == self.at:
            raise Crash()


def _weights(result):
    return load_file(str(result.artifacts["model.safetensors"]))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, blob_file):
    # Dropout and a cosine schedule make the test sensitive to RNG and scheduler restore.
    spec = make_spec(epochs=4, student={"name": "mlp", "config": {"hidden_sizes": [32], "dropout": 0.2}})
    full = run(tmp_path, spec, blob_file, name="full", callbacks=[CheckpointCallback()])

    with pytest.raises(Crash):
        run(tmp_path, spec, blob_file, name="attempt1", callbacks=[CrashAfterCheckpoint(at=2)])
    checkpoint = tmp_path / "attempt1" / "checkpoint.pt"
    assert load_checkpoint(checkpoint)["epoch"] == 2
    assert not list((tmp_path / "attempt1").glob("*.tmp"))

    rec = Recorder()
    resumed = run(
        tmp_path,
        spec,
        blob_file,
        name="attempt2",
        resume_from=checkpoint,
        callbacks=[rec, CheckpointCallback()],
    )
    assert "resuming from checkpoint" in rec.messages()
    assert [r["epoch"] for r in rec.epoch_rows] == [3, 4]  # only the remaining epochs ran
    _assert_same_weights(_weights(full), _weights(resumed))
    full_hist = json.loads(full.artifacts["metrics.json"].read_text())["history"]
    resumed_hist = json.loads(resumed.artifacts["metrics.json"].read_text())["history"]
    assert [h["val_accuracy"] for h in full_hist] == [h["val_accuracy"] for h in resumed_hist]
    assert [h["train_loss"] for h in full_hist] == pytest.approx([h["train_loss"] for h in resumed_hist])


def test_resume_two_epochs_to_four_with_constant_schedule(tmp_path, blob_file):
    # With a constant schedule a 2-epoch run is exactly the first half of a 4-epoch run,
    # so extending it through its checkpoint must land on the same weights.
    spec2 = make_spec(epochs=2, scheduler="constant", optimizer="sgd", learning_rate=0.05)
    spec4 = make_spec(epochs=4, scheduler="constant", optimizer="sgd", learning_rate=0.05)
    first = run(tmp_path, spec2, blob_file, name="two", callbacks=[CheckpointCallback()])
    assert first.summary["epochs_completed"] == 2
    resumed = run(
        tmp_path,
        spec4,
        blob_file,
        name="resumed",
        resume_from=tmp_path / "two" / "checkpoint.pt",
        callbacks=[CheckpointCallback()],
    )
    full = run(tmp_path, spec4, blob_file, name="four")
    assert resumed.summary["epochs_completed"] == 4
    _assert_same_weights(_weights(full), _weights(resumed))


def test_checkpoint_holds_only_plain_data(tmp_path, blob_file):
    run(tmp_path, make_spec(epochs=1, optimizer="adamw"), blob_file, callbacks=[CheckpointCallback()])
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint.pt")  # weights_only=True inside
    assert {"student", "optimizer", "scheduler", "rng", "epoch", "history"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1


def test_checkpoint_of_another_job_is_ignored(tmp_path, blob_file):
    run(
        tmp_path,
        make_spec(epochs=1),
        blob_file,
        name="other",
        job_id="job_other",
        callbacks=[CheckpointCallback()],
    )
    rec = Recorder()
    result = run(
        tmp_path,
        make_spec(epochs=2),
        blob_file,
        resume_from=tmp_path / "other" / "checkpoint.pt",
        callbacks=[rec],
    )
    assert any("another job" in m for m in rec.messages())
    assert [r["epoch"] for r in rec.epoch_rows] == [1, 2]
    assert result.status == "succeeded"


def test_progress_is_throttled(tmp_path, blob_file):
    reports = []
    run(
        tmp_path,
        make_spec(epochs=3, batch_size=8),
        blob_file,
        callbacks=[ProgressCallback(reports.append, min_interval_s=3600)],
    )
    # Train begin, one per epoch end, train end; the 40 steps per epoch add none.
    assert len(reports) == 1 + 3 + 1
    assert [r["epoch"] for r in reports] == [0, 1, 2, 3, 3]
    assert reports[-1]["fraction"] == 1.0 and reports[-1]["epochs"] == 3
    assert reports[1]["metrics"]["epoch"] == 1


def test_explicit_validation_file_and_transformer_tokens(tmp_path):
    rng = np.random.default_rng(0)
    # Class = whether token 7 appears: learnable by attention over a small vocabulary.
    x = rng.integers(0, 20, size=(300, 10))
    x[x == 7] = 8
    y = rng.integers(0, 2, size=300)
    x[y == 1, rng.integers(0, 10, size=(y == 1).sum())] = 7
    train = write_npz(tmp_path / "train.npz", x=x[:240].astype(np.int32), y=y[:240])
    val = write_npz(tmp_path / "val.npz", x=x[240:].astype(np.int32), y=y[240:])
    arch = {"name": "transformer", "config": {"d_model": 16, "n_heads": 2, "n_layers": 1, "vocab_size": 20}}
    result = run(
        tmp_path, make_spec(student=arch, epochs=6, learning_rate=0.01, batch_size=32), train, validation=val
    )
    assert result.summary["n_val"] == 60 and result.summary["input_dtype"] == "int64"
    assert result.summary["val_accuracy"] > 0.6
    session = ort.InferenceSession(str(result.artifacts["model.onnx"]), providers=["CPUExecutionProvider"])
    assert session.run(["logits"], {"x": x[:3].astype(np.int64)})[0].shape == (3, 2)

    bad = write_npz(tmp_path / "bad.npz", x=np.full((20, 10), 25), y=np.arange(20) % 2)
    with pytest.raises(EngineError) as err:
        run(tmp_path, make_spec(student=arch, epochs=1), bad)
    assert err.value.code == "invalid_data" and "vocab_size=20" in str(err.value)
