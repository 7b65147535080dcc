"""Bad input: a clear message naming the file or field and the fix, a non-zero exit, nothing committed."""

from __future__ import annotations

import shutil

import pytest


def _fails(project, *args, expect: list[str], committed: tuple[str, ...] = ()):
    result = project.cli("run", "lora", *args)
    assert result.exit_code == 2, result.output
    for text in expect:
        assert text in result.output, result.output
    assert "Traceback" not in result.output
    stages = {p.parent.parent.name for p in project.store.glob("stages/*/*/manifest.json")}
    assert stages == set(committed), "a failed run committed an artifact"
    return result.output


def test_corrupt_image(project):
    (project.root / "images" / "000_red_circle.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    _fails(project, expect=["000_red_circle.png", "cannot decode", "Replace or remove"])


def test_truncated_image(project):
    path = project.root / "images" / "001_green_square.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _fails(project, expect=["001_green_square.png", "cannot decode"])


def test_non_image_file(project):
    (project.root / "images" / "notes.pdf").write_bytes(b"%PDF-1.4")
    _fails(project, expect=["notes.pdf", "neither images", "Move them out"])


def test_missing_caption(project):
    (project.root / "images" / "002_blue_triangle.txt").unlink()
    _fails(project, expect=["002_blue_triangle.png", "no caption file", "data.default_caption"])


def test_missing_caption_uses_default_caption(project):
    (project.root / "images" / "002_blue_triangle.txt").write_text("  \n")
    project.write_config(data={"default_caption": "a shape"})
    report = project.run_json()
    assert report["stages"][0]["summary"] == "6 captions"


def test_missing_images_folder(project):
    shutil.rmtree(project.root / "images")
    _fails(project, expect=["data.images", "does not exist", "images"])


def test_empty_images_folder(project):
    shutil.rmtree(project.root / "images")
    (project.root / "images").mkdir()
    _fails(project, expect=["contains no images"])


def test_wrong_model_path(project):
    project.write_config(model={"path": "no/such/model"})
    _fails(project, expect=["model.path", "no/such/model", "does not exist"])


@pytest.mark.parametrize("component", ["vae", "unet", "tokenizer"])
def test_model_folder_missing_a_component(project, component):
    shutil.rmtree(project.root / "model" / component)
    _fails(project, expect=["model.path", f"missing {component}/"])


def test_model_weights_only_in_pickle_format(project):
    unet = project.root / "model" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    _fails(project, expect=["no .safetensors weights", "pickle"])


def test_pickle_single_file_is_refused(project):
    (project.root / "sd.ckpt").write_bytes(b"not loaded")
    project.write_config(model={"path": "sd.ckpt"})
    _fails(project, expect=["sd.ckpt", "pickle", ".safetensors"])


def test_config_typo_names_the_key_and_the_closest_valid_one(project):
    project.config.write_text(project.config.read_text().replace("[lora1]", "[lora1]\nlearnig_rate = 1e-4"))
    _fails(project, expect=["unknown key `lora1.learnig_rate`", "did you mean `lora1.lr`"])


def test_set_typo_and_bad_value(project):
    _fails(project, "--set", "lora1.rnak=8", expect=["unknown key `lora1.rnak`", "`lora1.rank`"])
    _fails(project, "--set", "lora1.rank=abc", expect=["`lora1.rank`", "valid integer"])
    _fails(project, "--set", "latents.resolution=30", expect=["`latents.resolution`", "multiple of 8"])
    _fails(project, "--set", "lora1", expect=["expected dotted.key=value"])


def test_unknown_section(project):
    project.config.write_text(project.config.read_text() + "\n[lora2]\nlr = 1.0\n")
    _fails(project, expect=["unknown key `lora2`"])


def test_unknown_workflow_and_stage(project):
    out = _fails_any(project, "run", "lroa")
    assert "unknown workflow 'lroa'" in out and "lora" in out
    out = _fails_any(project, "run", "lora", "--only", "lora9")
    assert "no stage 'lora9'" in out and "lora1" in out


def _fails_any(project, *args):
    result = project.cli(*args)
    assert result.exit_code == 2, result.output
    return result.output


def test_targets_that_match_nothing(project):
    # Only the model knows its module names: the valid upstream stages commit, lora1 does not.
    _fails(
        project,
        "--set",
        'lora1.targets=["to_qq"]',
        expect=["lora1.targets", "matched no module", "to_q"],
        committed=("caption", "latents", "text"),
    )


def test_a_block_that_the_model_does_not_have(project):
    _fails(
        project,
        "--set",
        'lora1.block_lr={"down_blocks.7" = 0.5}',
        expect=["lora1.block_lr: 'down_blocks.7' names no block", "down_blocks.0, up_blocks.1, mid_block"],
        committed=("caption", "latents", "text"),
    )


def test_fp16_on_cpu_is_refused_with_the_alternatives(project):
    _fails(project, "--set", "lora1.mixed_precision=fp16", expect=["fp16", "CUDA", "bf16"])


def test_missing_config_file(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["run", "lora", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "pipeline init" in result.output


def test_disk_full_while_committing_is_reported_and_the_next_run_recovers(project):
    """/dev/full answers every write with ENOSPC: put it where the caption manifest's temp file goes."""
    import os

    from cache.store import Store
    from pipeline.config_loading import load_config
    from pipeline.planner import plan_workflow
    from pipeline.workflows import get_workflow
    from stages.base import PlanEnv

    loaded = load_config(project.config)
    env = PlanEnv(loaded, Store(loaded.store_dir))
    key = plan_workflow(env, get_workflow("lora", env), {})[0].key
    stage_dir = project.store / "stages" / "caption" / key
    stage_dir.mkdir(parents=True)
    tmp = stage_dir / f".manifest.json.tmp{os.getpid()}"
    tmp.symlink_to("/dev/full")
    result = project.cli("run", "lora")
    assert result.exit_code == 1, result.output
    assert "disk is full" in result.output and "run the same command again" in result.output
    assert not project.manifests("caption")
    tmp.unlink()
    assert {s["action"] for s in project.run_json()["stages"]} == {"ran"}


@pytest.mark.parametrize(
    "setting, message",
    [
        ("lora1.lr=0", "a learning rate of 0 trains nothing"),
        ("lora1.lr=nan", "finite number"),
        ("lora1.lr=inf", "finite number"),
        ("student.guidance=nan", "finite number"),
        ("schedule.caption_dropout=-inf", "finite number"),
    ],
)
def test_zero_negative_and_non_finite_numbers_are_validation_errors(project, setting, message):
    out = _fails(project, "--set", setting, expect=[setting.split("=")[0], message])
    assert "cannot hash" not in out


def test_a_negative_learning_rate_is_refused_by_an_optimizer_that_cannot_ascend(project):
    _fails(
        project, "--set", "lora1.optimizer='prodigy'", "--set", "lora1.lr=-1",
        expect=["lora1.lr = -1 trains by gradient ascent", "prodigy has no such mode", "lora1.optimizer = 'adamw'"],
    )  # fmt: skip


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with almost no pixel data: what a decompression bomb looks like
    to a loader that trusts the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def test_a_decompression_bomb_is_refused_by_name_before_decoding(project):
    _png_header_only(project.root / "images" / "000_red_circle.png", 20000, 20000)
    _fails(project, expect=["000_red_circle.png", "20000x20000", "runtime.max_image_pixels"])


def test_the_image_size_limit_is_a_setting(project):
    _fails(project, "--set", "runtime.max_image_pixels=1000", expect=["48x48 = 2,304 pixels", "max_image_pixels"])


def test_exif_orientation_is_applied(tmp_path):
    """A portrait phone photo is stored landscape with Orientation = 6 (rotate 90° clockwise to view)."""
    import numpy as np
    from PIL import Image

    from stages.dataset import load_image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high as stored
    stored[:, :10] = 255  # a white band on the stored left edge
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert upright.shape[:2] == (40, 20), "shown portrait: 20 wide, 40 high"
    # rotating 90° clockwise moves the stored left edge to the top
    assert upright[:10].mean() > 200 and upright[-10:].mean() < 50


def test_symlinked_sub_folders_are_followed(project, tmp_path):
    from conftest import make_images

    elsewhere = tmp_path.parent / (tmp_path.name + "-elsewhere")
    make_images(elsewhere, 2, start=6)
    (project.root / "images" / "linked").symlink_to(elsewhere, target_is_directory=True)
    report = project.run_json()
    assert report["stages"][0]["summary"] == "8 captions"
    caption = next(project.store.glob("stages/caption/*/manifest.json"))
    import json

    paths = [i["path"] for i in json.loads(caption.read_text())["record"]["items"]]
    assert sum(p.startswith("linked/") for p in paths) == 2


def test_a_symlink_cycle_in_the_data_folder_is_named(project):
    (project.root / "images" / "loop").symlink_to(project.root / "images", target_is_directory=True)
    _fails(project, expect=["loop", "links back to", "Remove or fix that link"])
