"""Messy folders: every format and mode Pillow reads decodes to the RGB a viewer shows (values by hand), multi-frame
files train on frame 0 and say so, unreadable files stop the run or are skipped and listed, formats that need a
plugin name it, and the VAE sees a contiguous batch (its latents equal a plain encode)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.errors import DataError
from stages.dataset import load_image, scan_images


def _rgb(path) -> np.ndarray:
    return np.asarray(load_image(path)).astype(int)


def test_modes_decode_to_the_rgb_a_viewer_shows(tmp_path):
    # 16-bit grayscale: 65535 * 0.5 is mid-grey (128), not clipped to white as Pillow's convert("RGB") would
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert (_rgb(tmp_path / "g16.png") == 128).all()
    # 16-bit TIFF, the scanner's format
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "scan.tif")
    assert (_rgb(tmp_path / "scan.tif") == 255).all()
    # RGBA: half-transparent red composited on white is (255, 127/128, 127/128)
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    got = _rgb(tmp_path / "rgba.png")[0, 0]
    assert got[0] == 255 and abs(got[1] - 127) <= 1 and abs(got[2] - 127) <= 1
    # fully transparent black is white, not black
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (_rgb(tmp_path / "clear.png") == 255).all()
    # a palette image with a transparent index
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=0)
    assert (_rgb(tmp_path / "pal.png")[0, 0] == [0, 255, 0]).all()
    pal.save(tmp_path / "pal-clear.png", transparency=1)
    assert (_rgb(tmp_path / "pal-clear.png") == 255).all()
    # grayscale and CMYK
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert (_rgb(tmp_path / "l.png") == 77).all()
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    got = _rgb(tmp_path / "cmyk.jpg")[0, 0]
    assert got[0] > 245 and got[1] < 10 and got[2] < 10  # cyan 0, magenta and yellow full: red


def test_upper_case_extensions_tiff_and_gif_are_images(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "A.PNG")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "B.JPG")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "c.tiff")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "d.gif")
    from cache.hashing import StatMemo

    entries = scan_images(tmp_path, [".txt"], StatMemo(tmp_path / "memo.json"))
    assert [e.relpath for e in entries] == ["A.PNG", "B.JPG", "c.tiff", "d.gif"]


def test_a_format_that_needs_a_plugin_names_it(tmp_path):
    from cache.hashing import StatMemo

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "b.jxl").write_bytes(b"\xff\x0a")
    with pytest.raises(DataError, match=r"b\.jxl are JXL images.*pip install pillow-jxl-plugin.*convert them to PNG"):
        scan_images(tmp_path, [".txt"], StatMemo(tmp_path / "memo.json"))


def _gif(path, colors):
    frames = [Image.new("RGB", (48, 48), c) for c in colors]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)


def test_a_multi_frame_file_trains_on_its_first_frame_and_says_so(project):
    _gif(project.root / "images" / "anim.gif", [(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    (project.root / "images" / "anim.txt").write_text("a red square")
    assert (_rgb(project.root / "images" / "anim.gif")[0, 0] == [255, 0, 0]).all()  # frame 0, not the last one
    result = project.cli("run", "lora", "--only", "caption")
    assert result.exit_code == 0, result.output
    status = project.cli("status", "lora")
    assert "multi-frame files train on their first frame: anim.gif (3 frames)" in status.output
    record = json.loads(project.manifests("caption")[0].read_text())["record"]
    assert record["multi_frame"] == [{"path": "anim.gif", "frames": 3}]


def test_unreadable_images_stop_the_run_or_are_skipped_and_listed(project):
    (project.root / "images" / "000_red_circle.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    (project.root / "images" / "001_green_square.png").write_bytes(b"GIF89a")
    result = project.cli("run", "lora", "--only", "caption")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "2 problem(s)" in result.output and "000_red_circle.png" in result.output
    assert "001_green_square.png" in result.output and 'data.on_unreadable = "skip"' in result.output
    assert not project.manifests("caption"), "a failed run committed an artifact"

    project.write_config(data={"on_unreadable": "skip"})
    report = project.run_json("--only", "caption")
    assert report["stages"][0]["summary"] == "4 captions, 2 unreadable skipped"
    record = json.loads(project.manifests("caption")[0].read_text())["record"]
    assert [s["path"] for s in record["skipped"]] == ["000_red_circle.png", "001_green_square.png"]
    assert all("cannot decode" in s["reason"] for s in record["skipped"])
    assert all(not i["path"].startswith(("000", "001")) for i in record["items"])
    status = project.cli("status", "lora")
    assert "2 unreadable image(s) skipped: 000_red_circle.png (cannot decode" in status.output


def test_skip_keys_the_caption_table_and_error_does_not_need_to(project):
    from tests.test_keys import keys

    base = keys(project, workflow="lora")
    assert keys(project, "data.on_unreadable='error'", workflow="lora") == base
    skip = keys(project, "data.on_unreadable='skip'", workflow="lora")
    assert all(skip[s] != base[s] for s in base)  # its table may lack images: everything downstream differs


def test_the_vae_gets_a_contiguous_batch_and_the_latents_equal_a_plain_encode(project):
    """The stored latents are vae.encode(x).latent_dist.mode() of the plain contiguous batch, to float tolerance
    (a channels-last batch, as np.stack of transposed views gave, differs by up to 4e-3 on the tiny model)."""
    import torch

    from stages.dataset import center_crop_pixels
    from stages.families.sd15 import SD15Family

    report = project.run_json("--only", "caption")
    assert report["stages"][0]["action"] == "ran"
    assert project.run_json("--only", "latents")["stages"][0]["action"] == "ran"
    record = json.loads(project.manifests("latents")[0].read_text())["record"]
    items = json.loads(project.manifests("caption")[0].read_text())["record"]["items"]
    family = SD15Family()
    vae = family.load_vae(family.layout(project.root / "model", None), "cpu")
    pixels = torch.stack(
        [torch.from_numpy(center_crop_pixels(load_image(project.root / "images" / i["path"]), 32)) for i in items]
    )
    assert pixels.is_contiguous()
    with torch.no_grad():
        want = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    from cache.store import Store

    pool = Store(project.store).pool(record["pool"])
    stored = [record["items"][i["id"]] for i in items]
    got = torch.stack([torch.from_numpy(pool.get(s["array"], s["digest"])) for s in stored])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_images_smaller_than_the_resolution_are_named_as_enlarged(project):
    Image.new("RGB", (16, 12), (200, 10, 10)).save(project.root / "images" / "tiny.png")
    (project.root / "images" / "tiny.txt").write_text("a red square")
    result = project.cli("run", "lora", "--only", "caption")
    assert result.exit_code == 0, result.output
    result = project.cli("run", "lora", "--only", "latents")
    assert result.exit_code == 0, result.output
    note = "1 image(s) are smaller than latents.resolution = 32 px and were enlarged to it"
    assert note in result.output and "tiny.png 16x12 (2.67x)" in result.output
    status = project.cli("status", "lora")
    assert f"latents: {note}" in status.output
    record = json.loads(project.manifests("latents")[0].read_text())["record"]
    assert record["upscaled"] == [{"path": "tiny.png", "size": [16, 12], "factor": 2.67}]
