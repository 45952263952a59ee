"""Layering and no-unpickling rules, checked on the source."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = re.compile(r"pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|torch\.load\((?!.*weights_only\s*=\s*True)")


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_unpickling_anywhere_in_the_service():
    hits = []
    for path in list((ROOT / "app").rglob("*.py")) + list((ROOT / "worker").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []


def test_api_process_does_not_load_torch():
    code = "import sys, app.main, app.cli, app.client, distill_tools.convert; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
