"""Hugging Face models through the API on the real worker: a zipped save_pretrained teacher, a `kd` job whose
student is a shallower model of the same family initialised from the teacher's layers, and the student's
save_pretrained zip opened offline with from_pretrained. Bad teacher zips and student configs are 422s."""

import io
import json
import zipfile

import httpx
import numpy as np
import pytest

from tests.helpers import hf_accuracy, hf_teacher_zip, token_arrays, upload, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf(service, api_key, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    train, test = token_arrays(600, seed=0), token_arrays(300, seed=1)
    np.savez(folder / "train.npz", **train)
    np.savez(folder / "test.npz", **test)
    teacher = hf_teacher_zip(folder, "bert", train, layers=4)
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        ids = {name: upload(c, folder / f"{name}.npz", "dataset").json()["id"] for name in ("train", "test")}
        r = upload(c, teacher, "teacher")
        assert r.status_code == 201, r.text
        ids["teacher"] = r.json()["id"]
        assert r.json()["format"] == "hf_zip"
    return {"ids": ids, "folder": folder, "test": test, "teacher": teacher}


def job_body(ids, student_config: dict, **overrides) -> dict:
    body = {
        "name": "hf-kd",
        "teachers": [{"architecture": {"name": "hf"}, "weights_file": ids["teacher"]}],
        "student": {"architecture": {"name": "hf", "config": student_config}},
        "train_file": ids["train"],
        "validation_file": ids["test"],
        "method": {"type": "kd", "temperature": 2.0, "alpha": 0.5},
        "hyperparameters": {"epochs": 3, "batch_size": 32, "learning_rate": 0.001, "seed": 0},
    }
    body.update(overrides)
    return body


def test_kd_from_a_hf_teacher_to_a_shallower_student_opens_with_from_pretrained(client, hf, tmp_path):
    r = client.post("/v1/jobs", json=job_body(hf["ids"], {"overrides": {"num_hidden_layers": 2}, "init": "teacher"}))
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    summary = client.get(f"/v1/jobs/{job['id']}/metrics").json()["summary"]
    assert summary["teacher_accuracy"][0] > 0.9
    assert summary["student_params"] < summary["teacher_params"][0]
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    init = next(e for e in events if e["message"] == "student initialised from teacher")
    assert init["data"]["layers"] == {"student 0": "teacher 0", "student 1": "teacher 2"}
    names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    assert {"model_hf.zip", "model.onnx", "model.safetensors"} <= names
    download = client.get(f"/v1/jobs/{job['id']}/artifacts/model_hf.zip")
    assert download.status_code == 200
    zipfile.ZipFile(io.BytesIO(download.content)).extractall(tmp_path / "student")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student",
                                                                            local_files_only=True)  # fmt: skip
    assert model.config.num_hidden_layers == 2
    # The validation file is the test split: the downloaded model scores what the service reported.
    assert hf_accuracy(model, hf["test"]) == pytest.approx(summary["val_accuracy"], abs=1 / 300)


def _zip(path, members: dict) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.fixture(scope="module")
def saved(hf):
    with zipfile.ZipFile(hf["teacher"]) as zf:
        return json.loads(zf.read("config.json")), zf.read("model.safetensors")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("auto_map", "remote code is never run"),
        ("unknown_model_type", "model_type 'gpt_neox' is not supported"),
        ("not_a_classifier", "sequence classifier"),
        ("missing_weights", "missing model.safetensors"),
        ("pickled_bin", "pickled PyTorch weights"),
        ("extra_member", "holds exactly config.json and model.safetensors"),
    ],
)
def test_invalid_teacher_zips_are_refused_with_the_reason(client, saved, tmp_path, case, message):
    config, weights = saved
    members = {"config.json": json.dumps(config), "model.safetensors": weights}
    if case == "auto_map":
        members["config.json"] = json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.Evil"}})
    elif case == "unknown_model_type":
        members["config.json"] = json.dumps({**config, "model_type": "gpt_neox"})
    elif case == "not_a_classifier":
        members["config.json"] = json.dumps({**config, "architectures": ["BertForMaskedLM"]})
    elif case == "missing_weights":
        del members["model.safetensors"]
    elif case == "pickled_bin":
        del members["model.safetensors"]
        members["pytorch_model.bin"] = b"\x80\x04pickle"
    elif case == "extra_member":
        members["modeling_evil.py"] = "import os"
    _zip(tmp_path / "bad.zip", members)
    r = upload(client, tmp_path / "bad.zip", "teacher")
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"], r.json()["detail"]
    assert r.json()["errors"][0]["loc"] == ["body", "file"]


@pytest.mark.parametrize(
    ("student", "loc"),
    [
        ({"overrides": {"hidden_size": 64}}, ["overrides", "hidden_size"]),
        ({"overrides": {"num_hidden_layers": 6}}, ["overrides", "num_hidden_layers"]),
        ({"overrides": {"hidden_size": 33}, "init": "fresh"}, ["overrides", "num_attention_heads"]),
        ({"model_type": "llama"}, ["init"]),
    ],
)
def test_bad_hf_student_configs_are_422_naming_the_field(client, hf, student, loc):
    r = client.post("/v1/jobs", json=job_body(hf["ids"], student))
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == ["body", "student", "architecture", "config", *loc]


def test_unknown_override_and_mismatched_teacher_architecture_are_422(client, hf):
    r = client.post("/v1/jobs", json=job_body(hf["ids"], {"overrides": {"num_layers": 1}}))
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"][-2:] == ["overrides", "num_layers"]
    body = job_body(hf["ids"], {"init": "fresh", "model_type": "bert"},
                    teachers=[{"architecture": {"name": "mlp"}, "weights_file": hf["ids"]["teacher"]}])  # fmt: skip
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["body", "teachers", 0, "architecture", "name"]
