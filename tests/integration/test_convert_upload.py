"""A `.pt` checkpoint converted with `distill convert` is accepted as a teacher upload and teaches a job."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from app import cli
from tests.helpers import digits_arrays, kd_spec, train_teacher, upload, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TEACHER_ARCH = {"name": "mlp", "config": {"hidden_sizes": [64]}}


def test_converted_dataparallel_checkpoint_teaches_a_job(client, tmp_path):
    x, y = digits_arrays()
    weights = load_file(str(train_teacher(tmp_path / "t.safetensors", TEACHER_ARCH, x, y, epochs=8)))
    # What a training script with nn.DataParallel typically saves.
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 8, "best_acc": 0.97},
               tmp_path / "teacher.pt")  # fmt: skip
    result = CliRunner().invoke(cli.app, ["convert", str(tmp_path / "teacher.pt")])
    assert result.exit_code == 0, result.output
    converted = tmp_path / "teacher.safetensors"
    sha = hashlib.sha256(converted.read_bytes()).hexdigest()
    assert sha in result.stdout

    r = upload(client, converted, "teacher")
    assert r.status_code == 201, r.text
    file = r.json()
    assert file["format"] == "safetensors" and file["sha256"] == sha

    spec = kd_spec("builtin:digits", {"architecture": TEACHER_ARCH, "weights_file": file["id"]}, epochs=2)
    job = wait_job(client, client.post("/v1/jobs", json=spec).json()["id"], timeout=240)
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["teacher_accuracy"][0] > 0.9  # the converted weights loaded key for key
