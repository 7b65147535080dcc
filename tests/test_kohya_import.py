"""`pipeline import kohya`: a kohya dataset config as our settings, every key accounted for, and the result runs."""

from __future__ import annotations

import json
import shutil

from conftest import make_images

KOHYA = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 32
batch_size = 2
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 16
color_aug = false

  [[datasets.subsets]]
  image_dir = 'train/person'
  class_tokens = 'sks person'
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = 'train/style'
  caption_prefix = 'art, '
  flip_aug = true
  shufle_caption = true
  caption_dropout_rate = 0.1

  [[datasets.subsets]]
  image_dir = 'reg/person'
  is_reg = true
  shuffle_caption = false
"""


def _import(project, *args):
    (project.root / "dataset.toml").write_text(KOHYA)
    return project.cli("import", "kohya", str(project.root / "dataset.toml"), *args)


def test_every_kohya_key_is_mapped_or_named_with_its_reason(project):
    out = _import(project, "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    s = report["settings"]
    assert s["data"] == {"caption_extensions": [".txt"], "keep_tokens": 1}
    assert s["latents"] == {
        "resolution": 32, "buckets": "auto", "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 16
    }  # fmt: skip
    assert s["lora1"] == {"batch_size": 2}
    # the caption tricks the subsets set differently go to each subset (unset: data's, which is kohya's default)
    assert s["data.subsets"] == [
        {"images": "train/person", "default_caption": "sks person", "num_repeats": 3, "shuffle_caption": True,
         "name": "person-1"},
        {"images": "train/style", "caption_prefix": "art, ", "shuffle_caption": True, "caption_dropout_rate": 0.1},
        {"images": "reg/person", "is_reg": True, "shuffle_caption": False, "name": "person-3"},  # numbered names
    ]  # fmt: skip
    assert {"kohya": "general.shuffle_caption", "ours": "data.subsets[1].shuffle_caption"} in report["mapped"]
    why = {u["kohya"]: u["why"] for u in report["unmapped"]}
    assert "cached latents" in why["datasets[1].color_aug"]
    assert "check its spelling" in why["datasets[1].subsets[2].shufle_caption"]
    conflict = next(w for k, w in why.items() if "flip_aug" in k)  # set in one subset only: kohya's False elsewhere
    assert "latents.flip_aug" in conflict and "the subsets differ" in conflict
    assert {"kohya": "datasets[1].subsets[1].class_tokens", "ours": "data.subsets[1].default_caption"} in report[
        "mapped"
    ]
    assert report["written"] is None and report["toml"].startswith("# imported from")


def test_the_imported_config_runs_and_is_never_written_over(project):
    shutil.rmtree(project.root / "images")
    make_images(project.root / "train" / "person", 2)
    for p in (project.root / "train" / "person").glob("*.txt"):
        p.unlink()  # class_tokens captions them
    make_images(project.root / "train" / "style", 2, start=2)
    make_images(project.root / "reg" / "person", 3, start=4)
    out = _import(project, "--out", str(project.root / "imported.toml"))
    assert out.exit_code == 0, out.output
    assert "color_aug: not imported" in out.output and "wrote" in out.output
    config = project.root / "imported.toml"
    config.write_text(config.read_text() + '\n[model]\npath = "model"\n')  # what the closing line asks for
    run = project.cli("run", "lora", "-c", str(config), "--json", "--set", "lora1.steps=2", "--set", "lora1.rank=4")
    assert run.exit_code == 0, run.output
    items = json.loads(sorted(project.store.glob("stages/caption/*/manifest.json"))[-1].read_text())["record"]["items"]
    assert [i["caption"] for i in items if i["subset"] == "person-1"] == ["sks person"] * 2
    # 3x2 + 2 = 8 training copies an epoch: the 3 reg images get 3, 3 and 2
    assert [(i["repeats"], i.get("reg")) for i in items if i["subset"] == "person-3"] == [(3, True)] * 2 + [(2, True)]
    again = _import(project, "--out", str(config))
    assert again.exit_code == 2 and "already exists" in again.output


def test_files_kohya_would_not_read_either_are_clear_errors(project):
    bad = project.root / "bad.toml"
    bad.write_text("[[datasets]]\nresolution = [512, 768]\n[[datasets.subsets]]\nimage_dir = 'x'\n")
    out = project.cli("import", "kohya", str(bad))
    assert out.exit_code == 2 and "non-square resolution" in out.output
    bad.write_text("[general\n")
    out = project.cli("import", "kohya", str(bad))
    assert out.exit_code == 2 and "not a TOML file" in out.output
    out = project.cli("import", "kohya", str(project.root / "missing.toml"))
    assert out.exit_code == 2 and "no such file" in out.output and "Traceback" not in out.output
