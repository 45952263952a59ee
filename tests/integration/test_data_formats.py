"""Image-folder zips, CSV and Parquet through the API on the real worker, the data report of every format,
and each unsafe or inconsistent input refused: 422 at upload or job creation naming the field, or a failed job
with a clear error code.
"""

import io
import json
import stat
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers import digits_arrays, upload, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROBLEM = "application/problem+json"
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "emu": (40, 40, 200)}


def png(colour, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def image_zip(path, *, split=True, per_class=8, extra=()):
    with zipfile.ZipFile(path, "w") as zf:
        for name, colour in COLOURS.items():
            for i in range(per_class):
                shade = tuple(max(0, c - 5 * i) for c in colour)
                folder = ("val/" if i < 2 else "train/") if split else ""
                zf.writestr(f"{folder}{name}/{i:03d}.png", png(shade))
        for member, data, compress in extra:
            zf.writestr(member, data, compress_type=compress)
    return path


def table(n=240, seed=0):
    """Four numeric features that separate three species, one text column, and a few empty cells."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 4)) + y[:, None] * 2.5
    return x, y, np.array(["ant", "bee", "cow"])[y]


def csv_file(path, n=240, seed=0):
    x, _, names = table(n, seed)
    lines = ["f0,f1,f2,f3,species,comment"]
    for i in range(n):
        cells = ["" if (i % 50 == 7 and j == 2) else f"{x[i, j]:.5f}" for j in range(4)]
        lines.append(",".join(cells) + f",{names[i]},note {i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def supervised(train, *, data=None, validation=None, student=None, epochs=4) -> dict:
    return {
        "name": "data-formats",
        "student": {"architecture": student or {"name": "mlp", "config": {"hidden_sizes": [32]}}},
        "train_file": train,
        "validation_file": validation,
        "method": {"type": "supervised"},
        "data": data or {},
        "hyperparameters": {"epochs": epochs, "batch_size": 32, "learning_rate": 0.01, "seed": 0},
    }


def run(client, body) -> dict:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return wait_job(client, r.json()["id"], timeout=240)


def report_of(client, job) -> dict:
    """The data report from metrics.json, checked against the job's event and model card."""
    assert job["status"] == "succeeded", job["error"]
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json").json()["data_report"]
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    assert [e["data"] for e in events if e["message"] == "data report"] == [report]
    card = client.get(f"/v1/jobs/{job['id']}/artifacts/model_card.md").text
    assert "## Data report" in card
    for c in report["class_balance"]:
        assert f"| {c['id']} | {c['name']} |" in card
    return report


def problem(r, loc: list) -> str:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert any(e["loc"] == loc for e in r.json()["errors"]), r.json()
    return r.json()["detail"]


# ---- image folders ---------------------------------------------------------------------------------


def test_image_folder_job_learns_the_colours_and_reports_its_classes(client, tmp_path):
    file = upload(client, image_zip(tmp_path / "pets.zip"), "dataset").json()
    assert file["format"] == "images"
    body = supervised(file["id"], data={"image_size": [8, 8]},
                      student={"name": "cnn2d", "config": {"channels": [8]}}, epochs=6)  # fmt: skip
    job = run(client, body)
    report = report_of(client, job)
    assert report["format"] == "images" and report["class_names"] == ["cat", "dog", "emu"]
    assert [(c["name"], c["train"], c["validation"]) for c in report["class_balance"]] == [
        ("cat", 6, 2), ("dog", 6, 2), ("emu", 6, 2)]  # fmt: skip
    assert report["features"]["x"]["shape"] == [3, 8, 8] and report["features"]["x"]["dtype"] == "uint8"
    assert job["metrics"]["class_names"] == ["cat", "dog", "emu"]
    assert job["metrics"]["input_shape"] == [3, 8, 8] and job["metrics"]["val_accuracy"] == 1.0


def test_image_folders_need_image_size_and_their_own_val_split_alone(client, tmp_path):
    split = upload(client, image_zip(tmp_path / "split.zip"), "dataset").json()["id"]
    flat = upload(client, image_zip(tmp_path / "flat.zip", split=False), "dataset").json()["id"]
    assert "image_size" in problem(client.post("/v1/jobs", json=supervised(split)), ["body", "data", "image_size"])
    r = client.post("/v1/jobs", json=supervised(split, data={"image_size": [8, 8]}, validation=flat))
    assert "val/ folder" in problem(r, ["body", "validation_file"])
    r = client.post("/v1/jobs", json=supervised("builtin:digits", data={"image_size": [8, 8]}))
    problem(r, ["body", "data", "image_size"])
    r = client.post("/v1/jobs", json=supervised(flat, data={"image_size": [0, 8]}))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][:3] == ["body", "data", "image_size"]


def symlink():
    info = zipfile.ZipInfo("cat/link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("member", "data", "compress", "message"),
    [
        ("../../etc/cat/x.png", png((1, 2, 3)), zipfile.ZIP_STORED, "leaves the archive"),
        ("/tmp/cat/x.png", png((1, 2, 3)), zipfile.ZIP_STORED, "absolute path"),
        (symlink(), b"/etc/passwd", zipfile.ZIP_STORED, "symbolic link"),
        ("cat/bomb.png", bytes(5_000_000), zipfile.ZIP_DEFLATED, "compressed more than 200:1"),
        ("cat/readme.txt", b"hello", zipfile.ZIP_STORED, "not a .png, .jpg or .jpeg"),
        ("x/y/z/w.png", png((1, 2, 3)), zipfile.ZIP_STORED, "not at class_name/image"),
    ],
    ids=["dotdot", "absolute", "symlink", "ratio", "not-an-image", "too-deep"],
)
def test_unsafe_zips_are_422_at_upload(client, tmp_path, member, data, compress, message):
    path = image_zip(tmp_path / "bad.zip", extra=[(member, data, compress)])
    detail = problem(upload(client, path, "dataset"), ["body", "file"])
    assert message in detail


def test_an_undecodable_image_fails_the_job_naming_it(client, tmp_path):
    path = image_zip(tmp_path / "broken.zip", split=False, extra=[("dog/zz.png", png((1, 2, 3))[:50],
                                                                    zipfile.ZIP_STORED)])  # fmt: skip
    file_id = upload(client, path, "dataset").json()["id"]
    job = run(client, supervised(file_id, data={"image_size": [8, 8]}))
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_data"
    assert "dog/zz.png" in job["error"]["message"]


# ---- tables ----------------------------------------------------------------------------------------


def test_csv_job_with_string_labels_reports_balance_and_missing_values(client, tmp_path):
    train = upload(client, csv_file(tmp_path / "train.csv"), "dataset").json()
    val = upload(client, csv_file(tmp_path / "val.csv", n=90, seed=1), "dataset").json()
    assert train["format"] == "csv"
    data = {"label_column": "species", "feature_columns": ["f0", "f1", "f2", "f3"]}
    job = run(client, supervised(train["id"], validation=val["id"], data=data, epochs=20))
    report = report_of(client, job)
    _, y, _ = table(240, 0)
    _, yv, _ = table(90, 1)
    assert report["class_names"] == ["ant", "bee", "cow"]
    assert [c["train"] for c in report["class_balance"]] == np.bincount(y, minlength=3).tolist()
    assert [c["validation"] for c in report["class_balance"]] == np.bincount(yv, minlength=3).tolist()
    assert report["missing_values"] == {"train_file": {"f2": 5}, "validation_file": {"f2": 2}}
    assert report["features"]["x"]["shape"] == [4] and report["duplicates_train_validation"] == 0
    assert job["metrics"]["val_accuracy"] > 0.8  # the features separate the species; chance is 1/3


def test_table_columns_are_checked_at_job_creation(client, tmp_path):
    file_id = upload(client, csv_file(tmp_path / "t.csv", n=30), "dataset").json()["id"]
    assert "label_column" in problem(client.post("/v1/jobs", json=supervised(file_id)), ["body", "data", "label_column"])
    r = client.post("/v1/jobs", json=supervised(file_id, data={"label_column": "kind"}))
    assert "'kind' is not in the header" in problem(r, ["body", "data", "label_column"])
    r = client.post("/v1/jobs", json=supervised(file_id, data={"label_column": "species", "feature_columns": ["f9"]}))
    assert "['f9']" in problem(r, ["body", "data", "feature_columns"])
    r = client.post("/v1/jobs", json=supervised("builtin:digits", data={"label_column": "species"}))
    problem(r, ["body", "data", "label_column"])
    bad = tmp_path / "one.csv"
    bad.write_text("only\n1\n2\n")
    assert "at least two" in problem(upload(client, bad, "dataset"), ["body", "file"])


def test_a_non_numeric_feature_column_fails_the_job_naming_it(client, tmp_path):
    file_id = upload(client, csv_file(tmp_path / "t.csv", n=60), "dataset").json()["id"]
    job = run(client, supervised(file_id, data={"label_column": "species"}))  # every other column: `comment` too
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_data"
    assert "'comment'" in job["error"]["message"] and job["error"]["param"] == "data.feature_columns"


def test_parquet_job_with_integer_labels(client, tmp_path):
    x, y, _ = table(240)
    pq.write_table(pa.table({**{f"f{j}": x[:, j] for j in range(4)}, "label": y}), tmp_path / "t.parquet")
    file = upload(client, tmp_path / "t.parquet", "dataset").json()
    assert file["format"] == "parquet"
    job = run(client, supervised(file["id"], data={"label_column": "label"}))
    report = report_of(client, job)
    assert report["format"] == "parquet" and report["class_names"] is None
    assert sum(c["train"] + c["validation"] for c in report["class_balance"]) == 240
    assert report["missing_values"] == {"train_file": {}, "validation_file": {}}
    # The Parquet schema is read by the worker: a column absent from it fails the job naming the option.
    job = run(client, supervised(file["id"], data={"label_column": "target"}))
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_spec"
    assert job["error"]["param"] == "data.label_column" and "'target'" in job["error"]["message"]


def test_truncated_parquet_is_422_at_upload(client, tmp_path):
    x, y, _ = table(20)
    pq.write_table(pa.table({"a": x[:, 0], "label": y}), tmp_path / "t.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes((tmp_path / "t.parquet").read_bytes()[:-3])
    assert "Parquet" in problem(upload(client, cut, "dataset"), ["body", "file"])


# ---- the existing formats get a report too ---------------------------------------------------------


def test_npz_job_reports_duplicates_between_train_and_validation(client, tmp_path):
    x, y = digits_arrays()
    np.savez(tmp_path / "train.npz", x=x[:600], y=y[:600])
    np.savez(tmp_path / "val.npz", x=np.concatenate([x[600:700], x[:7]]), y=np.concatenate([y[600:700], y[:7]]))
    train = upload(client, tmp_path / "train.npz", "dataset").json()["id"]
    val = upload(client, tmp_path / "val.npz", "dataset").json()["id"]
    report = report_of(client, run(client, supervised(train, validation=val, epochs=2)))
    seen = {r.tobytes() for r in x[:600]}
    expected = sum(r.tobytes() in seen for r in np.concatenate([x[600:700], x[:7]]))
    assert report["format"] == "npz" and report["duplicates_train_validation"] == expected >= 7
    assert report["features"]["x"] == {"shape": [64], "dtype": "float32", "model_dtype": "float32"}
    assert report["class_names"] is None and [c["name"] for c in report["class_balance"]] == [str(i) for i in range(10)]
    assert json.dumps(report)  # plain JSON all the way down
