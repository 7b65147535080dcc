"""Progress where a run happens: a bar on a terminal, whole lines elsewhere (CI, nohup), JSON lines for --json."""

from __future__ import annotations

import json

import pytest

from core import progress


@pytest.fixture(autouse=True)
def _restore_form():
    yield
    progress.configure("auto", 10.0)


def test_lines_show_count_rate_and_eta_then_the_total(capsys):
    progress.configure("lines", every=0.0)
    with progress.bar(total=4, desc="latents", unit="img", initial=1) as bar:
        bar.update(1)
        bar.set_postfix(loss="0.1234")
        bar.update(2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("latents: 2/4 img (50%), ") and "img/s, ETA 0:0" in lines[0]
    assert lines[-1].startswith("latents: 4/4 img (100%), ") and lines[-1].endswith(" s loss=0.1234")
    assert len(lines) == 3  # every update at every=0, and the closing line


def test_lines_wait_their_interval(capsys):
    progress.configure("lines", every=3600.0)
    for _ in progress.bar(range(50), desc="teacher", unit="step"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["teacher: 1/50 step (2%)", "teacher: 50/50 step (100%)"]


def test_json_lines_carry_the_figures(capsys):
    progress.configure("json", every=0.0)
    for _ in progress.bar(["a", "b"], desc="text", unit="caption"):
        pass
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["event"] for e in events] == ["progress", "progress", "done"]
    assert events[-1]["task"] == "text" and events[-1]["done"] == events[-1]["total"] == 2
    assert events[0]["eta_s"] is not None and events[0]["rate"] > 0


def test_nothing_when_disabled_or_off(capsys):
    progress.configure("lines", every=0.0)
    for _ in progress.bar(range(3), desc="prior", unit="step", enabled=False):
        pass
    progress.configure("off")
    for _ in progress.bar(range(3), desc="prior", unit="step"):
        pass
    assert capsys.readouterr().err == ""


def test_a_json_run_prints_progress_lines_on_stderr_and_one_document_on_stdout(project):
    """--json: stdout is the run report, stderr has JSON progress lines of the long stages (the latents, the text,
    training); a run outside a terminal prints plain lines instead of bars; --no-progress prints neither."""
    result = project.cli("run", "lora", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["workflow"] == "lora"
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    done = {e["task"]: e for e in events if e["event"] == "done"}
    assert {"latents", "text", "lora1"} <= set(done)
    steps = project.settings["lora1"]["steps"]
    assert done["lora1"]["done"] == done["lora1"]["total"] == steps and "loss" in done["lora1"]["postfix"]

    result = project.cli("run", "lora", "--set", "lora1.lr=2e-4")
    assert result.exit_code == 0, result.output
    assert f"lora1: {steps}/{steps} step (100%)" in result.stderr and "\r" not in result.stderr

    result = project.cli("run", "lora", "--set", "lora1.lr=3e-4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "lora1: " not in result.stderr.replace("lora1: running", "")
