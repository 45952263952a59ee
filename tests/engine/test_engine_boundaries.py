"""The engine stays a pure torch/numpy library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_imports_no_service_framework():
    code = (
        "import sys, worker.engine, worker.engine.run, worker.engine.export; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'celery', 'fastapi', 'app')); "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_engine_source_never_unpickles():
    forbidden = [
        "allow_pickle=" + "True",
        "weights_only=" + "False",
        "pickle." + "load",
        "import " + "pickle",
    ]
    for path in (ROOT / "worker" / "engine").rglob("*.py"):
        text = path.read_text()
        for needle in forbidden:
            assert needle not in text, f"{path.name} contains {needle}"
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"
