"""Hugging Face transformers classifiers as teachers and students (``worker/engine/hf.py``)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from tests.engine.conftest import Recorder, make_spec, run, sha256
from tests.helpers import hf_accuracy, hf_teacher_zip, token_arrays
from worker.engine import EngineError, TeacherInput, build_model
from worker.engine.architectures import build_student, load_model
from worker.engine.export import export_onnx

transformers = pytest.importorskip("transformers")
HF = {"name": "hf", "config": {}}


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    train, test = token_arrays(600, seed=0), token_arrays(300, seed=1)
    np.savez(folder / "train.npz", **train)
    np.savez(folder / "test.npz", **test)
    return folder, train, test


@pytest.fixture(scope="module")
def bert_teacher(token_files):
    folder, train, _ = token_files
    return hf_teacher_zip(folder, "bert", train, layers=4)


def _teacher(path) -> TeacherInput:
    return TeacherInput(architecture=HF, weights_path=path, sha256=sha256(path))


def _packed(data) -> torch.Tensor:
    return torch.from_numpy(np.stack([data["input_ids"], data["attention_mask"]], axis=1))


@pytest.mark.parametrize("family", ["bert", "distilbert", "llama"])
def test_teacher_zip_loads_offline_and_matches_the_saved_model(tmp_path, token_files, family):
    _, train, test = token_files
    path = hf_teacher_zip(tmp_path, family, train, steps=60)
    teacher = load_model(HF, path, (2, 16), 3, who="teacher 0", param="teachers[0]",
                         param_prefix="teachers[0].architecture").eval()  # fmt: skip
    original = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / f"{family}-teacher")
    with torch.inference_mode():
        ours = teacher(_packed(test))
        theirs = original.eval()(input_ids=torch.from_numpy(test["input_ids"]),
                                 attention_mask=torch.from_numpy(test["attention_mask"])).logits  # fmt: skip
    torch.testing.assert_close(ours, theirs)
    # The packed [B, 2, L] input exports to ONNX like every student (the mask is part of `x`).
    info = export_onnx(teacher, _packed(test)[:8], tmp_path / "t.onnx")
    assert info["max_abs_diff"] < 1e-4


def test_student_from_teacher_layers_copies_embeddings_and_every_kth_layer(bert_teacher):
    teacher = load_model(HF, bert_teacher, (2, 16), 3, who="teacher 0", param="teachers[0]",
                         param_prefix="teachers[0].architecture")  # fmt: skip
    logs = []
    arch = {"name": "hf", "config": {"overrides": {"num_hidden_layers": 2}, "init": "teacher"}}
    student = build_student(arch, (2, 16), 3, [teacher], param_prefix="student.architecture",
                            log=lambda level, message, **data: logs.append((message, data)))  # fmt: skip
    assert student.model.config.num_hidden_layers == 2
    assert student.architecture["config"]["hf_config"]["num_hidden_layers"] == 2
    (message, data), = logs
    assert message == "student initialised from teacher"
    assert data["layers"] == {"student 0": "teacher 0", "student 1": "teacher 2"}
    t, s = teacher.model.state_dict(), student.model.state_dict()
    for key in ("bert.embeddings.word_embeddings.weight", "classifier.weight", "bert.pooler.dense.weight"):
        torch.testing.assert_close(s[key], t[key])
    torch.testing.assert_close(s["bert.encoder.layer.1.attention.self.query.weight"],
                               t["bert.encoder.layer.2.attention.self.query.weight"])  # fmt: skip
    # The resolved architecture rebuilds the same shapes by itself (what model.safetensors' metadata holds).
    rebuilt = build_model(student.architecture, (2, 16), 3)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}


@pytest.mark.parametrize(
    ("config", "param"),
    [
        ({"overrides": {"num_hidden_layers": 8}}, "student.architecture.config.overrides.num_hidden_layers"),
        ({"overrides": {"hidden_size": 48}}, "student.architecture.config.overrides.hidden_size"),
        ({"overrides": {"hidden_size": 33}, "init": "fresh"},
         "student.architecture.config.overrides.num_attention_heads"),
        ({"overrides": {"num_layerz": 1}}, "student.architecture.config.overrides.num_layerz"),
        ({"model_type": "gpt2"}, "student.architecture.config.model_type"),
        ({"model_type": "distilbert"}, "student.architecture.config.init"),
    ],
)
def test_bad_student_configs_name_the_field(bert_teacher, config, param):
    teacher = load_model(HF, bert_teacher, (2, 16), 3, who="teacher 0", param="teachers[0]",
                         param_prefix="teachers[0].architecture")  # fmt: skip
    with pytest.raises(EngineError) as err:
        build_student({"name": "hf", "config": config}, (2, 16), 3, [teacher], param_prefix="student.architecture")
    assert err.value.param == param, err.value


def test_student_without_a_hf_teacher_needs_model_type():
    with pytest.raises(EngineError) as err:
        build_student({"name": "hf", "config": {"init": "fresh"}}, (2, 16), 3, [], param_prefix="student.architecture")
    assert err.value.param == "student.architecture.config.model_type"


def test_teacher_with_wrong_label_count_or_float_data_is_refused(bert_teacher):
    with pytest.raises(EngineError, match="3 labels, the data has 5 classes"):
        load_model(HF, bert_teacher, (2, 16), 5, who="teacher 0", param="teachers[0]", param_prefix="p")
    with pytest.raises(EngineError, match="reads token data") as err:
        load_model(HF, bert_teacher, (16,), 3, who="teacher 0", param="teachers[0]", param_prefix="p")
    assert err.value.code == "invalid_data"


def test_kd_job_with_hf_teacher_and_student_writes_a_from_pretrained_zip(tmp_path, token_files, bert_teacher):
    folder, _, test = token_files
    student = {"name": "hf", "config": {"overrides": {"num_hidden_layers": 1}, "init": "teacher"}}
    spec = make_spec(student=student, method={"type": "kd", "temperature": 2.0, "alpha": 0.5},
                     teachers=[{"architecture": HF, "weights_file": "file_t"}], epochs=3, batch_size=32,
                     learning_rate=1e-3)  # fmt: skip
    rec = Recorder()
    result = run(tmp_path, spec, folder / "train.npz", validation=folder / "test.npz",
                 teachers=[_teacher(bert_teacher)], callbacks=[rec])  # fmt: skip
    assert result.status == "succeeded"
    s = result.summary
    assert s["teacher_accuracy"][0] > 0.9
    assert s["val_accuracy"] > 0.6
    assert s["student_params"] < s["teacher_params"][0]
    assert s["onnx_max_abs_diff"] is not None and s["onnx_max_abs_diff"] < 1e-4
    init = next(d for _, m, d in rec.logs if m == "student initialised from teacher")
    assert init["layers"] == {"student 0": "teacher 0"}
    with zipfile.ZipFile(result.artifacts["model_hf.zip"]) as zf:
        assert sorted(zf.namelist()) == ["config.json", "model.safetensors"]
        zf.extractall(tmp_path / "student")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student",
                                                                            local_files_only=True)  # fmt: skip
    assert model.config.num_hidden_layers == 1
    assert hf_accuracy(model, test) == pytest.approx(s["val_accuracy"], abs=1e-9)
    # The job's model.safetensors teaches a later job (from_job): its metadata rebuilds the student.
    again = load_model({"name": "hf", "config": student["config"]}, result.artifacts["model.safetensors"],
                       (2, 16), 3, who="teacher 0", param="teachers[0]", param_prefix="p").eval()  # fmt: skip
    assert hf_accuracy(again.model, test) == pytest.approx(s["val_accuracy"], abs=1e-9)


def test_hf_teacher_teaches_a_builtin_transformer_student(tmp_path, token_files):
    """A non-HF student reads the same packed tokens only if it accepts [2, L]: the error names the data."""
    folder, train, _ = token_files
    teacher = hf_teacher_zip(tmp_path, "distilbert", train, steps=60)
    spec = make_spec(student={"name": "transformer", "config": {"vocab_size": 40}}, method={"type": "kd"},
                     teachers=[{"architecture": HF, "weights_file": "file_t"}], epochs=1)  # fmt: skip
    with pytest.raises(EngineError) as err:
        run(tmp_path, spec, folder / "train.npz", teachers=[_teacher(teacher)])
    assert err.value.code == "invalid_architecture"


def test_the_api_and_the_engine_support_the_same_families():
    from app.file_checks import HF_FAMILIES
    from app.schemas import HF_MODEL_TYPES, HFOverrides
    from worker.engine.hf import FAMILIES, OVERRIDABLE

    assert HF_FAMILIES == FAMILIES
    assert set(HF_MODEL_TYPES) == set(FAMILIES)
    assert set(HFOverrides.model_fields) == set(OVERRIDABLE)


def test_token_data_pack_ids_and_mask_and_bad_masks_name_the_array(tmp_path):
    from app.file_checks import InvalidFile, validate_upload
    from worker.engine import load_dataset

    data = token_arrays(20, seed=0)
    np.savez(tmp_path / "ok.npz", **data)
    x, y, _ = load_dataset(str(tmp_path / "ok.npz"), None)
    assert (y == data["y"]).all()
    assert x.shape == (20, 2, 16) and x.dtype == np.int64
    assert (x[:, 1] == data["attention_mask"]).all() and (x[:, 0] == data["input_ids"]).all()
    assert validate_upload(tmp_path / "ok.npz", "dataset")[1]["x_shape"] == [2, 16]
    np.savez(tmp_path / "bad.npz", input_ids=data["input_ids"], attention_mask=data["attention_mask"][:, :8])
    with pytest.raises(EngineError) as err:
        load_dataset(str(tmp_path / "bad.npz"), None)
    assert err.value.param == "attention_mask"
    with pytest.raises(InvalidFile, match="attention_mask"):
        validate_upload(tmp_path / "bad.npz", "dataset")
    np.savez(tmp_path / "two.npz", input_ids=data["input_ids"], attention_mask=data["attention_mask"] * 2)
    with pytest.raises(EngineError, match="0 and 1 only"):
        load_dataset(str(tmp_path / "two.npz"), None)
