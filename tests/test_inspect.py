"""`pipeline inspect teacher|schedule|latents`: numbers that add up, pictures of the right size, clear errors."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image


def inspect(project, *args: str) -> dict:
    result = project.cli("inspect", *args, "-c", str(project.config), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_inspect_before_any_run_names_the_command_that_makes_the_artifact(transfer_project):
    result = transfer_project.cli("inspect", "teacher", "-c", str(transfer_project.config))
    assert result.exit_code == 2
    assert "there is no transfer run in this store yet, so no teacher artifact" in result.output
    assert "`pipeline run transfer` makes one" in result.output
    assert transfer_project.cli("inspect", "nonsense", "-c", str(transfer_project.config)).exit_code == 2


def test_inspect_teacher_schedule_and_latents(transfer_project, tmp_path):
    from stages.training.previews import heat_colours

    # 6 steps x 2 slots on 4 of the 6 images (2 held out), 4 rows on the held-out images and 4 more on the training
    # images (the fit set: one array each); latents at 32 px are (4, 4, 4).
    assert transfer_project.cli("run", "transfer", "--no-progress").exit_code == 0
    teacher = inspect(transfer_project, "teacher", "--out", str(tmp_path / "sheets"), "--step", "2")
    delta = teacher["arrays"]["delta_cond"]
    assert delta["arrays"] == 6 + 2 and delta["shape"] == [2, 4, 4, 4] and delta["dtype"] == "float16"
    assert delta["nonfinite"] == 0 and delta["bytes"] > 0
    assert sum(b["rows"] for b in teacher["bins"]) == 12  # every scheduled row lands in one timestep bin
    assert all(b["max_abs"] >= b["mean_abs"] > 0 for b in teacher["bins"] if b["rows"])
    assert teacher["bytes_per_sample_step"] > 0 and teacher["weights_dtype"] == "fp32"
    (sheet,) = teacher["sheets"]
    # 4 columns (clean, teacher, +LoRA, |delta|) of 32 px shown at 256 px, one row per slot with its label on the
    # left, and under them the colour scale of the |delta| maps: the heatmaps' ramp from black to white.
    picture = np.asarray(Image.open(sheet).convert("RGB"))
    assert picture.shape[1] >= 200 + 4 * 256 and picture.shape[0] >= 2 * 256
    bar = min(picture.shape[1] - 16, 512)
    ramp = heat_colours(np.linspace(0, 1, bar))
    assert any(np.array_equal(picture[y, 8 : 8 + bar], ramp) for y in range(picture.shape[0])), "no colour scale"

    schedule = inspect(transfer_project, "schedule", "--step", "5")
    assert schedule["rows"] == 12 and schedule["heldout"] == 4
    assert sum(b["rows"] for b in schedule["timesteps"]) == 12 == sum(schedule["items"].values())
    assert [r["k"] for r in schedule["steps"]["5"]] == [5, 5] and len(schedule["items"]) == 4

    latents = inspect(transfer_project, "latents", "--out", str(tmp_path / "sheets"))
    assert latents["items"] == 6 and latents["shape"] == [4, 4, 4] and latents["nonfinite"] == 0
    assert len(latents["channels"]) == 4
    assert Image.open(latents["sheets"][0]).size[0] >= 6 * 256  # six cells of at least 256 px

    bad = transfer_project.cli("inspect", "teacher", "-c", str(transfer_project.config), "--out", "x", "--step", "6")
    assert bad.exit_code == 2 and "the schedule has steps 0 to 5" in bad.output


def test_inspect_dataset_before_any_run(project, tmp_path):
    """A messy folder as a user brings it: sizes, shapes, formats, enlarged and duplicate images, missing captions
    and tag counts, each as the numbers say, with contact sheets per aspect-ratio group; no model is loaded."""
    import shutil

    images = project.root / "images"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(images / "tiny.png")  # below latents.resolution = 32
    (images / "tiny.txt").write_text("sks, tiny, dark")
    Image.new("RGB", (40, 90), (200, 10, 10)).save(images / "tall.jpg")  # no caption file
    frames = [Image.new("RGB", (64, 48), c) for c in ("red", "blue")]
    frames[0].save(images / "anim.gif", save_all=True, append_images=frames[1:])
    (images / "anim.txt").write_text("anim")
    first = sorted(images.glob("*.png"))[0]
    shutil.copy(first, images / "copy-of-first.png")
    shutil.copy(first.with_suffix(".txt"), images / "copy-of-first.txt")
    project.write_config(data={"default_caption": "a photo"})

    report = inspect(project, "dataset", "--out", str(tmp_path / "sheets"))
    assert report["images"] == 6 + 4
    assert report["smallest"] == {"path": "tiny.png", "size": "20x20"}
    assert report["enlarged"] == [{"path": "tiny.png", "size": "20x20"}]
    assert report["multi_frame"] == ["anim.gif"]
    assert {"copy-of-first.png", first.name} in [set(d) for d in report["duplicates"]]
    assert report["captions"]["missing"] == ["tall.jpg"]
    groups = {g["group"]: g["images"] for g in report["aspect_ratios"]}
    assert groups["tall (< 3:4)"] == 1 and groups["1:1 .. 4:3"] == 1 and groups["square"] == 8
    assert report["captions"]["tags_max"] == 3  # "sks, tiny, dark"
    assert {"tag": "sks", "images": 1} in report["top_tags"]
    assert not (project.store / "stages").exists(), "inspect runs no stage"
    sheets = [Image.open(p) for p in report["sheets"]]
    assert len(sheets) == 3 and sum(s.size[0] * s.size[1] for s in sheets) > 0
    square = next(s for p, s in zip(report["sheets"], sheets, strict=True) if "square" in p)
    assert square.size == (8 * 128, 128 + 12)  # 8 thumbnails in one labelled row
    text = project.cli("inspect", "dataset", "-c", str(project.config)).output
    assert "tiny.png" in text and "without a caption" in text and "duplicates" in text
