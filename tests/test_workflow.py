"""The lora workflow end to end on a tiny model: reuse, partial re-runs, status causes, --only, --dry-run."""

from __future__ import annotations

import json

import pytest
from conftest import actions, make_images


def test_first_run_runs_everything_second_run_reuses_everything(project):
    first = project.run_json()
    assert actions(first) == {"caption": "ran", "latents": "ran", "text": "ran", "lora1": "ran"}
    lora = [o for o in first["stages"][-1]["outputs"] if o.endswith("lora1.safetensors")]
    assert lora and (project.root / "output/lora/lora1/diffusers/pytorch_lora_weights.safetensors").exists()
    second = project.run_json()
    assert actions(second) == {s: "reused" for s in ("caption", "latents", "text", "lora1")}
    assert [s["key"] for s in second["stages"]] == [s["key"] for s in first["stages"]]


def test_changing_the_learning_rate_reruns_only_lora1_and_status_says_why(project):
    project.run_json()
    status = json.loads(project.cli("status", "lora", "--json", "--set", "lora1.lr=5e-4").stdout)
    states = {s["name"]: (s["state"], s["causes"]) for s in status["stages"]}
    assert states["lora1"] == ("stale", ["params lora1.lr 0.001 → 0.0005"])
    assert {n for n, (state, _) in states.items() if state == "fresh"} == {"caption", "latents", "text"}
    rerun = project.run_json("--set", "lora1.lr=5e-4")
    assert actions(rerun) == {"caption": "reused", "latents": "reused", "text": "reused", "lora1": "ran"}


def test_adding_three_images_encodes_three(project):
    project.run_json()
    make_images(project.root / "images", 3, start=6)
    status = json.loads(project.cli("status", "lora", "--json").stdout)
    caption = next(s for s in status["stages"] if s["name"] == "caption")
    assert caption["causes"] == ["input: 3 images added", "input: 3 caption files added"]
    report = project.run_json()
    latents = next(s for s in report["stages"] if s["name"] == "latents")
    assert latents["summary"] == "3 encoded, 6 reused"


def test_runtime_settings_rerun_nothing(project):
    project.run_json()
    report = project.run_json("--set", "runtime.checkpoint_every=0", "--set", "runtime.log_level=warning")
    assert set(actions(report).values()) == {"reused"}


def test_only_runs_one_stage_on_existing_upstream(project):
    result = project.cli("run", "lora", "--only", "lora1")
    assert result.exit_code == 2
    assert "pipeline run lora --only caption" in result.output
    project.run_json()
    report = project.run_json("--only", "lora1", "--set", "lora1.steps=4")
    assert actions(report) == {"lora1": "ran"}
    # --only against upstream from the last run even though the current config would re-make it
    report = project.run_json("--only", "lora1", "--set", "latents.resolution=40", "--set", "lora1.steps=3")
    assert actions(report) == {"lora1": "ran"}


def test_dry_run_prints_the_plan_and_runs_nothing(project):
    result = project.cli("run", "lora", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would run" in result.output and "never run" in result.output
    assert not project.manifests("caption")


def test_status_before_any_run_says_missing(project):
    status = json.loads(project.cli("status", "lora", "--json").stdout)
    assert {s["state"] for s in status["stages"]} == {"missing"}


def test_gc_removes_only_what_no_ref_reaches(project):
    project.run_json()
    project.run_json("--set", "lora1.lr=5e-4")  # the lr=1e-3 lora1 artifact is now unreferenced
    from typer.testing import CliRunner

    from cli import app

    dry = json.loads(CliRunner().invoke(app, ["gc", "-c", str(project.config), "--dry-run", "--json"]).stdout)
    kinds = sorted(r["kind"] for r in dry["removed"])
    assert kinds.count("stage") == 1 and "object" in kinds and dry["bytes"] > 0
    assert len(project.manifests("lora1")) == 2  # dry run removed nothing
    real = json.loads(CliRunner().invoke(app, ["gc", "-c", str(project.config), "--json"]).stdout)
    assert real["bytes"] == dry["bytes"]
    assert len(project.manifests("lora1")) == 1
    assert set(actions(project.run_json("--set", "lora1.lr=5e-4")).values()) == {"reused"}


def test_run_processes_checks_the_config_once_before_starting_any(project, monkeypatch):
    result = project.cli("run", "lora", "--processes", "2", "--set", "lora1.stepz=6")
    assert result.exit_code == 2 and result.output.count("unknown key `lora1.stepz`") == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun already
    result = project.cli("run", "lora", "--processes", "2")
    assert result.exit_code == 2 and "already runs under a launcher" in result.output
    assert "Traceback" not in result.output and not project.manifests("caption")


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_under_a_launcher_rank_0_alone_says_a_config_error(project, monkeypatch, rank, said):
    """Every process of torchrun / accelerate launch reads the same config: its error is printed once, by rank 0;
    the others exit with the same code and say nothing (before any process group is joined)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    result = project.cli("run", "lora", "--set", "lora1.stepz=6")
    assert result.exit_code == 2 and ("unknown key `lora1.stepz`" in result.output) == said
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # the launcher's settings: the same
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "4")
    result = project.cli("run", "lora")
    assert result.exit_code == 2 and ("zero_stage is '4'" in result.output) == said
    assert "Traceback" not in result.output and not project.manifests("caption")


def test_sigterm_stops_a_command_once_and_never_inside_its_exit(monkeypatch):
    """The first SIGTERM stops the command (Terminated, said as 'interrupted'); a second one, or one that arrives
    while the command runs its exit hooks (a launcher stopping every process of a run whose peer failed), is
    ignored rather than raised inside the interpreter's clean-up as a traceback."""
    import os
    import signal
    import sys
    import time

    import cli
    from pipeline.cli_common import Terminated, on_sigterm

    def delivered():  # a signal to this process is handled between two bytecodes: give it some
        for _ in range(1000):
            time.sleep(0.001)

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, on_sigterm)
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            delivered()
        os.kill(os.getpid(), signal.SIGTERM)  # the second: no exception
        delivered()
        monkeypatch.setattr(sys, "argv", ["pipeline", "--version"])
        with pytest.raises(SystemExit):
            cli.main()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the command ended: its exit is not interrupted
    finally:
        signal.signal(signal.SIGTERM, before)
