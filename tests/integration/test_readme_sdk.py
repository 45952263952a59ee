"""The README's Python SDK example, run verbatim (as a user would, in a fresh process) against the real API
and worker."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def readme_sdk_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python SDK", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_sdk_example_runs_as_written(service, api_key, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_sdk_example())
    env = {**os.environ, "DISTILL_URL": service.base_url, "DISTILL_API_KEY": api_key,
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    status, accuracy, baseline, gain = lines[-2].split()
    assert status == "succeeded" and float(accuracy) > 0.9 and float(baseline) > 0 and gain != "None"
    assert "training finished" in out.stdout  # events arrived through on_event while it ran
    downloaded = {p.name for p in (tmp_path / "blobs-student").iterdir()}
    assert {"model.safetensors", "model.onnx", "metrics.json", "model_card.md"} <= downloaded
    assert lines[-1] == str(sorted(downloaded))
