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
    _subsets(project)
    project.settings["data"]["subsets"][1].update(shuffle_captions=True, keep_tokens=-1)
    project.write_config()
    out = project.cli("run", "lora")
    assert out.exit_code == 2 and "did you mean `data.subsets[2].shuffle_caption`?" in out.output
    assert "`data.subsets[2].keep_tokens` in pipeline.toml: Input should be greater than or equal to 0" in out.output


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


# -- regularization images (is_reg, data.prior_loss_weight) ---------------------------------------------------------


def test_regularization_images_are_balanced_against_the_training_copies_as_kohya_does():
    from stages.caption import balance_regularization

    def items(train_repeats, reg_repeats):
        train = [{"id": f"t{n}", "repeats": r} for n, r in enumerate(train_repeats)]
        reg = [{"id": f"r{n}", "path": f"{n}.png", "subset": "reg", "repeats": r, "reg": True}
               for n, r in enumerate(reg_repeats)]  # fmt: skip
        return train + reg

    kept, summary = balance_regularization(items([3, 3, 2], [1] * 5))  # 8 training copies, 5 reg images
    assert [i["repeats"] for i in kept if i.get("reg")] == [2, 2, 2, 1, 1]
    assert summary == {"images": 5, "copies": 8, "training_copies": 8, "unused": []}
    kept, summary = balance_regularization(items([2, 2], [1] * 6))  # 4 copies: the first 4 reg images, once each
    assert [i["id"] for i in kept if i.get("reg")] == ["r0", "r1", "r2", "r3"]
    assert summary["unused"] == ["reg/4.png", "reg/5.png"]
    kept, _ = balance_regularization(items([5], [2, 1]))  # own repeats first (2 + 1), then one more each in turn
    assert [i["repeats"] for i in kept if i.get("reg")] == [3, 2]


def _with_reg(project, **data) -> None:
    _subsets(project)
    make_images(project.root / "class", 4, start=6)
    project.settings["data"]["subsets"].append({"images": "class", "is_reg": True})
    project.settings["data"].update(data)
    project.write_config()


def test_regularization_images_train_with_their_loss_weight(project, monkeypatch):
    import stages.training.loop as loop

    _with_reg(project, prior_loss_weight=0.25)
    seen = []
    real = loop.training_loss

    def recording(pred, target, t, process, loss, weighting, mask=None, sample_w=None):  # the real loss, recorded
        seen.append(sample_w.tolist())
        return real(pred, target, t, process, loss, weighting, mask, sample_w)

    monkeypatch.setattr(loop, "training_loss", recording)
    out = project.run_json("--set", "lora1.steps=12")
    assert {s["name"]: s["action"] for s in out["stages"]}["lora1"] == "ran"
    record = json.loads(project.manifests("caption")[-1].read_text())["record"]
    items = record["items"]
    # 3 + 3x3 = 12 training copies an epoch, so each of the 4 class images counts 3 times
    assert [i["repeats"] for i in items if i.get("reg")] == [3, 3, 3, 3]
    assert record["regularization"] == {"images": 4, "copies": 12, "training_copies": 12, "unused": []}
    weights = Counter(w for step in seen for w in step)
    assert weights == {1.0: 12, 0.25: 12}  # 24 slots: one epoch, reg copies weighted
    # kohya's loss_weights: each sample's loss times its weight, then the batch mean
    import torch

    from stages.training.losses import training_loss

    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[1] *= 3
    loss = training_loss(pred, target, None, None, None, "none", sample_w=torch.tensor([1.0, 0.25]))
    assert loss.item() == pytest.approx((1 + 0.25 * 9) / 2)


def test_prior_loss_weight_keys_lora1_only_with_regularization_images(project):
    from test_keys import keys

    _subsets(project)
    assert keys(project, "data.prior_loss_weight=0.5", workflow="lora") == keys(project, workflow="lora")
    _with_reg(project)
    base = keys(project, workflow="lora")
    new = keys(project, "data.prior_loss_weight=0.5", workflow="lora")
    assert {s for s in base if base[s] != new[s]} == {"lora1"}
    out = project.cli("run", "lora", "--set", "data.subsets=[{images='class', is_reg=true}]")
    assert out.exit_code == 2 and "every subset has is_reg = true" in out.output


# -- per-subset caption tricks -----------------------------------------------------------------------------------


def _tricks_in_one_subset(project) -> None:
    """people: three-tag captions used as written; art: shuffled, its trigger kept first."""
    _subsets(project)
    people, art = project.settings["data"]["subsets"]
    people["caption_prefix"] = "photo, portrait, "
    art.update(caption_suffix=", drawing, flat colours", shuffle_caption=True, keep_tokens=1)
    project.write_config()


def _is_shuffle_of(drawn: str, written: str) -> bool:
    return sorted(drawn.split(", ")) == sorted(written.split(", "))


def test_a_subset_s_own_caption_tricks_apply_to_its_images_only(project):
    _tricks_in_one_subset(project)
    out = project.run_json("--set", "lora1.steps=12")
    assert {s["name"]: s["action"] for s in out["stages"]}["lora1"] == "ran"
    items = json.loads(project.manifests("caption")[-1].read_text())["record"]["items"]
    written = {name: [i["caption"] for i in items if i["subset"] == name] for name in ("people", "art")}
    drawn = json.loads((project.root / "output" / "lora" / "lora1" / "captions.json").read_text())["strings"]
    for text in drawn:
        person = [w for w in written["people"] if _is_shuffle_of(text, w)]
        assert person == [] or text in written["people"]  # people's captions: never shuffled
        if not person:
            assert text.startswith("sks, ") and any(_is_shuffle_of(text, w) for w in written["art"])
    assert set(written["people"]) <= set(drawn)
    assert any(text not in written["art"] for text in drawn if text.startswith("sks, "))  # art's: shuffled
    lora1 = json.loads(project.manifests("lora1")[-1].read_text())["record"]["captions"]
    assert lora1["distinct"] == len(drawn)


def test_subset_tricks_key_the_drawing_stages_only_and_unset_ones_key_nothing(project):
    from test_keys import keys

    _tricks_in_one_subset(project)
    base = keys(project, workflow="lora")
    project.settings["data"]["subsets"][1]["keep_tokens"] = 2
    project.write_config()
    assert {s for s, k in keys(project, workflow="lora").items() if base[s] != k} == {"lora1"}
    project.settings["data"]["subsets"][1].pop("shuffle_caption")
    project.settings["data"]["subsets"][1].pop("keep_tokens")
    project.settings["data"]["shuffle_caption"] = True
    project.write_config()
    # the same tricks from [data] for every subset: lora1's params have no per-subset entry
    from cache.store import Store
    from pipeline.config_loading import load_config
    from stages.base import PlanEnv
    from stages.lora1 import Lora1Stage

    loaded = load_config(project.config, [])
    params = Lora1Stage().params(PlanEnv(loaded, Store(loaded.store_dir)))
    assert params.captions.shuffle and "subset_captions" not in params.model_dump()


def test_the_transfer_schedule_draws_each_subset_s_tricks(transfer_project):
    _tricks_in_one_subset(transfer_project)
    transfer_project.write_config(schedule={"steps": 6, "batch_size": 2, "heldout_images": 0})
    out = transfer_project.run_json(workflow="transfer")
    assert {s["name"]: s["action"] for s in out["stages"]}["student"] == "ran"  # the student checks every caption
    from cache.store import Store

    items = json.loads(transfer_project.manifests("caption")[-1].read_text())["record"]["items"]
    written = {i["id"]: i["caption"] for i in items}
    schedule = json.loads(transfer_project.manifests("schedule")[-1].read_text())["outputs"]["schedule.json"]["digest"]
    rows = json.loads(Store(transfer_project.store).read_object(schedule).read_text())["rows"]
    people = [r for r in rows if r["item"].startswith("people/")]
    art = [r for r in rows if r["item"].startswith("art/")]
    assert people and all(r["caption"] == written[r["item"]] for r in people)
    assert all(r["caption"].startswith("sks, ") and _is_shuffle_of(r["caption"], written[r["item"]]) for r in art)
    assert any(r["caption"] != written[r["item"]] for r in art)
    transfer_project.settings["data"]["subsets"][1]["caption_dropout_rate"] = 0.1
    transfer_project.write_config(schedule={"caption_dropout": 0.1})
    refused = transfer_project.cli("run", "transfer", "--dry-run")
    assert refused.exit_code == 2 and "data.subsets (art).caption_dropout_rate = 0.1" in refused.output
