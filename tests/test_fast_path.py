"""A run whose every stage is fresh loads no model: torch is never even imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_all_fresh_run_imports_no_torch(project):
    assert project.run_json()["stages"][-1]["action"] == "ran"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "sys.argv = ['pipeline', 'run', 'lora', '-c', sys.argv[2], '--json'];"
        "from cli import app\n"
        "try: app()\n"
        "except SystemExit as e: assert e.code in (0, None), e.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'zarr') if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(project.config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"action": "reused"' in out.stdout
    assert "HEAVY []" in out.stdout
