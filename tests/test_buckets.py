"""Aspect-ratio buckets, random crops and flips (latents.buckets, latents.crop, latents.flip_aug): kohya's bucket
sizes and selection by hand-derived values, views placed and stored per image, batches drawn within one bucket by
lora1 and the transfer schedule, and both phases of transfer seeing the same shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BUCKETS, make_mixed_images
from PIL import Image

from cache.store import Store
from core.errors import ConfigError, PlanError
from stages.buckets import BucketSpec, Placement, ViewSpec, auto_sizes, select_bucket, view_name
from stages.training.sampling import BatchOrder, batch_indices

SD15_512 = auto_sizes(512, 256, 1024, 64)


def test_auto_sizes_are_kohyas_for_sd15_at_512():
    # make_bucket_resolutions((512, 512), 256, 1024, 64): for each width the tallest height within 512² in steps
    assert {(256, 1024), (320, 768), (320, 704), (384, 640), (448, 576), (512, 512), (1024, 256)} <= set(SD15_512)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in SD15_512)
    assert all((h, w) in SD15_512 for w, h in SD15_512) and list(SD15_512) == sorted(SD15_512)
    assert auto_sizes(32, 16, 64, 16) == ((16, 48), (16, 64), (32, 32), (48, 16), (64, 16))


def test_an_image_goes_to_the_bucket_of_nearest_aspect_and_covers_it():
    spec = BucketSpec(sizes=SD15_512)
    # 1000x500 (aspect 2): 704x320 (2.2) is nearest; the height is the short fit, 704/1000 -> 704x352, cropped
    assert select_bucket(1000, 500, spec) == ((704, 320), (704, 352))
    assert select_bucket(512, 512, spec) == ((512, 512), (512, 512))  # a listed size is its own bucket
    # 3:2 lies between 640x384 (1.67) and 576x448 (1.29): 640 wide, 3000x2000 * 640/3000 = 640x426.7, rounded up
    assert select_bucket(3000, 2000, spec) == ((640, 384), (640, 427))
    # bucket_no_upscale: a small image keeps its size, its sides cut to the step; a large one is shrunk to the area
    # first (724x362 -> rounded 704x320 would be aspect 2.2, 640x320 keeps 2.0)
    tight = BucketSpec(no_upscale=True, step=64, max_area=512 * 512)
    assert select_bucket(300, 200, tight) == ((256, 192), (300, 200))
    assert select_bucket(2000, 1000, tight) == ((640, 320), (640, 320))


def test_a_placement_resizes_crops_flips_and_names_its_size_conditioning():
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :, 0] = np.arange(60)[None, :] * 4  # red grows left to right
    image = Image.fromarray(pixels)
    p = ViewSpec(32, BucketSpec(sizes=((32, 16), (16, 32)))).target(60, 20)
    assert p == Placement((32, 16), (48, 16), 8, 0)  # aspect 3 -> 32x16 (2); height fits: 48x16, centre crop
    view = np.asarray(p.apply(image))
    flipped = np.asarray(Placement(p.size, p.resized, p.left, p.top, True).apply(image))
    assert view.shape == (16, 32, 3) and np.array_equal(flipped, view[:, ::-1])
    assert view[0, 0, 0] < view[0, -1, 0]
    assert p.conditioning((60, 20)) == {"original_size": [20, 60], "crop_top_left": [0, 8], "target_size": [16, 32]}
    mirrored = Placement((32, 16), (48, 16), 4, 0, True)  # 4 from the left is 12 from the right
    assert mirrored.conditioning((60, 20))["crop_top_left"] == [0, 12]


def test_views_random_crops_lie_where_the_digest_puts_them_and_flips_follow():
    spec = ViewSpec(32, crop="random", crop_variants=3, flip=True)
    views = spec.placements(64, 40, "abc")
    assert len(views) == spec.count == 6 and [v.flip for v in views] == [False, True] * 3
    assert views == spec.placements(64, 40, "abc")  # from the digest alone
    assert ViewSpec(32, crop="random", crop_variants=2, flip=True).placements(64, 40, "abc") == views[:4]
    assert all(0 <= v.left <= 51 - 32 and v.top == 0 for v in views)  # 64x40 -> 51x32: room across only
    assert len({v.left for v in views[::2]}) > 1
    assert [view_name("abc", v, spec) for v in range(4)] == ["abc", "abc.0f", "abc.1", "abc.1f"]


def test_batches_hold_one_bucket_and_each_epoch_visits_every_item():
    groups = ((0, 3, 4), (1,), (2, 5, 6, 7, 8))
    order = BatchOrder(7, 2, 9, groups)
    assert order.per_epoch == 2 + 1 + 3
    epoch = [order.batch(k) for k in range(order.per_epoch)]
    assert all(any(set(b) <= set(g) for g in groups) for b in epoch)
    assert sorted({i for b in epoch for i in b}) == list(range(9))
    assert [1, 1] in epoch  # a bucket of one fills its batch with itself
    assert [order.batch(k) for k in range(6)] == [BatchOrder(7, 2, 9, groups).batch(k) for k in range(6)]
    assert order.epoch(5, 1) == 1 and order.epoch(6, 0) == 2
    # one bucket (every image of one shape) is the order of unbucketed training
    assert BatchOrder(7, 2, 5, ((0, 1, 2, 3, 4),)).batch(3) == batch_indices(7, 3, 2, 5)


def _manifest(project, stage: str) -> dict:
    return json.loads(project.manifests(stage)[-1].read_text())


def test_lora_trains_in_buckets_with_flips_and_draws_batches_within_one(project, monkeypatch):
    from stages.training.loop import DiffusionBatches

    shutil.rmtree(project.root / "images")
    make_mixed_images(project.root / "images")
    project.write_config(latents={**TINY_BUCKETS, "flip_aug": True})
    shapes = []
    real = DiffusionBatches.micro_batch

    def recording(self, k, denoiser, process):  # the real method; records what the loop receives
        batch = real(self, k, denoiser, process)
        shapes.append(tuple(batch[0].shape))
        return batch

    monkeypatch.setattr(DiffusionBatches, "micro_batch", recording)
    out = project.run_json("--set", "lora1.steps=8")
    summary = {s["name"]: s["summary"] for s in out["stages"]}
    assert summary["latents"] == "12 encoded, 0 reused, 3 buckets"  # 6 images, each also mirrored
    assert {s[2:] for s in shapes} == {(4, 4), (6, 2), (2, 6)}  # every bucket trained, one shape per batch
    record = _manifest(project, "latents")["record"]
    assert record["buckets"] == {"16x48": 2, "32x32": 2, "48x16": 2}
    item = next(v for k, v in record["items"].items() if v["bucket"] == [48, 16])
    assert item["shape"] == [4, 2, 6] and [v["flip"] for v in item["views"]] == [False, True]
    assert item["views"][0]["original_size"] == [24, 72] and item["views"][0]["target_size"] == [16, 48]
    store = Store(project.store)
    a, b = (store.pool(record["pool"]).get(v["array"], v["digest"]) for v in item["views"])
    assert a.shape == b.shape == (4, 2, 6) and not np.array_equal(a, b)
    # buckets off: the square latents are new; back on, the bucketed artifact is found again
    project.write_config(latents={"buckets": "off", "flip_aug": False})
    assert {s["name"]: s["summary"] for s in project.run_json()["stages"]}["latents"] == "6 encoded, 0 reused"
    project.write_config(latents={**TINY_BUCKETS, "flip_aug": True})
    assert {s["name"]: s["action"] for s in project.run_json()["stages"]}["latents"] == "reused"


def test_the_stored_view_is_the_vae_encoding_of_the_bucketed_crop(project):
    from stages.buckets import select_bucket
    from stages.dataset import load_image, view_pixels
    from stages.families.sd15 import SD15Family

    shutil.rmtree(project.root / "images")
    make_mixed_images(project.root / "images", 3)
    project.write_config(latents=TINY_BUCKETS)
    project.run_json("--only", "caption")
    project.run_json("--only", "latents")
    record = _manifest(project, "latents")["record"]
    family = SD15Family()
    vae = family.load_vae(family.layout(project.root / "model", None), torch.device("cpu"))
    spec = BucketSpec(sizes=auto_sizes(32, 16, 64, 16))
    for item_id, entry in record["items"].items():
        image = load_image(project.root / "images" / item_id.split("@")[0])
        size, resized = select_bucket(*image.size, spec)
        crop = Placement(size, resized, (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2).apply(image)
        with torch.no_grad():
            want = family.encode_images(vae, torch.from_numpy(view_pixels(crop)[None])).numpy()[0]
        got = Store(project.store).pool(record["pool"]).get(entry["array"], entry["digest"])
        assert np.allclose(got, want, atol=1e-6)


def test_explicit_bucket_sizes_and_their_errors(project):
    shutil.rmtree(project.root / "images")
    make_mixed_images(project.root / "images", 3)
    project.write_config(latents={"buckets": [[32, 32], [48, 16]]})
    project.run_json("--only", "caption")
    project.run_json("--only", "latents")
    assert _manifest(project, "latents")["record"]["buckets"] == {"32x32": 2, "48x16": 1}  # portrait -> square
    bad = project.cli("run", "lora", "--set", "latents.buckets=[[30, 32]]")
    assert bad.exit_code == 2 and "latents.buckets" in bad.output and "multiple of 8" in bad.output
    project.write_config(latents={"buckets": "auto"})  # min_bucket_reso 256 > resolution 32
    out = project.cli("run", "lora", "--dry-run")
    assert out.exit_code != 0 and "min_bucket_reso" in out.output and "Traceback" not in out.output


def test_no_upscale_names_the_images_too_small_for_any_bucket(project):
    shutil.rmtree(project.root / "images")
    make_mixed_images(project.root / "images", 3)
    Image.new("RGB", (40, 8), "red").save(project.root / "images" / "sliver.png")
    (project.root / "images" / "sliver.txt").write_text("a sliver")
    project.write_config(latents={**TINY_BUCKETS, "bucket_no_upscale": True})
    out = project.cli("run", "lora")
    assert out.exit_code != 0 and "sliver.png" in out.output and "bucket_reso_steps = 16" in out.output


def test_differential_refuses_buckets_with_the_reason(differential_project):
    differential_project.write_config(latents={"flip_aug": True})
    from pipeline.config_loading import load_config
    from pipeline.planner import plan_workflow
    from pipeline.workflows import get_workflow
    from stages.base import PlanEnv

    loaded = load_config(differential_project.config, [])
    env = PlanEnv(loaded, Store(loaded.store_dir))
    with pytest.raises(PlanError, match=r"latents.flip_aug = true: differential LoRA compares"):
        plan_workflow(env, get_workflow("differential", env), {})


def test_flow_families_need_sides_in_multiples_of_16(tmp_path, tiny_flow_models):
    from pipeline.config_loading import load_config
    from stages.base import PlanEnv
    from stages.latents import LatentsStage

    shutil.copytree(tiny_flow_models / "zimage", tmp_path / "model")
    make_mixed_images(tmp_path / "images", 3)
    (tmp_path / "pipeline.toml").write_text(
        '[model]\npath = "model"\n[latents]\nresolution = 32\nbuckets = [[32, 32], [40, 24]]\n'
    )
    loaded = load_config(tmp_path / "pipeline.toml", [])
    with pytest.raises(ConfigError, match=r"zimage family needs image sides that are multiples of 16 px.*40x24"):
        LatentsStage().params(PlanEnv(loaded, Store(loaded.store_dir)))


def test_masks_follow_each_views_bucket_and_flip(project):
    from stages.dataset import alpha_mask

    shutil.rmtree(project.root / "images")
    make_mixed_images(project.root / "images", 3)
    for path in sorted((project.root / "images").glob("*.png")):  # the left quarter of each image transparent
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
        alpha = np.full((rgba.size[1], rgba.size[0]), 255, np.uint8)
        alpha[:, : rgba.size[0] // 4] = 0
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(path)
    project.write_config(latents={**TINY_BUCKETS, "flip_aug": True}, data={"alpha_mask": True})
    out = project.run_json()
    assert {s["name"]: s["action"] for s in out["stages"]}["lora1"] == "ran"
    record = _manifest(project, "latents")["record"]
    spec = ViewSpec(32, BucketSpec(sizes=auto_sizes(32, 16, 64, 16)), flip=True)
    store = Store(project.store)
    for item_id, entry in record["items"].items():
        path = project.root / "images" / item_id.split("@")[0]
        placements = spec.placements(*Image.open(path).size, entry["array"])
        for view, placement in zip(entry["views"], placements, strict=True):
            got = store.pool(record["masks"]["pool"]).get(view["array"], record["masks"]["items"][view["array"]])
            assert got.shape == (1, *entry["shape"][1:])
            assert np.array_equal(got, alpha_mask(path, placement, tuple(entry["shape"][1:])))
            assert (got[0, :, 0].mean() < got[0, :, -1].mean()) != view["flip"]  # transparent on the left unless


def test_transfer_schedules_each_micro_batch_in_one_bucket_and_the_student_replays_it(transfer_project):
    shutil.rmtree(transfer_project.root / "images")
    make_mixed_images(transfer_project.root / "images")
    transfer_project.write_config(
        latents={**TINY_BUCKETS, "flip_aug": True, "crop": "random", "crop_variants": 2},
        # no held-out images: the held-out rows are then new draws on the training images, of every bucket
        schedule={"steps": 6, "batch_size": 2, "grad_accum": 2, "heldout": 4, "heldout_images": 0},
    )
    out = transfer_project.run_json(workflow="transfer")
    assert {s["name"]: s["action"] for s in out["stages"]}["student"] == "ran"  # its inputs matched the teacher's
    schedule = _manifest(transfer_project, "schedule")["outputs"]["schedule.json"]["digest"]
    doc = json.loads(Store(transfer_project.store).read_object(schedule).read_text())
    rows = doc["rows"]
    micro = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    assert all(len({tuple(r["bucket"]) for r in m}) == 1 for m in micro)
    assert {tuple(r["bucket"]) for r in rows} == {(32, 32), (48, 16), (16, 48)}
    assert {r["flip"] for r in rows} == {False, True} and all(isinstance(r["crop"], list) for r in rows)
    steps = {tuple(tuple(r["bucket"]) for r in rows[s * 4 : s * 4 + 4]) for s in range(6)}
    assert any(len(set(s)) > 1 for s in steps)  # a step's micro-batches may differ in size: stored flat, unpacked
    record = _manifest(transfer_project, "latents")["record"]
    views = {v["array"]: v for item in record["items"].values() for v in item["views"]}
    assert all(r["latent"] in views and views[r["latent"]]["flip"] == r["flip"] for r in rows)
    assert all(views[r["latent"]]["crop_top_left"] == r["crop"] for r in rows)
    assert len({tuple(views[r["latent"]]["target_size"]) for r in doc["heldout"]}) > 1  # split per shape
    teacher = _manifest(transfer_project, "teacher")["record"]
    assert len(teacher["stats"]["rows"]) == len(rows) and teacher["stats"]["nonfinite"] == 0


def test_inspect_dataset_counts_and_sheets_images_per_bucket(project, tmp_path):
    shutil.rmtree(project.root / "images")
    make_mixed_images(project.root / "images")
    Image.new("RGB", (30, 10), "red").save(project.root / "images" / "small-wide.png")  # enlarged to cover 48x16
    (project.root / "images" / "small-wide.txt").write_text("a strip")
    project.write_config(latents=TINY_BUCKETS)
    result = project.cli("inspect", "dataset", "-c", str(project.config), "--json", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["buckets"] == [
        {"bucket": "48x16", "images": 3, "enlarged": 1, "smallest": "30x10", "largest": "72x24"},
        {"bucket": "16x48", "images": 2, "enlarged": 0, "smallest": "24x72", "largest": "24x72"},
        {"bucket": "32x32", "images": 2, "enlarged": 0, "smallest": "48x48", "largest": "48x48"},
    ]
    assert report["enlarged"] == [{"path": "small-wide.png", "size": "30x10", "bucket": "48x16"}]
    assert sorted(Path(p).name for p in report["sheets"]) == [f"dataset-{b}-1.png" for b in ("16x48", "32x32", "48x16")]
    text = project.cli("inspect", "dataset", "-c", str(project.config)).output
    assert "buckets (latents.buckets)" in text and "smaller than their bucket" in text
