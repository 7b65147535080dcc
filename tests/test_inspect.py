"""`pipeline inspect teacher|schedule|latents`: numbers that add up, pictures of the right size, clear errors."""

from __future__ import annotations

import json

from PIL import Image


def inspect(project, *args: str) -> dict:
    result = project.cli("inspect", *args, "-c", str(project.config), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_inspect_before_any_run_names_the_command_that_makes_the_artifact(transfer_project):
    result = transfer_project.cli("inspect", "teacher", "-c", str(transfer_project.config))
    assert result.exit_code == 2
    assert "there is no teacher artifact yet. Make it with `pipeline run transfer`" in result.output
    assert transfer_project.cli("inspect", "nonsense", "-c", str(transfer_project.config)).exit_code == 2


def test_inspect_teacher_schedule_and_latents(transfer_project, tmp_path):
    # 6 steps x 2 slots on 4 of the 6 images (2 held out), 4 rows on the held-out images and 4 more on the training
    # images (the fit set: one array each); latents at 32 px are (4, 4, 4).
    assert transfer_project.cli("run", "transfer", "--no-progress").exit_code == 0
    teacher = inspect(transfer_project, "teacher", "--out", str(tmp_path / "sheets"), "--step", "2")
    delta = teacher["arrays"]["delta_cond"]
    assert delta["arrays"] == 6 + 2 and delta["shape"] == [2, 4, 4, 4] and delta["dtype"] == "float16"
    assert delta["nonfinite"] == 0 and delta["bytes"] > 0
    assert sum(b["rows"] for b in teacher["bins"]) == 12  # every scheduled row lands in one timestep bin
    assert all(b["max_abs"] >= b["mean_abs"] > 0 for b in teacher["bins"] if b["rows"])
    assert teacher["bytes_per_sample_step"] > 0
    (sheet,) = teacher["sheets"]
    # 4 columns (clean, teacher, +LoRA, |delta|) of 32 px; a 12 px header, then one 32 px row per slot.
    assert Image.open(sheet).size == (4 * 32, 12 + 2 * 32)

    schedule = inspect(transfer_project, "schedule", "--step", "5")
    assert schedule["rows"] == 12 and schedule["heldout"] == 4
    assert sum(b["rows"] for b in schedule["timesteps"]) == 12 == sum(schedule["items"].values())
    assert [r["k"] for r in schedule["steps"]["5"]] == [5, 5] and len(schedule["items"]) == 4

    latents = inspect(transfer_project, "latents", "--out", str(tmp_path / "sheets"))
    assert latents["items"] == 6 and latents["shape"] == [4, 4, 4] and latents["nonfinite"] == 0
    assert len(latents["channels"]) == 4
    assert Image.open(latents["sheets"][0]).size == (6 * 32, 32)

    bad = transfer_project.cli("inspect", "teacher", "-c", str(transfer_project.config), "--out", "x", "--step", "6")
    assert bad.exit_code == 2 and "the schedule has steps 0 to 5" in bad.output
