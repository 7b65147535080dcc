"""LoRA arithmetic in ΔW space and the `pipeline lora` tools, checked against dense matrices and diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import grid_cell

from stages.training.lora_files import LoraFile, LoraModule, read_lora_file
from stages.training.lora_ops import average, combine, compress, delta_weight


def random_lora(seed: int, rank: int = 4, alpha: float = 8.0, names=("a.to_q", "a.to_k")) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    mods = {n: LoraModule(torch.randn(rank, 16, generator=g), torch.randn(24, rank, generator=g), alpha) for n in names}
    return LoraFile(path=Path(f"lora{seed}.safetensors"), format="peft", modules=mods, metadata={})


def test_mix_is_the_exact_weighted_sum_of_delta_w():
    a, b = random_lora(0, rank=4, alpha=8.0), random_lora(1, rank=2, alpha=1.0)
    mixed = combine([a, b], [0.5, -1.5])
    for name in a.modules:
        want = 0.5 * delta_weight(a.modules[name]) - 1.5 * delta_weight(b.modules[name])
        assert mixed[name].rank == 6
        torch.testing.assert_close(delta_weight(mixed[name]), want, atol=1e-5, rtol=1e-5)


def test_exact_average_is_the_mean_delta_w_and_averaging_factors_is_not():
    loras = [random_lora(s) for s in range(3)]
    avg = average(loras)
    for name in loras[0].modules:
        mean = sum(delta_weight(lo.modules[name]) for lo in loras) / 3
        torch.testing.assert_close(delta_weight(avg.modules[name]), mean, atol=1e-5, rtol=1e-5)
        # Averaging the factors: mean(up) @ mean(down) = (1/9) Σ_i Σ_j up_i down_j, which has the 6 cross terms
        # up_i down_j (i ≠ j) and only 1/9 of each own product; with independent random factors it is far off.
        naive = LoraModule(
            sum(lo.modules[name].down for lo in loras) / 3, sum(lo.modules[name].up for lo in loras) / 3, 8.0
        )
        rel = (delta_weight(naive) - mean).norm() / mean.norm()
        assert rel > 0.5


def test_svd_compression_matches_a_dense_truncated_svd_and_reports_its_error():
    loras = [random_lora(s) for s in range(3)]
    exact = average(loras).modules
    for k in (1, 5, 12):
        out = compress(exact, k)
        for name, mod in exact.items():
            dense = delta_weight(mod).double()
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            k_eff = min(k, 12)
            best = (u[:, :k_eff] * s[:k_eff]) @ vh[:k_eff]
            torch.testing.assert_close(delta_weight(out.modules[name]).double(), best, atol=1e-4, rtol=1e-4)
            want_err = float((s[k_eff:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
            assert out.rel_error[name] == pytest.approx(want_err, abs=1e-6)
    assert compress(exact, 12).total_rel_error < 1e-6  # rank 3 x 4 = 12: nothing dropped


def test_mixing_loras_with_different_targets_is_refused():
    from core.errors import ConfigError

    a, b = random_lora(0), random_lora(1, names=("a.to_q", "a.to_v"))
    with pytest.raises(ConfigError, match="do not have the same LoRA modules"):
        combine([a, b], [1.0, 1.0])
    c = LoraFile(b.path, "peft", {n: LoraModule(torch.randn(4, 8), torch.randn(24, 4), 1.0) for n in a.modules}, {})
    with pytest.raises(ConfigError, match="trained for different models"):
        combine([a, c], [1.0, 1.0])


@pytest.fixture
def trained_lora(project):
    """The kohya and diffusers files of a lora1 run on the tiny model."""
    assert project.cli("run", "lora", "--no-progress").exit_code == 0
    out = project.root / "output" / "lora" / "lora1"
    return out / "lora1.safetensors", out / "diffusers" / "pytorch_lora_weights.safetensors"


def cli(project, *args):
    return project.cli(*args)


def test_info_convert_and_mix_on_real_files(project, trained_lora, tmp_path):
    kohya, diffusers_file = trained_lora
    result = cli(project, "lora", "info", str(kohya), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "kohya" and info["rank"] == [4] and info["alpha"] == [8.0] and info["modules"] == 32
    assert info["targets"] == {"to_k": 8, "to_out.0": 8, "to_q": 8, "to_v": 8}
    assert info["family"] == "sd15" and info["base_model"] == "sd_v1"
    other = json.loads(cli(project, "lora", "info", str(diffusers_file), "--json").stdout)
    assert other["format"] in ("diffusers", "peft") and other["family"] == "sd15" and other["base_model"] == "sd_v1"

    # kohya -> diffusers needs the model to restore dotted names; then back to kohya: the same tensors.
    no_model = cli(
        project, "lora", "convert", str(kohya), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors")
    )
    assert no_model.exit_code == 2 and "Pass --model" in no_model.output
    d = tmp_path / "d.safetensors"
    ok = cli(
        project,
        "lora",
        "convert",
        str(kohya),
        "--to",
        "diffusers",
        "--out",
        str(d),
        "--model",
        str(project.root / "model"),
    )
    assert ok.exit_code == 0, ok.output
    back = tmp_path / "k.safetensors"
    assert cli(project, "lora", "convert", str(d), "--to", "kohya", "--out", str(back)).exit_code == 0
    a, b = read_lora_file(kohya), read_lora_file(back)
    assert set(a.modules) == set(b.modules)
    for name in a.modules:
        assert (
            torch.equal(a.modules[name].down, b.modules[name].down) and a.modules[name].alpha == b.modules[name].alpha
        )
    # The converted diffusers file loads in diffusers and gives the same UNet as the diffusers file lora1 wrote.
    assert_same_unet(project.root / "model", diffusers_file, d)

    mixed = tmp_path / "mix.safetensors"
    result = cli(project, "lora", "mix", f"{kohya}:0.5", f"{back}:0.5", "--out", str(mixed), "--json")
    assert result.exit_code == 0, result.output
    m, src = read_lora_file(mixed), read_lora_file(kohya)
    for name in src.modules:  # 0.5 L + 0.5 L = L
        torch.testing.assert_close(delta_weight(m.modules[name]), delta_weight(src.modules[name]), atol=1e-6, rtol=1e-5)
    small = tmp_path / "r2.safetensors"
    report = json.loads(cli(project, "lora", "mix", str(kohya), "--rank", "2", "--out", str(small), "--json").stdout)
    assert report["rank"] == 2 and 0 < report["max_rel_error"] < 1 and read_lora_file(small).ranks == {2}


def assert_same_unet(model_dir, file_a, file_b):
    from diffusers import StableDiffusionPipeline

    outs = []
    for f in (file_a, file_b):
        pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
        with torch.no_grad():
            outs.append(pipe.unet(x, torch.tensor([500]), encoder_hidden_states=c).sample)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["mix", "x.safetensors:abc", "--out", "o.safetensors"], "the weight 'abc' is not a number"),
        (["mix", "missing.safetensors", "--out", "o.safetensors"], "missing.safetensors does not exist"),
        (["convert", "a.safetensors", "--to", "onnx", "--out", "o.safetensors"], "choose kohya, comfy or diffusers"),
        (["info", "model/unet/diffusion_pytorch_model.safetensors"], "holds no LoRA weights"),
    ],
)
def test_bad_input_to_the_lora_tools(project, monkeypatch, args, message):
    monkeypatch.chdir(project.root)
    result = cli(project, "lora", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (project.root / "o.safetensors").exists()


@pytest.fixture
def strong_lora(project, tmp_path) -> Path:
    """A kohya LoRA for the tiny model with large random factors, so its effect shows in every output."""
    from diffusers import UNet2DConditionModel

    from stages.training.lora_files import add_lora, lora_state_dict, save_kohya

    unet = UNet2DConditionModel.from_pretrained(str(project.root / "model"), subfolder="unet")
    add_lora(unet, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], 0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = tmp_path / "strong.safetensors"
    save_kohya(lora_state_dict(unet), 4, 4.0, path, "lora_unet_", {})
    return path


def diffusers_unet_with(model_dir: Path, lora: Path | None, weight: float):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
        pipe.set_adapters(["x"], [weight])
    return pipe


def unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([100, 700]), encoder_hidden_states=c).sample


def test_merge_equals_the_unmerged_adapter_in_both_layouts(project, strong_lora, tmp_path):
    from stages.families.sd15 import SD15Family

    model = project.root / "model"
    want = unet_out(diffusers_unet_with(model, strong_lora, 0.8).unet)
    base = unet_out(diffusers_unet_with(model, None, 0).unet)
    assert (want - base).abs().max() > 1e-2  # the LoRA matters
    family = SD15Family()
    for out in (tmp_path / "merged", tmp_path / "merged.safetensors"):
        result = cli(project, "lora", "merge", f"{strong_lora}:0.8", "--model", str(model), "--out", str(out))
        assert result.exit_code == 0, result.output
        assert out.is_file() if out.suffix else (out / "model_index.json").is_file()
        layout = family.layout(out, model if out.suffix else None)
        torch.testing.assert_close(unet_out(family.load_denoiser(layout, "cpu")), want, atol=1e-5, rtol=1e-4)
    again = cli(project, "lora", "merge", str(strong_lora), "--model", str(model), "--out", str(tmp_path / "merged"))
    assert again.exit_code == 2 and "pass --force" in again.output
    itself = cli(project, "lora", "merge", str(strong_lora), "--model", str(model), "--out", str(model), "--force")
    assert itself.exit_code == 2 and "is the model itself" in itself.output


def test_sample_grid_equals_diffusers_set_adapters(project, strong_lora, tmp_path):
    """Column `scale s` of the grid is diffusers' load_lora_weights + set_adapters([s * w]) on the same seed."""
    import numpy as np
    from diffusers import DDIMScheduler
    from PIL import Image

    model, grid_path = project.root / "model", tmp_path / "grid.png"
    args = ["--model", str(model), "--lora", f"{strong_lora}:0.7", "--prompt", "a red circle", "--prompt", "a cat"]
    args += ["--scales", "0,1", "--seed", "3", "--steps", "4", "--size", "32", "--out", str(grid_path), "--json"]
    result = cli(project, "sample", *args)
    assert result.exit_code == 0, result.output
    boxes = json.loads(result.stdout)["cells"]  # rows = prompts, columns = scales, each shown at least 256 px high
    grid = np.asarray(Image.open(grid_path).convert("RGB")).astype(int)
    assert len(boxes) == 2 and all(len(r) == 2 and all(b[2] * 32 >= 256 for b in r) for r in boxes)
    for col, weight in ((0, 0.0), (1, 0.7)):
        pipe = diffusers_unet_with(model, strong_lora, weight)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
        for row, prompt in enumerate(("a red circle", "a cat")):
            image = pipe(
                prompt,
                num_inference_steps=4,
                guidance_scale=7.5,
                height=32,
                width=32,
                generator=torch.Generator().manual_seed(3),
            ).images[0]
            cell = grid_cell(grid, boxes[row][col], 32)
            assert np.abs(cell - np.asarray(image).astype(int)).max() <= 1, (prompt, weight)
    changed = np.abs(grid_cell(grid, boxes[0][0], 32) - grid_cell(grid, boxes[0][1], 32)).max()
    assert changed > 10  # the LoRA changes the picture


def test_sample_rejects_a_bad_weight_before_loading_anything(project):
    result = cli(project, "sample", "--model", "nowhere", "--lora", "a.safetensors:x", "--prompt", "p")
    assert result.exit_code == 2 and "the weight 'x' is not a number" in result.output


def test_peft_named_files_are_read_with_their_alpha(tmp_path):
    """`unet.<module>.lora_A/lora_B` keys (peft naming, as diffusers' newer savers write) with an alpha tensor."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g)
    path = tmp_path / "peft.safetensors"
    save_file(
        {"unet.a.to_q.lora_A.weight": down, "unet.a.to_q.lora_B.weight": up, "unet.a.to_q.alpha": torch.tensor(1.0)},
        str(path),
    )
    lora = read_lora_file(path)
    assert lora.format == "peft" and set(lora.modules) == {"a.to_q"}
    torch.testing.assert_close(delta_weight(lora.modules["a.to_q"]), 0.5 * up @ down)  # alpha / r = 1 / 2
