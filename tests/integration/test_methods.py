"""Every `method.type` through the API on the real worker: a small job reaches `succeeded` with its artifacts.

Data are scikit-learn's bundled digits (1797 rows of 64 features) and a cross-modal pair made from
them: the teacher sees each digit as a [1, 8, 8] image, the student a permuted, noised 64-vector.
Teachers are trained here (tests.helpers.train_teacher) or by a `supervised` job (`from_job`).
"""

import httpx
import numpy as np
import pytest

from tests.helpers import digits_arrays, digits_files, train_teacher, upload, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CORE = {"model.safetensors", "model.onnx", "metrics.json", "model_card.md", "training_curves.png"}
STUDENT = {"name": "mlp", "config": {"hidden_sizes": [32]}}
MLP_TEACHER = {"name": "mlp", "config": {"hidden_sizes": [128]}}
CNN_TEACHER = {"name": "cnn1d", "config": {"channels": 8, "num_layers": 2, "kernel_size": 3}}
IMAGE_TEACHER = {"name": "cnn2d", "config": {"channels": [8, 16]}}


def cross_modal_arrays():
    """(image view [N, 1, 8, 8], vector view [N, 64], labels): the same digits, paired row by row."""
    x, y = digits_arrays()
    rng = np.random.default_rng(0)
    vectors = x[:, rng.permutation(64)] + rng.normal(0, 0.05, size=x.shape).astype(np.float32)
    return x.reshape(-1, 1, 8, 8), vectors.astype(np.float32), y


@pytest.fixture(scope="module")
def ids(service, api_key, tmp_path_factory):
    """Uploaded data sets and teachers shared by every test of this module."""
    folder = tmp_path_factory.mktemp("methods")
    train, val = digits_files(folder)
    x, y = digits_arrays()
    images, vectors, _ = cross_modal_arrays()
    np.savez(folder / "modal_train.npz", x=vectors[:1400], x_teacher=images[:1400])  # no labels
    np.savez(folder / "modal_val.npz", x=vectors[1400:], x_teacher=images[1400:], y=y[1400:])
    np.savez(folder / "no_labels.npz", x=x[:1400])
    teachers = {
        "mlp": train_teacher(folder / "mlp.safetensors", MLP_TEACHER, x[:1400], y[:1400], epochs=15),
        "cnn": train_teacher(folder / "cnn.safetensors", CNN_TEACHER, x[:1400], y[:1400], epochs=6),
        "image": train_teacher(
            folder / "image.safetensors", IMAGE_TEACHER, images[:1400], y[:1400], epochs=6
        ),
    }
    with httpx.Client(
        base_url=service.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as c:
        out = {name: upload(c, path, "dataset").json()["id"]
               for name, path in [("train", train), ("val", val), ("modal_train", folder / "modal_train.npz"),
                                  ("modal_val", folder / "modal_val.npz"), ("no_labels", folder / "no_labels.npz")]}  # fmt: skip
        out.update({name: upload(c, path, "teacher").json()["id"] for name, path in teachers.items()})
    return out


def teacher(ids, name: str, arch: dict, weight: float = 1.0) -> dict:
    return {"architecture": arch, "weights_file": ids[name], "weight": weight}


def spec(
    ids, method: dict, teachers: list[dict], *, student=STUDENT, train="train", val="val", epochs=3
) -> dict:
    return {
        "name": f"test-{method['type']}",
        "teachers": teachers,
        "student": {"architecture": student},
        "train_file": ids[train],
        "validation_file": ids[val] if val else None,
        "method": method,
        "hyperparameters": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.01, "seed": 0},
    }


def run_job(client, body: dict, timeout: float = 180) -> dict:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"], timeout=timeout)
    assert job["status"] == "succeeded", (job["error"], body["method"])
    return job


def artifact_names(client, job: dict) -> set[str]:
    return {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}


def last_losses(client, job: dict) -> set[str]:
    return set(client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"][-1]["data"]["losses"])


@pytest.mark.parametrize(
    ("method", "terms"),
    [
        ({"type": "dkd", "warmup_epochs": 1}, {"ce", "tckd", "nckd"}),
        ({"type": "feature"}, {"ce", "kl", "hint"}),
        (
            {"type": "attention", "pairs": [{"student": "net.1", "teacher": "net.1"}], "beta": 100.0},
            {"ce", "kl", "attention"},
        ),
        ({"type": "relation"}, {"ce", "kl", "distance", "angle"}),
    ],
    ids=lambda v: v["type"] if isinstance(v, dict) and "type" in v else "",
)
def test_single_teacher_method(client, ids, method, terms):
    job = run_job(client, spec(ids, method, [teacher(ids, "mlp", MLP_TEACHER)]))
    assert job["spec"]["method"]["type"] == method["type"] and "temperature" in job["spec"]["method"]
    assert artifact_names(client, job) == CORE
    assert last_losses(client, job) == terms
    assert job["metrics"]["val_accuracy"] > 0.5 and job["metrics"]["agreement"] > 0.5  # chance is 0.1


def test_multi_teacher_fuses_different_architectures(client, ids):
    teachers = [teacher(ids, "mlp", MLP_TEACHER, 2.0), teacher(ids, "cnn", CNN_TEACHER, 1.0)]
    for fusion in ("weighted", "confidence"):
        job = run_job(client, spec(ids, {"type": "multi_teacher", "fusion": fusion}, teachers))
        m = job["metrics"]
        assert artifact_names(client, job) == CORE
        assert len(m["teacher_accuracy"]) == 2 and m["teacher_ensemble_accuracy"] > 0.5
        assert m["val_accuracy"] > 0.5 and len(m["agreement_per_teacher"]) == 2


def test_multi_teacher_with_one_teacher_is_422_naming_teachers(client, ids):
    r = client.post("/v1/jobs", json=spec(ids, {"type": "multi_teacher"}, [teacher(ids, "mlp", MLP_TEACHER)]))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "teachers"]
    assert "at least 2 teachers" in r.json()["detail"]
    two = [teacher(ids, "mlp", MLP_TEACHER), teacher(ids, "cnn", CNN_TEACHER)]
    r = client.post("/v1/jobs", json=spec(ids, {"type": "kd"}, two))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "teachers"]
    assert "multi_teacher" in r.json()["detail"]


def test_invalid_method_options_are_422(client, ids):
    one = [teacher(ids, "mlp", MLP_TEACHER)]
    for method, where in [
        ({"type": "attention"}, "pairs"),  # pairs are required
        ({"type": "quantization", "bits": 6}, "bits"),
        ({"type": "feature", "pairs": [{"student": "net.0"}]}, "teacher"),
        ({"type": "dkd", "gamma": 1.0}, "gamma"),
        ({"type": "self_distill", "generations": 0}, "generations"),
    ]:
        r = client.post("/v1/jobs", json=spec(ids, method, [] if method["type"] == "self_distill" else one))
        assert r.status_code == 422, (method, r.text)
        assert where in r.json()["errors"][0]["loc"], (method, r.json()["errors"])


def test_bad_module_path_fails_the_job_naming_it(client, ids):
    method = {"type": "feature", "pairs": [{"student": "net.7", "teacher": "embedding"}]}
    r = client.post("/v1/jobs", json=spec(ids, method, [teacher(ids, "mlp", MLP_TEACHER)], epochs=1))
    job = wait_job(client, r.json()["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_spec"
    assert job["error"]["param"] == "method.pairs[0].student"
    assert "'net.7'" in job["error"]["message"] and "net.0" in job["error"]["message"]


def test_self_distill_reports_every_exit(client, ids):
    student = {"name": "mlp", "config": {"hidden_sizes": [64, 32]}}
    job = run_job(client, spec(ids, {"type": "self_distill"}, [], student=student))
    m = job["metrics"]
    assert artifact_names(client, job) == CORE
    assert set(m["method_metrics"]["exit_accuracy"]) == {"net.1", "final"}
    assert m["method_metrics"]["exit_accuracy"]["final"] == m["val_accuracy"] > 0.5
    assert job["spec"]["method"]["exits"] is None and job["spec"]["teachers"] == []
    r = client.post("/v1/jobs", json=spec(ids, {"type": "self_distill"}, [teacher(ids, "mlp", MLP_TEACHER)]))
    assert r.status_code == 422 and "takes no teachers" in r.json()["detail"]


def test_born_again_generations(client, ids):
    job = run_job(client, spec(ids, {"type": "self_distill", "generations": 2, "exits": []}, [], epochs=2))
    stages = job["metrics"]["stages"]
    assert [s["name"] for s in stages] == ["generation 1", "generation 2"]
    assert (
        all(s["val_accuracy"] > 0.5 for s in stages)
        and stages[-1]["val_accuracy"] == job["metrics"]["val_accuracy"]
    )
    assert "born_again_kl" in last_losses(client, job)


def test_quantization_exports_an_int8_model(client, ids):
    job = run_job(client, spec(ids, {"type": "quantization"}, [teacher(ids, "mlp", MLP_TEACHER)],
                               student={"name": "mlp", "config": {"hidden_sizes": [128]}}))  # fmt: skip
    assert artifact_names(client, job) == CORE | {"model_int8.safetensors"}
    mm = job["metrics"]["method_metrics"]
    assert mm["bits"] == 8 and mm["quantized_accuracy"] > 0.5 and mm["float_accuracy"] > 0.5
    assert mm["quantized_bytes"] < mm["float_bytes"] / 2
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/model_int8.safetensors")
    assert r.status_code == 200 and len(r.content) == mm["quantized_bytes"]


def test_teacher_assistant_chain_from_a_supervised_teacher_job(client, ids):
    big = {"name": "mlp", "config": {"hidden_sizes": [256, 128]}}
    teacher_job = run_job(client, spec(ids, {"type": "supervised"}, [], student=big, epochs=6))
    method = {"type": "teacher_assistant", "assistants": [{"name": "mlp", "config": {"hidden_sizes": [64]}}],
              "assistant_epochs": 2}  # fmt: skip
    job = run_job(client, spec(ids, method, [{"from_job": teacher_job["id"]}],
                               student={"name": "mlp", "config": {"hidden_sizes": [16]}}))  # fmt: skip
    stages = job["metrics"]["stages"]
    assert [(s["name"], s["epochs"]) for s in stages] == [("assistant 1", 2), ("student", 3)]
    assert (
        stages[0]["val_accuracy"] > 0.5 and stages[1]["val_accuracy"] == job["metrics"]["val_accuracy"] > 0.5
    )
    assert artifact_names(client, job) == CORE


def test_cross_modal_student_learns_without_labels(client, ids):
    body = spec(ids, {"type": "cross_modal"}, [teacher(ids, "image", IMAGE_TEACHER)],
                train="modal_train", val="modal_val", epochs=6)  # fmt: skip
    job = run_job(client, body)
    m = job["metrics"]
    assert job["spec"]["method"]["alpha"] == 1.0 and m["num_classes"] == 10 and m["input_shape"] == [64]
    assert m["teacher_accuracy"][0] > 0.8
    assert m["val_accuracy"] > 0.7 and m["agreement"] > 0.7  # chance is 0.1; no training label was read
    assert last_losses(client, job) == {"kl"}
    assert artifact_names(client, job) == CORE


def test_cross_modal_data_must_hold_x_teacher_and_labels_follow_alpha(client, ids):
    image = [teacher(ids, "image", IMAGE_TEACHER)]
    for train in ("train", "builtin:digits"):
        body = spec(ids, {"type": "cross_modal"}, image, val=None)
        body["train_file"] = ids.get(train, train)
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "train_file"], r.text
        assert "x_teacher" in r.json()["detail"]
    r = client.post("/v1/jobs", json=spec(ids, {"type": "cross_modal", "alpha": 0.5}, image,
                                          train="modal_train", val="modal_val"))  # fmt: skip
    assert r.status_code == 422 and "'y' labels" in r.json()["detail"]
    dkd = spec(ids, {"type": "dkd"}, [teacher(ids, "mlp", MLP_TEACHER)], train="no_labels")
    r = client.post("/v1/jobs", json=dkd)  # dkd always needs labels, whatever alpha is
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "train_file"]


@pytest.mark.parametrize(
    ("extra", "mode"),
    [
        ({"augmentation": "mixup"}, "fresh"),
        ({"augmentation": ["shift", {"type": "mixup", "alpha": 0.5}], "teacher_outputs": "pool", "pool_size": 2},
         "pool"),
    ],
)  # fmt: skip
def test_function_matching_job_reports_its_augmentation_and_a_same_augmentation_baseline(client, ids, extra, mode):
    body = spec(ids, {"type": "kd", "temperature": 1.0, "alpha": 1.0}, [teacher(ids, "mlp", MLP_TEACHER)])
    body["hyperparameters"]["baseline"] = True
    job = run_job(client, {**body, **extra})
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["summary"]
    assert metrics["teacher_outputs"] == mode
    assert [step["type"] for step in metrics["augmentation"]] == (["mixup"] if mode == "fresh" else ["shift", "mixup"])
    assert metrics["baseline_accuracy"] is not None and metrics["kd_gain"] is not None
    assert artifact_names(client, job) == CORE


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"augmentation": "mixup", "teacher_outputs": "cached"}, "teacher_outputs"),
        ({"teacher_outputs": "pool"}, "teacher_outputs"),
        ({"augmentation": "blur"}, "augmentation"),
        ({"augmentation": [{"type": "noise", "std": 0}]}, "augmentation"),
        ({"augmentation": "mixup", "pool_size": 0}, "pool_size"),
    ],
)
def test_inconsistent_augmentation_settings_are_422_naming_the_field(client, ids, extra, field):
    body = spec(ids, {"type": "kd"}, [teacher(ids, "mlp", MLP_TEACHER)])
    r = client.post("/v1/jobs", json={**body, **extra})
    assert r.status_code == 422, r.text
    assert any(e["loc"][:2] == ["body", field] for e in r.json()["errors"]), r.json()


def test_recipe_auto_job_reports_its_search_and_ships_the_better_model(client, ids):
    body = spec(ids, {"type": "kd", "temperature": "auto"}, [teacher(ids, "mlp", MLP_TEACHER)], epochs=2)
    job = run_job(client, {**body, "recipe_budget": 1.0})
    summary = client.get(f"/v1/jobs/{job['id']}/metrics").json()["summary"]
    report = summary["recipe"]
    assert report["searched"] == ["method.temperature"] and len(report["candidates"]) == 4
    assert report["spent_epochs"] <= report["budget_epochs"]
    assert report["shipped"] in ("student", "baseline")
    assert summary["val_accuracy"] >= summary["baseline_accuracy"]
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    assert any(e["message"] == "recipe probe" for e in events)
    assert any(e["message"] == "recipe chosen" for e in events)


def test_auto_where_the_method_has_no_such_setting_is_422(client, ids):
    body = spec(ids, {"type": "dkd", "alpha": "auto"}, [teacher(ids, "mlp", MLP_TEACHER)])
    assert client.post("/v1/jobs", json=body).status_code == 422
    body = spec(ids, {"type": "kd"}, [teacher(ids, "mlp", MLP_TEACHER)])
    r = client.post("/v1/jobs", json={**body, "recipe": "manual"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][:2] == ["body", "recipe"]
