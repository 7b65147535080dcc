"""[[data.subsets]]: folders with their own num_repeats and caption settings (kohya's subsets), each image an item
under its subset's name, repeated in every epoch's order by lora1 and the transfer schedule."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from conftest import make_images

from stages.training.sampling import BatchOrder


def _subsets(project, **extra) -> None:
    for folder in ("images", "people", "style"):
        shutil.rmtree(project.root / folder, ignore_errors=True)
    make_images(project.root / "people", 3)
    make_images(project.root / "style", 3, start=3)
    (project.root / "style" / sorted(p.name for p in (project.root / "style").glob("*.txt"))[0]).unlink()
    settings = project.settings["data"] = {}
    settings["subsets"] = [
        {"images": "people", "num_repeats": 1},
        {"images": "style", "name": "art", "num_repeats": 3, "caption_prefix": "sks, ", "default_caption": "a shape"},
    ]
    settings.update(extra)
    project.write_config()


def test_repeats_count_each_copy_once_per_epoch_within_buckets_too():
    order = BatchOrder(5, 2, 3, repeats=(1, 3, 2))  # 6 copies: an epoch is 3 micro-steps
    assert Counter(i for k in range(3) for i in order.batch(k)) == {0: 1, 1: 3, 2: 2}
    assert order.epoch(2, 1) == 1 and order.epoch(3, 0) == 2
    bucketed = BatchOrder(5, 2, 4, groups=((0, 1), (2, 3)), repeats=(1, 3, 1, 1))
    epoch = [bucketed.batch(k) for k in range(bucketed.per_epoch)]
    assert all(set(b) <= {0, 1} or set(b) <= {2, 3} for b in epoch)
    assert Counter(i for b in epoch for i in b) == {0: 1, 1: 3, 2: 1, 3: 1}
    assert BatchOrder(5, 2, 3, repeats=(1, 1, 1)).batch(4) == BatchOrder(5, 2, 3).batch(4)  # 1s: the plain order


def test_subsets_have_their_own_captions_and_repeats_and_lora_trains_on_them(project, monkeypatch):
    from stages.training.loop import DiffusionBatches

    _subsets(project)
    drawn = []
    real = DiffusionBatches.micro_batch

    def recording(self, k, denoiser, process):  # the real method; records which items each micro-step takes
        drawn.append(self.order.batch(k))
        return real(self, k, denoiser, process)

    monkeypatch.setattr(DiffusionBatches, "micro_batch", recording)
    out = project.run_json("--set", "lora1.steps=6")  # 3 + 3x3 = 12 copies: 6 micro-steps of 2 are one epoch
    assert {s["name"]: s["action"] for s in out["stages"]}["lora1"] == "ran"
    items = json.loads(project.manifests("caption")[-1].read_text())["record"]["items"]
    assert [(i["subset"], i["repeats"]) for i in items] == [("people", 1)] * 3 + [("art", 3)] * 3
    assert all(i["id"].startswith(f"{i['subset']}/{i['path']}@") for i in items)
    art = [i["caption"] for i in items if i["subset"] == "art"]
    assert art[0] == "sks, a shape" and all(c.startswith("sks, a ") for c in art)
    assert all(not i["caption"].startswith("sks") for i in items if i["subset"] == "people")
    assert Counter(i for b in drawn for i in b) == {0: 1, 1: 1, 2: 1, 3: 3, 4: 3, 5: 3}


def test_subset_settings_key_the_captions_and_everything_after(project):
    from test_keys import keys

    _subsets(project)
    base = keys(project, workflow="lora")
    repeats = keys(
        project, "data.subsets=[{images='people'}, {images='style', name='art', num_repeats=2}]", workflow="lora"
    )
    assert {s for s in base if base[s] != repeats[s]} == set(base)  # the caption table and everything after it
    project.settings["data"].pop("subsets")
    project.settings["data"]["images"] = "people"
    project.write_config()
    plain = keys(project, workflow="lora")
    assert plain != base  # another data set; and without subsets the caption params have no "subsets" entry
    from stages.caption import CaptionParams

    assert "subsets" not in CaptionParams(caption_extensions=[".txt"], default_caption=None, caption_prefix="",
                                          caption_suffix="").model_dump()  # fmt: skip


def test_subset_mistakes_are_named(project):
    _subsets(project, images="images")
    out = project.cli("run", "lora")
    assert out.exit_code == 2 and "data.images and [[data.subsets]] both name training images" in out.output
    _subsets(project)
    project.settings["data"]["subsets"].append({"images": "people"})
    project.write_config()
    out = project.cli("run", "lora")
    assert out.exit_code == 2 and "the name 'people' is used twice" in out.output
    _subsets(project)
    project.settings["data"]["subsets"][0]["images"] = "nowhere"
    project.write_config()
    out = project.cli("run", "lora")
    assert out.exit_code != 0 and "data.subsets (subset nowhere): images: the folder" in out.output
    assert "Traceback" not in out.output


@pytest.mark.parametrize("workflow", ["transfer"])
def test_the_transfer_schedule_repeats_items_as_lora1_does(transfer_project, workflow):
    _subsets(transfer_project)
    transfer_project.write_config(schedule={"steps": 6, "batch_size": 2, "heldout_images": 0})
    out = transfer_project.run_json(workflow=workflow)
    assert {s["name"]: s["action"] for s in out["stages"]}["student"] == "ran"
    from cache.store import Store

    schedule = json.loads(transfer_project.manifests("schedule")[-1].read_text())["outputs"]["schedule.json"]["digest"]
    rows = json.loads(Store(transfer_project.store).read_object(schedule).read_text())["rows"]
    counts = Counter(r["item"].split("/")[0] for r in rows)
    assert counts == {"people": 3, "art": 9}  # 12 slots: one epoch of 3 + 3x3 copies
