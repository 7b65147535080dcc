"""data.alpha_mask: each image's alpha channel, resized and cropped as its pixels and area-averaged to latent size,
weights the loss (the mean over the mask); masks are stored with the latents, so they are keyed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cache.store import Store
from core.errors import DataError
from stages.dataset import alpha_mask
from stages.families.noise import make_process
from stages.training.losses import training_loss


def rgba(path, alpha: np.ndarray, size=None) -> None:
    h, w = alpha.shape
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha.astype(np.uint8)]), "RGBA").save(path)


def test_the_mask_is_the_alpha_area_averaged_to_latent_size(tmp_path):
    alpha = np.zeros((12, 12))
    alpha[:, :6] = 255  # the left half opaque
    rgba(tmp_path / "half.png", alpha)
    # 12 columns in 3 latent columns of 4: [0-4) opaque, [4-8) half, [8-12) transparent
    mask = alpha_mask(tmp_path / "half.png", 12, (2, 3))
    assert mask.shape == (1, 2, 3) and mask.dtype == np.float32
    assert np.allclose(mask[0], [[1, 0.5, 0], [1, 0.5, 0]], atol=1e-6)
    Image.new("RGB", (12, 12)).save(tmp_path / "rgb.png")
    assert np.array_equal(alpha_mask(tmp_path / "rgb.png", 12, (2, 3)), np.ones((1, 2, 3), np.float32))
    rgba(tmp_path / "clear.png", np.zeros((12, 12)))
    with pytest.raises(DataError, match=r"clear.png: its alpha channel is 0 everywhere.*data.alpha_mask off"):
        alpha_mask(tmp_path / "clear.png", 12, (2, 3))


@pytest.mark.parametrize("kind", ["l2", "huber"])
def test_the_loss_is_the_mean_over_the_mask(tiny_model, kind):
    from pipeline.config import TrainConfig
    from stages.families import get_family
    from tests.conftest import train_params

    family = get_family("sd15")
    params = train_params(family, family.layout(tiny_model / "model", None), TrainConfig(), (4, 4, 4))
    process = make_process(params.timesteps, "epsilon")
    loss = (
        {"type": kind} if kind == "l2" else {"type": "huber", "huber": {"schedule": "constant", "c": 0.5, "scale": 1}}
    )
    pred = torch.zeros(2, 3, 2, 2)
    target = torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2) / 10
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.5, 0.5], [0.0, 0.0]]]])
    t = torch.tensor([10, 500])
    d = target - pred
    per = d**2 if kind == "l2" else 2 * 0.5 * ((d**2 + 0.25).sqrt() - 0.5)
    # sample 0: the mean over channels at pixel (0, 0); sample 1: the mean of its top row (equal weights)
    expected = (per[0, :, 0, 0].mean() + per[1, :, 0, :].mean()) / 2
    got = training_loss(pred, target, t, process, loss, "none", mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    ones = training_loss(pred, target, t, process, loss, "none", torch.ones(2, 1, 2, 2))
    assert ones.item() == pytest.approx(training_loss(pred, target, t, process, loss, "none").item(), rel=1e-6)


def rgba_images(folder, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        alpha = np.full((48, 48), 255)
        alpha[:, : 6 * (i + 1)] = 0  # more of each image transparent
        rgba(folder / f"{i:03d}.png", alpha)
        (folder / f"{i:03d}.txt").write_text(f"a shape number {i}")


def test_masks_are_stored_with_the_latents_and_train_lora1(project):
    import shutil

    shutil.rmtree(project.root / "images")
    rgba_images(project.root / "images", 4)
    plain = project.run_json()
    project.write_config(data={"alpha_mask": True})
    masked = project.run_json()
    actions = {s["name"]: (s["action"], s["summary"]) for s in masked["stages"]}
    assert actions["latents"] == ("ran", "0 encoded, 4 reused")  # the latents pool does not depend on the masks
    assert actions["lora1"][0] == "ran"
    manifests = [json.loads(p.read_text()) for p in project.store.glob("stages/latents/*/manifest.json")]
    latents = next(m for m in manifests if "masks" in m["record"])
    assert len(latents["pools"]) == 2  # the latents' pool and the masks'
    store = Store(project.store)
    masks = latents["record"]["masks"]
    for item, entry in latents["record"]["items"].items():
        got = store.pool(masks["pool"]).get(entry["array"], masks["items"][entry["array"]])
        path = project.root / "images" / item.split("@")[0]
        assert np.array_equal(got, alpha_mask(path, 32, tuple(latents["record"]["shape"][-2:])))
    assert plain["stages"][-1]["key"] != masked["stages"][-1]["key"]


@pytest.mark.slow
def test_transfer_trains_the_teacher_lora_and_the_student_on_masked_losses(transfer_project, monkeypatch):
    import shutil

    from stages.student import TransferBatches

    shutil.rmtree(transfer_project.root / "images")
    rgba_images(transfer_project.root / "images", 6)
    transfer_project.write_config(data={"alpha_mask": True})
    shapes = []
    real = TransferBatches.micro_batch

    def recording(self, k, denoiser, process):  # the real method; records what the loop receives
        batch = real(self, k, denoiser, process)
        shapes.append(tuple(batch[4].shape) if len(batch) > 4 else None)
        return batch

    monkeypatch.setattr(TransferBatches, "micro_batch", recording)
    out = transfer_project.run_json(workflow="transfer")
    assert {s["name"]: s["action"] for s in out["stages"]}["student"] == "ran"
    assert shapes and all(s is not None and s[1:] == (1, 4, 4) for s in shapes), shapes


def test_a_subset_s_alpha_mask_masks_its_images_only(project):
    import shutil

    from stages.pools import load_training_data

    shutil.rmtree(project.root / "images")
    rgba_images(project.root / "cutouts", 2)
    rgba_images(project.root / "photos", 2)  # transparent too, but this subset trains everywhere
    for n, p in enumerate(sorted((project.root / "photos").glob("*.png"))):
        p.rename(p.with_name(f"photo{n}.png"))  # another name, and other content below
        rgba(p.with_name(f"photo{n}.png"), np.full((48, 48), 128), size=(48, 48))
    project.settings["data"] = {
        "subsets": [{"images": "cutouts", "alpha_mask": True}, {"images": "photos"}],
        "default_caption": "a shape",
    }
    project.write_config()
    out = project.run_json()
    assert {s["name"]: s["action"] for s in out["stages"]}["lora1"] == "ran"
    store = Store(project.store)
    paths = project.store.glob("stages/*/*/manifest.json")
    manifests = {p.parent.parent.name: json.loads(p.read_text()) for p in paths}
    latents, caption = manifests["latents"], manifests["caption"]
    cutouts = {i["digest"] for i in caption["record"]["items"] if i["subset"] == "cutouts"}
    assert set(latents["record"]["masks"]["items"]) == cutouts  # only the masked subset's images have masks
    assert latents["preimage"]["params"]["mask_subsets"] == ["cutouts"]
    from cache.store import Manifest

    data, _ = load_training_data(store, {k: Manifest.from_json(manifests[k]) for k in ("caption", "latents", "text")})
    masks = data.masks[list(range(4))]
    assert masks[0].min() < 1 and masks[1].min() < 0.01  # the cutouts: their transparent columns weigh less
    assert bool((masks[2:] == 1).all())  # the photos: ones, though their alpha is 128 everywhere
