"""`pipeline run transfer --demo` as a newcomer runs it: builds the demo once, runs the chain, then reuses it."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def _demo(cwd, workflow, *args):
    """The first run, as a newcomer starts it: a new process."""
    return run_cli(["run", workflow, "--demo", *args], cwd)


def _again(cwd, monkeypatch, *args):
    """The runs after it, in this process (the same code, without a subprocess's imports), from the same folder."""
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def _ran(cwd, monkeypatch, workflow, *args) -> list[str]:
    result = _again(cwd, monkeypatch, "run", workflow, "--demo", "--json", *args)
    return [s["name"] for s in json.loads(result.stdout)["stages"] if s["action"] == "ran"]


def test_transfer_demo_runs_reports_fidelity_then_reruns_only_the_student(tmp_path, monkeypatch):
    first = _demo(tmp_path, "transfer")
    assert first.returncode == 0, first.stderr
    assert (
        "LoRA (single-file format, for ComfyUI and A1111): pipeline-demo/output/transfer/student/student.safetensors"
        in first.stdout
    )
    assert "fidelity on held-out images cos" in first.stdout and "fit on training images cos" in first.stdout
    out = tmp_path / "pipeline-demo" / "output" / "transfer"
    last = first.stdout.strip().splitlines()[-1]  # the demo ends with the path of its report
    assert last.startswith("Report: pipeline-demo/output/transfer/report.html") and (out / "report.html").is_file()
    assert "--out pipeline-demo/sheets" in first.stdout  # sheets go under the demo folder, as the README says
    assert (out / "student" / "diffusers" / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (out / "lora1" / "previews").iterdir()) == ["step000060.png", "step000120.png"]
    losses = [float(line.split(",")[1]) for line in (out / "lora1" / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 120
    # Fidelity on held-out rows rises as the student trains: 0 at the start (zero LoRA), then every measurement
    # (each 20 steps) closer to the teacher's delta than the one before.
    curve = [line.split(",") for line in (out / "student" / "fidelity.csv").read_text().splitlines()[1:]]
    steps, cos, err = [int(c[0]) for c in curve], [float(c[1]) for c in curve], [float(c[2]) for c in curve]
    assert steps == [0, 20, 40, 60, 80] and cos[0] == 0.0 and err[0] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(cos, cos[1:], strict=False)) and cos[-1] > 0.8
    assert all(b < a for a, b in zip(err, err[1:], strict=False))

    again = _again(tmp_path, monkeypatch, "run", "transfer", "--demo", "--json")
    assert [s["name"] for s in json.loads(again.stdout)["stages"] if s["action"] == "ran"] == []
    assert "building a tiny" not in again.stderr  # the demo models are built once
    assert _ran(tmp_path, monkeypatch, "transfer", "--set", "student.lr=1e-3") == ["student"]
    assert _ran(tmp_path, monkeypatch, "transfer", "--set", "student.guidance=2.0") == ["student"]
    # The lora workflow shares caption, latents, text and lora1 with transfer: nothing to do.
    assert _ran(tmp_path, monkeypatch, "lora") == []


def test_differential_demo_prints_the_eval_and_draws_the_grid(tmp_path, monkeypatch):
    from PIL import Image

    result = _demo(tmp_path, "differential")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "differential eval (held-out noise)" in out
    for pair in ("red-circle", "yellow-square", "white-triangle"):
        assert pair in out
    grid = tmp_path / "pipeline-demo" / "output" / "differential" / "sample-grid.png"
    width, height = Image.open(grid).size  # LoRA-2 at 0, 0.5, 1 x two prompts, in labelled cells of >= 256 px
    assert width >= 3 * 256 and height >= 2 * 256
    evaluated = _again(tmp_path, monkeypatch, "eval", "differential", "-c", "pipeline-demo/pipeline.toml", "--json")
    record = json.loads(evaluated.stdout)
    for row in record["pairs"].values():
        assert row["loss_a_lora1"] < row["loss_a_base"] - 0.1  # LoRA-1 learned A
        assert row["loss_b_lora1_lora2"] < row["loss_b_lora1"] - 0.05  # LoRA-2 learned B on top of it
        assert row["direction_lora2_over_lora1"] > 0.05  # and that move points from A towards B


@pytest.mark.parametrize("family", ["sdxl", "flux1", "zimage", "flux2", "qwenimage"])
def test_family_demos_run_every_workflow(tmp_path, monkeypatch, family):
    """`--demo --family sdxl|flux1|zimage|flux2|qwenimage`: tiny Base/Turbo pairs built once, the transfer chain with
    fit and fidelity printed, then the lora and differential workflows on the same project."""
    first = _demo(tmp_path, "transfer", "--family", family)
    assert first.returncode == 0, first.stderr
    assert "fit on training images cos" in first.stdout and "fidelity on held-out images cos" in first.stdout
    assert f"--demo --family {family}" in first.stdout
    out = tmp_path / f"pipeline-demo-{family}" / "output" / "transfer"
    assert (out / "student" / "student.safetensors").exists()
    assert sorted(p.name for p in (out / "lora1" / "previews").iterdir()) == ["step000060.png", "step000120.png"]
    assert _ran(tmp_path, monkeypatch, "transfer", "--family", family, "--set", "student.lr=1e-3") == ["student"]
    assert _ran(tmp_path, monkeypatch, "lora", "--family", family) == []
    # the differential chain on the same models, at a fifteenth of its steps: the wiring, not the result (which the SD
    # 1.5 demo's test checks at full length)
    short = ["--set", "differential.lora1.steps=10", "--set", "differential.lora2.steps=10"]
    diff = _again(tmp_path, monkeypatch, "run", "differential", "--demo", "--family", family, *short)
    assert "differential eval (held-out noise)" in diff.stdout
