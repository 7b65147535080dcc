"""`pipeline run lora --demo` as a newcomer runs it: builds the demo once, trains, then reuses everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def _demo(cwd, *args):
    cmd = [sys.executable, str(REPO / "cli.py"), "run", "lora", "--demo", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ)


def test_demo_runs_then_reuses_then_reruns_only_lora1(tmp_path):
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "LoRA (kohya format):" in first.stdout
    out = tmp_path / "pipeline-demo" / "output" / "lora" / "lora1"
    assert (out / "lora1.safetensors").exists() and (out / "diffusers" / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step000060.png", "step000120.png"]
    losses = [float(line.split(",")[1]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 120

    again = _demo(tmp_path, "--json")
    assert [s["action"] for s in json.loads(again.stdout)["stages"]] == ["reused"] * 4
    assert "building a tiny" not in again.stderr  # the demo model is built once

    lr = _demo(tmp_path, "--json", "--set", "lora1.lr=5e-4", "--set", "runtime.preview.every=0")
    ran = [s["name"] for s in json.loads(lr.stdout)["stages"] if s["action"] == "ran"]
    assert ran == ["lora1"]
