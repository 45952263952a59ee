"""Every method end to end through ``run_distillation`` on tiny data: artifacts, metrics, stages, resume."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from worker.engine import EngineError, TeacherInput, build_model
from worker.engine import run as run_module
from worker.engine.quantization import load_quantized
from worker.engine.trainer import load_checkpoint

from .conftest import Recorder, blobs, make_spec, run, sha256, write_npz
from .test_run import Crash, CrashAfterCheckpoint

ARTIFACTS = {"model.safetensors", "model.onnx", "metrics.json", "model_card.md", "training_curves.png"}
SMALL = {"name": "mlp", "config": {"hidden_sizes": [32]}}
IMAGE_TEACHER = {"name": "cnn2d", "config": {"channels": [8, 16]}}
IMAGE_STUDENT = {"name": "cnn2d", "config": {"channels": [4, 8]}}


def _teacher(tmp_path, data, arch, name, epochs=4) -> TeacherInput:
    result = run(tmp_path, make_spec(student=arch, epochs=epochs), data, name=name, job_id=f"job_{name}")
    path = result.artifacts["model.safetensors"]
    return TeacherInput(arch, path, sha256(path))


@pytest.fixture
def image_file(tmp_path):
    x, y = blobs(features=16)
    return write_npz(tmp_path / "images.npz", x=x.reshape(-1, 1, 4, 4), y=y)


@pytest.fixture
def image_teacher(tmp_path, image_file):
    return _teacher(tmp_path, image_file, IMAGE_TEACHER, "image_teacher")


def _history(result) -> list[dict]:
    return json.loads(result.artifacts["metrics.json"].read_text())["history"]


def _onnx_logits(result, x):
    session = ort.InferenceSession(str(result.artifacts["model.onnx"]), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"x": x})[0]


@pytest.mark.parametrize(
    ("method", "terms"),
    [
        ({"type": "dkd", "warmup_epochs": 1, "beta": 2.0}, {"ce", "tckd", "nckd"}),
        ({"type": "feature"}, {"ce", "kl", "hint"}),
        ({"type": "relation", "alpha": 1.0}, {"kl", "distance", "angle"}),
        (
            {"type": "attention", "pairs": [{"student": "net.1", "teacher": "net.1"}]},
            {"ce", "kl", "attention"},
        ),
    ],
    ids=lambda v: v["type"] if isinstance(v, dict) else "",
)
def test_single_teacher_methods_run_end_to_end(tmp_path, blob_file, blob_teacher, method, terms):
    result = run(tmp_path, make_spec(student=SMALL, method=method), blob_file, teachers=[blob_teacher])
    s = result.summary
    assert result.status == "succeeded" and set(result.artifacts) == ARTIFACTS
    assert set(_history(result)[-1]["losses"]) == terms
    assert s["val_accuracy"] > 0.5 and s["agreement"] > 0.5 and s["teacher_cache"] == "built"
    assert s["onnx_max_abs_diff"] < 1e-4
    # The exported weights are exactly the architecture: no regressors, no hooks.
    plain = build_model(SMALL, (12,), 4)
    assert set(load_file(str(result.artifacts["model.safetensors"]))) == set(plain.state_dict())


def test_multi_teacher_with_different_architectures_and_confidence_fusion(tmp_path, blob_file, blob_teacher):
    cnn = _teacher(tmp_path, blob_file, {"name": "cnn1d", "config": {"channels": 8, "num_layers": 2}}, "cnn")
    spec = make_spec(student=SMALL, method={"type": "multi_teacher", "fusion": "confidence", "alpha": 0.7})
    result = run(tmp_path, spec, blob_file, teachers=[blob_teacher, cnn])
    s = result.summary
    assert len(s["teacher_accuracy"]) == 2 and s["teacher_ensemble_accuracy"] is not None
    assert s["val_accuracy"] > 0.5 and len(s["agreement_per_teacher"]) == 2
    with pytest.raises(EngineError) as err:
        run(tmp_path, spec, blob_file, name="one", teachers=[blob_teacher])
    assert err.value.param == "teachers"


def test_feature_pairs_on_conv_maps_cached_or_fresh(tmp_path, image_file, image_teacher, monkeypatch):
    pairs = [{"student": "net.3", "teacher": "net.3"}, {"student": "embedding", "teacher": "net.6"}]
    spec = make_spec(student=IMAGE_STUDENT, method={"type": "feature", "pairs": pairs, "alpha": 0.7})
    cached = run(tmp_path, spec, image_file, name="cached", teachers=[image_teacher])
    assert cached.summary["teacher_cache"] == "built"
    rec = Recorder()
    monkeypatch.setattr(run_module, "_FEATURE_CACHE_LIMIT", 0)  # over budget: the teacher runs every step
    fresh = run(tmp_path, spec, image_file, name="fresh", teachers=[image_teacher], callbacks=[rec])
    assert fresh.summary["teacher_cache"] == "fresh"
    assert any("exceed the cache budget" in m for m in rec.messages())
    # fp16 cache vs fp32 fresh features: the same training up to rounding.
    assert fresh.summary["val_accuracy"] == pytest.approx(cached.summary["val_accuracy"], abs=0.05)
    assert cached.summary["val_accuracy"] > 0.5
    spec["method"]["pairs"] = [{"student": "net.3", "teacher": "net.42"}]
    with pytest.raises(EngineError) as err:
        run(tmp_path, spec, image_file, name="bad", teachers=[image_teacher])
    assert err.value.param == "method.pairs[0].teacher" and "net.42" in err.value.message


def test_attention_on_conv_maps_of_different_sizes(tmp_path, image_file, image_teacher):
    # Student stage 1 ends in a 2x2 pool, the teacher's ReLU before its pool is 4x4: pooled to 2x2.
    pairs = [{"student": "net.3", "teacher": "net.2"}, {"student": "net.6", "teacher": "net.6"}]
    spec = make_spec(student=IMAGE_STUDENT, method={"type": "attention", "pairs": pairs, "beta": 50.0})
    result = run(tmp_path, spec, image_file, teachers=[image_teacher])
    assert result.status == "succeeded" and result.summary["val_accuracy"] > 0.5
    assert _history(result)[-1]["losses"]["attention"] > 0


def test_self_distill_reports_every_exit_and_exports_the_plain_network(tmp_path, blob_file):
    arch = {"name": "mlp", "config": {"hidden_sizes": [32, 16, 8]}}
    result = run(tmp_path, make_spec(student=arch, method={"type": "self_distill"}, baseline=True), blob_file)
    s = result.summary
    rows = _history(result)
    assert all(set(r["method_metrics"]["exit_accuracy"]) == {"net.1", "net.3", "final"} for r in rows)
    assert s["method_metrics"]["exit_accuracy"]["final"] == s["val_accuracy"] > 0.5
    assert set(rows[-1]["losses"]) == {"ce", "exit_ce", "exit_kl", "exit_feature"}
    assert (
        s["baseline_accuracy"] is not None and s["teacher_accuracy"] == []
    )  # teacherless, baseline still runs
    assert set(load_file(str(result.artifacts["model.safetensors"]))) == set(
        build_model(arch, (12,), 4).state_dict()
    )


def test_born_again_generations(tmp_path, blob_file):
    spec = make_spec(student=SMALL, method={"type": "self_distill", "generations": 2}, epochs=2)
    result = run(tmp_path, spec, blob_file)
    s = result.summary
    assert [st["name"] for st in s["stages"]] == ["generation 1", "generation 2"]
    assert (
        all(st["val_accuracy"] > 0.5 for st in s["stages"])
        and s["stages"][1]["val_accuracy"] == s["val_accuracy"]
    )
    assert s["agreement"] is not None  # the final generation agrees with the one before
    metrics = json.loads(result.artifacts["metrics.json"].read_text())
    assert [r["phase"] for r in metrics["stage_history"]["generation 1"]] == ["generation_1"] * 2
    assert "born_again_kl" in metrics["history"][-1]["losses"]


def test_teacher_assistant_chain_reports_every_link(tmp_path, blob_file, blob_teacher):
    method = {"type": "teacher_assistant", "assistants": [{"name": "mlp", "config": {"hidden_sizes": [32]}}],
              "assistant_epochs": 3}  # fmt: skip
    result = run(tmp_path, make_spec(student={"name": "mlp", "config": {"hidden_sizes": [8]}}, method=method),
                 blob_file, teachers=[blob_teacher])  # fmt: skip
    s = result.summary
    assert [(st["name"], st["epochs"]) for st in s["stages"]] == [("assistant 1", 3), ("student", 3)]
    assert s["stages"][0]["architecture"]["config"]["hidden_sizes"] == [32]
    assert s["stages"][1]["val_accuracy"] == s["val_accuracy"] > 0.5
    meta = json.loads(result.artifacts["metrics.json"].read_text())
    assert len(meta["stage_history"]["assistant 1"]) == 3
    with pytest.raises(EngineError) as err:
        bad = {**method, "assistants": [{"name": "mlp", "config": {"width": 3}}]}
        run(tmp_path, make_spec(method=bad), blob_file, name="bad", teachers=[blob_teacher])
    assert err.value.param == "method.assistants[0].config.width"


@pytest.mark.parametrize("crash_stage", ["assistant_1", "train"])
def test_chain_resumes_in_the_stage_it_crashed_in(tmp_path, blob_file, blob_teacher, crash_stage):
    method = {"type": "teacher_assistant", "assistants": [{"name": "mlp", "config": {"hidden_sizes": [24]}}]}
    spec = make_spec(student={"name": "mlp", "config": {"hidden_sizes": [8], "dropout": 0.1}}, method=method)

    class CrashIn(CrashAfterCheckpoint):
        def on_checkpoint(self, state, path):
            if state.phase == crash_stage and state.epoch == 2:
                raise Crash()

    full = run(tmp_path, spec, blob_file, name="full", teachers=[blob_teacher])
    with pytest.raises(Crash):
        run(tmp_path, spec, blob_file, name="a1", teachers=[blob_teacher], callbacks=[CrashIn(0)])
    ckpt = load_checkpoint(tmp_path / "a1" / "checkpoint.pt")
    assert (
        ckpt["stage"] == (0 if crash_stage == "assistant_1" else 1) and len(ckpt["stages"]) == ckpt["stage"]
    )
    rec = Recorder()
    resumed = run(tmp_path, spec, blob_file, name="a2", teachers=[blob_teacher], callbacks=[rec],
                  resume_from=tmp_path / "a1" / "checkpoint.pt")  # fmt: skip
    assert ("stage restored from checkpoint" in rec.messages()) == (crash_stage == "train")
    assert next((r["phase"], r["epoch"]) for r in rec.epoch_rows) == (crash_stage, 3)
    a, b = (load_file(str(r.artifacts["model.safetensors"])) for r in (full, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert resumed.summary["stages"] == full.summary["stages"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_exports_integer_weights_and_a_float_model(tmp_path, blob_file, blob_teacher, bits):
    arch = {
        "name": "mlp",
        "config": {"hidden_sizes": [64, 32]},
    }  # big enough for weights to outweigh the header
    spec = make_spec(student=arch, method={"type": "quantization", "bits": bits})
    result = run(tmp_path, spec, blob_file, teachers=[blob_teacher])
    s, mm = result.summary, result.summary["method_metrics"]
    name = f"model_int{bits}.safetensors"
    assert set(result.artifacts) == ARTIFACTS | {name}
    assert mm["bits"] == bits and mm["quantized_accuracy"] == s["val_accuracy"] > 0.5
    assert abs(mm["float_accuracy"] - mm["quantized_accuracy"]) < 0.1
    assert mm["quantized_bytes"] == result.artifacts[name].stat().st_size < mm["float_bytes"]
    # The integer file dequantises to exactly the exported float weights.
    state, meta = load_quantized(result.artifacts[name])
    assert meta["bits"] == bits and "dequantize" in meta and meta["architecture"]["name"] == "mlp"
    exported = load_file(str(result.artifacts["model.safetensors"]))
    assert set(state) == set(exported)
    for k in exported:
        torch.testing.assert_close(state[k], exported[k], rtol=0, atol=1e-6)
    model = build_model(arch, (12,), 4)
    model.load_state_dict(state)
    x, _y = blobs()
    with torch.inference_mode():
        ours = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_logits(result, x), ours, atol=1e-4)
    qmax = 2 ** (bits - 1) - 1
    raw = load_file(str(result.artifacts[name]))
    if bits == 8:
        assert raw["net.0.weight"].dtype == torch.int8 and raw["net.0.weight"].abs().max() == qmax
    else:
        assert raw["net.0.weight"].dtype == torch.uint8 and raw["net.0.weight"].numel() == 64 * 12 // 2


def _cross_modal_data(n: int, seed: int = 0):
    """The teacher's modality: a 4x4 one-channel image; the student's: a permuted, noised vector of it."""
    x, y = blobs(n=n, features=16, seed=seed)
    rng = np.random.default_rng(1)
    perm = rng.permutation(16)
    vec = x[:, perm] + rng.normal(0, 0.3, size=x.shape).astype(np.float32)
    return x.reshape(-1, 1, 4, 4), vec.astype(np.float32), y


def test_cross_modal_learns_from_the_teacher_alone_without_labels(tmp_path):
    images, vectors, y = _cross_modal_data(600)
    teacher_file = write_npz(tmp_path / "t.npz", x=images[:400], y=y[:400])
    teacher = _teacher(tmp_path, teacher_file, IMAGE_TEACHER, "modal_teacher", epochs=5)
    train = write_npz(tmp_path / "train.npz", x=vectors[:400], x_teacher=images[:400])  # no 'y'
    val = write_npz(tmp_path / "val.npz", x=vectors[400:], x_teacher=images[400:], y=y[400:])
    result = run(tmp_path, make_spec(student=SMALL, method={"type": "cross_modal"}, epochs=6), train,
                 validation=val, teachers=[teacher])  # fmt: skip
    s = result.summary
    assert s["num_classes"] == 4 and s["input_shape"] == [16]
    assert s["val_accuracy"] > 0.7 and s["agreement"] > 0.7  # chance is 0.25, no label was seen
    assert set(_history(result)[-1]["losses"]) == {"kl"}
    # Without labels anywhere only agreement can be measured; the class count comes from the teacher's head.
    no_y = write_npz(tmp_path / "val_no_y.npz", x=vectors[400:], x_teacher=images[400:])
    raw = TeacherInput(IMAGE_TEACHER, teacher.weights_path, teacher.sha256)
    blind = run(tmp_path, make_spec(student=SMALL, method={"type": "cross_modal"}, epochs=2), train,
                name="blind", validation=no_y, teachers=[raw])  # fmt: skip
    assert blind.summary["val_accuracy"] is None and blind.summary["agreement"] > 0.3
    with pytest.raises(EngineError) as err:  # alpha < 1 needs the labels
        run(tmp_path, make_spec(method={"type": "cross_modal", "alpha": 0.5}), train, name="ce",
            validation=val, teachers=[teacher])  # fmt: skip
    assert err.value.code == "invalid_data" and err.value.param == "train_file"
    with pytest.raises(EngineError) as err:  # the teacher's modality is required
        run(tmp_path, make_spec(method={"type": "cross_modal"}), teacher_file, name="nox", teachers=[teacher])
    assert err.value.code == "invalid_data" and "x_teacher" in err.value.message
