"""The networks beyond plain LoRA (DoRA, LoHa, LoKr) and PiSSA/OLoRA init: their ΔW by hand, training through peft,
files that other programs load to the trained model's output, and the combinations that are refused."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from core.errors import ConfigError
from stages.training.adapters import FixedLora
from stages.training.lora_files import LoraModule, match_modules, read_lora_file
from stages.training.networks import LycoModule, effective_delta
from stages.training.outputs import write_lora_outputs
from tests.conftest import (
    assert_a_bf16_checkpoint_loads_as_stored,
    assert_narrow_weights_predict_like_fp32,
    bf16_layout,
    train_tiny_sd15,
)

# -- ΔW by hand ----------------------------------------------------------------------------------------------


def test_loha_and_lokr_delta_by_hand():
    t = torch.tensor
    # LoHa: (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, r = 1
    loha = LycoModule(
        "loha",
        {"hada_w1_a": t([[1.0], [2.0]]), "hada_w1_b": t([[1.0, 3.0]]), "hada_w2_a": t([[2.0], [1.0]]),
         "hada_w2_b": t([[1.0, -1.0]])},
        alpha=0.5,
    )  # fmt: skip
    # w1a·w1b = [[1, 3], [2, 6]], w2a·w2b = [[2, -2], [1, -1]], product [[2, -6], [2, -6]], times 0.5
    assert torch.equal(loha.delta((2, 2)), t([[1.0, -3.0], [1.0, -3.0]]))
    # LoKr with both factors full: no rank, so alpha is ignored (scale 1), as in ComfyUI and A1111
    lokr = LycoModule("lokr", {"lokr_w1": t([[1.0, 2.0]]), "lokr_w2": t([[1.0], [3.0]])}, alpha=8.0)
    # kron([[1, 2]], [[1], [3]]) = [[1, 2], [3, 6]]
    assert lokr.rank == 0 and torch.equal(lokr.delta((2, 2)), t([[1.0, 2.0], [3.0, 6.0]]))
    # LoKr with w2 = w2_a·w2_b of rank 1: scale alpha / 1
    lokr = LycoModule(
        "lokr", {"lokr_w1": t([[2.0]]), "lokr_w2_a": t([[1.0], [-1.0]]), "lokr_w2_b": t([[3.0]])}, alpha=0.5
    )
    assert lokr.rank == 1 and torch.equal(lokr.delta((2, 1)), t([[3.0], [-3.0]]))


def test_dora_delta_by_hand():
    t = torch.tensor
    w = t([[3.0, 4.0], [0.0, 1.0]])
    # ΔW = up·down · alpha/r = [[0, 0], [0, 1]] · 1; W + ΔW = [[3, 4], [0, 2]], row norms 5 and 2
    mod = LoraModule(t([[0.0, 1.0]]), t([[0.0], [1.0]]), 1.0, dora_scale=t([[10.0], [1.0]]))
    # per output row: m / ‖row‖ · (W + ΔW) = [[6, 8], [0, 1]], minus W
    assert torch.allclose(effective_delta(mod, w), t([[3.0, 4.0], [0.0, 0.0]]))
    # per input column (LyCORIS' other axis): columns of W + ΔW have norms 3 and sqrt(20)
    mod.dora_scale = t([[6.0, 20**0.5]])
    assert torch.allclose(effective_delta(mod, w), t([[3.0, 4.0], [0.0, 2.0]]) * t([[2.0, 1.0]]) - w)


# -- training and files --------------------------------------------------------------------------------------


def _train(tiny_model, tmp_path, **settings):
    family, layout, params, outcome = train_tiny_sd15(
        tiny_model, tmp_path, **{"rank": 4, "alpha": 8.0, "lr": 2e-2, "steps": 4, **settings}
    )
    files = write_lora_outputs(family, outcome, params, tmp_path, "lora1", family.lora_metadata(layout))
    return family, outcome, files


def _unet_out(unet, hooks=None):
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        if hooks is None:
            return unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample
        with hooks.rows_from(0, 2):
            return unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample


def comfy_weight(tensors: dict, key: str, weight: torch.Tensor) -> torch.Tensor:
    """W' of one module by ComfyUI's weight adapters (comfy/weight_adapter/lora.py, loha.py, lokr.py), written
    from their code for this test: LoRA `mm(up, down) · alpha/rank`, LoHa `(w1a·w1b) ⊙ (w2a·w2b) · alpha/w1b.shape[0]`,
    LoKr `kron(w1, w2) · alpha/dim` (dim from a decomposed factor, else scale 1), and the DoRA decomposition of a
    `dora_scale` of shape (out, 1) as LyCORIS defines it (‖W + ΔW‖ per output row; ComfyUI's own release divides
    by ‖W‖ there, a bug with an open fix, Comfy-Org/ComfyUI#15458; docs/training.md)."""
    w = weight.float()
    get = tensors.get
    alpha = get(f"{key}.alpha")
    if get(f"{key}.lora_up.weight") is not None:
        up, down = get(f"{key}.lora_up.weight").flatten(1), get(f"{key}.lora_down.weight").flatten(1)
        scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
        diff = (up @ down).reshape(w.shape) * scale
    elif get(f"{key}.hada_w1_a") is not None:
        scale = alpha.item() / get(f"{key}.hada_w1_b").shape[0] if alpha is not None else 1.0
        diff = (get(f"{key}.hada_w1_a") @ get(f"{key}.hada_w1_b")) * (get(f"{key}.hada_w2_a") @ get(f"{key}.hada_w2_b"))
        diff = diff.reshape(w.shape) * scale
    else:
        dim = None
        w1 = get(f"{key}.lokr_w1")
        if w1 is None:
            dim, w1 = get(f"{key}.lokr_w1_b").shape[0], get(f"{key}.lokr_w1_a") @ get(f"{key}.lokr_w1_b")
        w2 = get(f"{key}.lokr_w2")
        if w2 is None:
            dim, w2 = get(f"{key}.lokr_w2_b").shape[0], get(f"{key}.lokr_w2_a") @ get(f"{key}.lokr_w2_b")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha.item() / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(w.shape) * scale
    dora = get(f"{key}.dora_scale")
    if dora is None:
        return w + diff
    calc = w + diff
    norm = calc.reshape(calc.shape[0], -1).norm(dim=1, keepdim=True).reshape(calc.shape[0], *[1] * (w.dim() - 1))
    return calc * (dora / norm)


NETWORKS = [
    {"network": "dora"},
    {"network": "loha"},
    {"network": "lokr"},
    {"network": "lokr", "lokr_factor": 4},
    {"lora_init": "pissa", "targets": ["to_q", "to_v"]},  # peft starts only Linear layers this way
    {"lora_init": "olora", "targets": ["to_q", "to_v"]},
]


@pytest.mark.parametrize("settings", NETWORKS, ids=lambda s: "-".join(map(str, s.values())))
def test_each_network_trains_and_its_files_give_the_trained_unet(tiny_model, tmp_path, settings):
    settings = {"targets": ["to_q", "to_v", "proj_in"], **settings}  # a Linear and a 1x1 conv
    family, outcome, files = _train(tiny_model, tmp_path, **settings)
    outcome.denoiser.eval()
    trained = _unet_out(outcome.denoiser)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_model / "model").unet
    base = _unet_out(fresh)
    assert (trained - base).abs().max() > 1e-3, "the adapter must have moved the model for this test to mean anything"

    kohya = files["lora1.safetensors"]
    tensors = load_file(str(kohya))
    network = settings.get("network", "lora")
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert meta["lora_pipeline.network"] == network
    if network in ("loha", "lokr"):
        assert meta["ss_network_module"] == "lycoris.kohya" and network in meta["ss_network_args"]
        assert "diffusers/pytorch_lora_weights.safetensors" not in files  # diffusers loads neither (docs)
        assert not any(k.endswith(".alpha") for k in tensors)  # the scale is in the first factor
    if "lora_init" in settings:  # written as the plain LoRA of rank 2r it amounts to on the original weights
        assert meta["ss_network_dim"] == "8" and meta["lora_pipeline.lora_init"] == settings["lora_init"]

    # 1. ComfyUI's arithmetic, applied to the original weights
    unet = StableDiffusionPipeline.from_pretrained(tiny_model / "model").unet
    names = {f"lora_unet_{n.replace('.', '_')}": n for n, _ in unet.named_modules()}
    modules = {k.split(".", 1)[0] for k in tensors}
    assert modules <= set(names), sorted(modules - set(names))
    with torch.no_grad():
        for key in modules:
            layer = unet.get_submodule(names[key])
            layer.weight.copy_(comfy_weight(tensors, key, layer.weight))
    torch.testing.assert_close(_unet_out(unet), trained, rtol=1e-4, atol=1e-5)

    # 2. this tool's reader, applied by forward hooks (the teacher's and the differential eval's way)
    for name in [k for k in files if k.endswith(".safetensors")]:
        lora = read_lora_file(files[name])
        assert lora.network == ("lora" if network == "lora" else network)
        hooks = FixedLora(fresh, match_modules(lora, fresh), torch.device("cpu"))
        torch.testing.assert_close(_unet_out(fresh, hooks), trained, rtol=1e-4, atol=1e-5, msg=name)

    # 3. diffusers' own loader, for the networks it loads
    if network in ("lora", "dora"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model / "model")
        pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
        torch.testing.assert_close(_unet_out(pipe.unet), trained, rtol=1e-4, atol=1e-5)


def test_pissa_on_conv_targets_is_refused_by_name(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r'lora1.lora_init = "pissa": peft starts only Linear.*\(proj_in\)'):
        _train(tiny_model, tmp_path, lora_init="pissa", targets=["to_q", "proj_in"])


def test_dora_file_has_the_lycoris_dora_scale_per_output_channel(tiny_model, tmp_path):
    _, outcome, files = _train(tiny_model, tmp_path, network="dora", targets=["to_q", "proj_in"])
    tensors = load_file(str(files["lora1.safetensors"]))
    for key in [k for k in tensors if k.endswith(".dora_scale")]:
        module = key.removesuffix(".dora_scale")
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        # (out, 1) for a Linear, (out, 1, 1, 1) for a conv: ComfyUI and LyCORIS read the axis from the shape
        assert tensors[key].shape == (up.shape[0], *[1] * (down.dim() - 1))
    with safe_open(str(files["lora1.safetensors"]), "pt") as f:
        assert '"dora_wd": "True"' in f.metadata()["ss_network_args"]


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("differential.lora2.network='dora'", r"averaged in ΔW space as low-rank factors.*LoRA-1 may be any network"),
        ("differential.lora2.lora_init='pissa'", r"trains over LoRA-1.*lora1 and differential.lora1 take pissa"),
        ("differential.lora1.network='loha'", None),  # LoRA-1 may be anything
        ("differential.lora1.lora_init='olora'", None),
    ],
)
def test_differential_networks(differential_project, override, message):
    result = differential_project.cli("run", "differential", "--dry-run", "--set", override)
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert pytest.importorskip("re").search(message, result.output.replace("\n", " ")), result.output


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.lora_init='pissa'", r"compares the model with and without its adapter"),
        ("lora1.network='loha' --set lora1.dropout=0.1", r"lora1.dropout = 0.1: peft's LOHA has no input dropout"),
        ("lora1.network='lokr' --set lora1.loraplus_lr_ratio=4", r"LoRA\+ speeds up the B \(up\) matrices"),
        (
            "lora1.network='dora' --set lora1.lora_init='pissa'",
            r'initialises a plain LoRA; use it with network = "lora"',
        ),
        ("student.network='dora' --set student.init='teacher'", r'with student.network = "dora"'),
        ("lora1.network='loha' --set student.init='teacher'", r"lora1 trains a LOHA"),
        ("lora1.lokr_factor=0", r"lokr_factor.*must be -1"),
    ],
)
def test_refused_combinations_name_the_field_and_the_reason(transfer_project, override, message):
    import re

    args = ["run", "transfer"]  # refused at planning or in the preflight checks, before any stage runs
    for part in override.split(" --set "):
        args += ["--set", part]
    result = transfer_project.cli(*args)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert re.search(message, result.output.replace("\n", " ")), result.output


def test_flux2_refuses_networks_its_fused_files_cannot_hold(tiny_flow_models):
    from types import SimpleNamespace

    from stages.families import get_family
    from stages.training.networks import check_network

    section = SimpleNamespace(network="loha", lora_init="gaussian", dropout=0.0, rslora=False, loraplus_lr_ratio=None)
    with pytest.raises(ConfigError, match=r"lora1.network = \"loha\": the flux2 family .* fused q/k/v"):
        check_network(section, "lora1", get_family("flux2"))
    check_network(section, "lora1", get_family("zimage"))  # its files name q/k/v apart


def test_reader_refuses_damaged_lyco_modules(tmp_path):
    from safetensors.torch import save_file

    from core.errors import ModelError

    ok = {"lora_unet_x.hada_w1_a": torch.ones(4, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 3),
          "lora_unet_x.hada_w2_a": torch.ones(4, 2), "lora_unet_x.hada_w2_b": torch.ones(2, 3)}  # fmt: skip
    for name, tensors, message in [
        ("missing", {k: v for k, v in ok.items() if "w2_b" not in k}, r"lacks hada_w2_b"),
        ("shapes", {**ok, "lora_unet_x.hada_w2_b": torch.ones(3, 3)}, r"do not fit together"),
        ("nan", {**ok, "lora_unet_x.hada_w1_a": torch.full((4, 2), float("nan"))}, r"not finite"),
        ("tucker", {**ok, "lora_unet_x.hada_t1": torch.ones(2, 2, 3, 3)}, r"Tucker"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ModelError, match=message):
            read_lora_file(path)
    save_file(ok, str(tmp_path / "ok.safetensors"))
    assert read_lora_file(tmp_path / "ok.safetensors").network == "loha"


@pytest.mark.parametrize("network", ["dora", "lokr"])
def test_a_non_plain_lora1_under_lora2_is_the_same_merged_or_as_a_hook(tiny_model, tmp_path, network):
    from stages.training.loop import apply_preset

    family, outcome, files = _train(tiny_model, tmp_path, network=network, targets=["to_q", "proj_in"])
    outcome.denoiser.eval()
    trained = _unet_out(outcome.denoiser)
    lora = read_lora_file(files["lora1.safetensors"])
    for mode in ("adapter", "merged"):
        unet = StableDiffusionPipeline.from_pretrained(tiny_model / "model").unet
        apply_preset(unet, lora, mode, family.kohya_prefix)
        torch.testing.assert_close(_unet_out(unet), trained, rtol=1e-4, atol=1e-5, msg=mode)


@pytest.mark.slow
def test_transfer_with_a_loha_teacher_and_a_dora_student(transfer_project):
    """The teacher applies a LoHa LoRA-1 as dense hooks; the student trains a DoRA, whose fidelity is measured in
    two passes (peft routes no mixed batches through DoRA)."""
    out = transfer_project.run_json(
        "--set", "lora1.network='loha'", "--set", "student.network='dora'", workflow="transfer"
    )
    assert {s["name"]: s["action"] for s in out["stages"]} == {s["name"]: "ran" for s in out["stages"]}
    student = json.loads(transfer_project.manifests("student")[0].read_text())
    assert student["preimage"]["params"]["network"] == "dora"
    assert "diffusers/pytorch_lora_weights.safetensors" in student["outputs"]
    teacher = json.loads(transfer_project.manifests("teacher")[0].read_text())
    assert teacher["record"]["lora"]["modules"] > 0


@pytest.mark.slow
def test_differential_with_a_dora_lora1(differential_project):
    """LoRA-2 trains over a DoRA LoRA-1 (a frozen dense hook in adapter mode) and the eval applies both by hooks."""
    out = differential_project.run_json("--set", "differential.lora1.network='dora'", workflow="differential")
    actions = {s["name"]: s["action"] for s in out["stages"]}
    assert actions["eval"] == "ran" and all(a == "ran" for a in actions.values())
    record = json.loads(differential_project.manifests("eval")[0].read_text())["record"]
    for pair in record["pairs"].values():
        assert pair["loss_a_lora1"] < pair["loss_a_base"]  # the DoRA LoRA-1 learned A


@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_zimage_files_of_each_network_map_through_comfyui_and_give_the_trained_transformer(
    tiny_flow_models, tmp_path, network
):
    import diffusers

    from tests.test_flow_families import _comfy_zimage_key_map
    from tests.test_flow_families import _train as train_flow

    fam, layout, params, outcome, (shape, cond) = train_flow(tiny_flow_models, tmp_path, "zimage", network=network)
    files = write_lora_outputs(fam, outcome, params, tmp_path, "lora1", fam.lora_metadata(layout))
    tensors = load_file(str(files["lora1.safetensors"]))
    rule = _comfy_zimage_key_map(fam.transformer_config(layout))
    parts = {"dora": ("lora_A.weight", "lora_B.weight", "alpha", "dora_scale"), "loha": LOHA, "lokr": None}[network]
    modules = {}
    for key in tensors:
        module, part = next((key[: -len(p) - 1], p) for p in ALL_PARTS if key.endswith("." + p))
        modules.setdefault(module, set()).add(part)
    assert set(modules) <= set(rule), sorted(set(modules) - set(rule))
    for got in modules.values():
        assert parts is None or got == set(parts), got
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.8])
    outcome.denoiser.eval()
    with torch.no_grad():
        want = fam.predict(outcome.denoiser, x, t, cond)
        fresh = fam.load_denoiser(layout, "cpu")
        assert (want - fam.predict(fresh, x, t, cond)).abs().max() > 1e-3
        hooks = FixedLora(
            fresh, match_modules(read_lora_file(files["lora1.safetensors"], component="transformer"), fresh), "cpu"
        )
        with hooks.rows_from(0, 2):
            torch.testing.assert_close(fam.predict(fresh, x, t, cond), want, atol=1e-5, rtol=1e-4)
    if network == "dora":  # diffusers loads its own format of a DoRA
        pipe = diffusers.ZImagePipeline.from_pretrained(str(tiny_flow_models / "zimage"))
        pipe.load_lora_weights(str(files["diffusers/pytorch_lora_weights.safetensors"]))
        with torch.no_grad():
            torch.testing.assert_close(fam.predict(pipe.transformer, x, t, cond), want, atol=1e-5, rtol=1e-4)


LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
ALL_PARTS = ("lora_A.weight", "lora_B.weight", "alpha", "dora_scale", *LOHA, "lokr_w1", "lokr_w2", "lokr_w1_a",
             "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")  # fmt: skip


@pytest.mark.parametrize("network", ["dora", "loha"])
def test_lora_tools_merge_any_network_exactly_and_refuse_to_combine_it(tiny_model, tmp_path, network):
    from pipeline.lora_tools import convert, info, merge, mix

    family, outcome, files = _train(tiny_model, tmp_path, network=network, targets=["to_q", "proj_in"])
    outcome.denoiser.eval()
    trained = _unet_out(outcome.denoiser)
    path = files["lora1.safetensors"]
    report = info(path, family)
    assert report["network"] == network
    assert ("loads no LoHa" in report["loads_in"]) == (network == "loha")
    assert network != "dora" or "Comfy-Org/ComfyUI#15458" in report["loads_in"]
    merge(tiny_model / "model", [f"{path}:1.0"], tmp_path / "merged", family, None, force=False)
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged").unet
    torch.testing.assert_close(_unet_out(merged), trained, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=rf"it is a {network.upper()} adapter; `pipeline lora mix` works on plain"):
        mix([f"{path}:0.5", f"{path}:0.5"], tmp_path / "mix.safetensors", "kohya", family, None, None)
    with pytest.raises(ConfigError, match=r"`pipeline lora convert`"):
        convert(path, "diffusers", tmp_path / "c.safetensors", family, tiny_model / "model")


# -- fp8 base weights ----------------------------------------------------------------------------------------


def test_fp8_base_weights_keep_the_model_and_train_the_lora(tiny_model):
    """The mechanism of fp8_base (CUDA only in a run) on CPU: the frozen weights are stored in float8, the output
    stays within fp8's rounding of the fp32 model, and the LoRA (fp32) still gets gradients."""
    from stages.training.lora_files import add_lora
    from stages.training.precision import store_base_in_fp8

    unet = StableDiffusionPipeline.from_pretrained(tiny_model / "model").unet
    add_lora(unet, 4, 4.0, 0.0, ["to_q", "proj_in"], 0, network="dora")
    want = _unet_out(unet)
    before = {n: m.weight.detach().clone() for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    count = store_base_in_fp8(unet, torch.float32)
    stored = [m.parametrizations.weight.original for m in unet.modules() if hasattr(m, "parametrizations")]
    assert count == len(stored) > 20 and all(w.dtype == torch.float8_e4m3fn for w in stored)
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if p.requires_grad)
    for name, w in before.items():
        m = unet.get_submodule(name)
        if not hasattr(m, "parametrizations"):
            continue  # an adapter's own layer
        # e4m3 has 3 mantissa bits: each weight within 2^-4 of itself, or within the subnormal step 2^-9 of the
        # row's scale (its largest magnitude maps to 448)
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        assert ((m.weight - w).abs() <= torch.maximum(w.abs() / 16, scale / 512) * 1.0001).all(), name
    got = _unet_out(unet)
    assert (got - want).norm() / want.norm() < 0.15  # those roundings, compounded over the UNet's ~30 layers
    g = torch.Generator().manual_seed(2)
    out = unet(torch.randn(1, 4, 4, 4, generator=g), torch.tensor([5]), torch.randn(1, 77, 32, generator=g)).sample
    out.square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_fp8_base_is_refused_on_cpu_by_name(transfer_project):
    result = transfer_project.cli("run", "transfer", "--set", "student.fp8_base=true")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "student.fp8_base = true stores the frozen base weights in float8" in result.output.replace("\n", " ")


def test_the_training_loop_runs_with_fp8_base_weights(tiny_model, tmp_path, monkeypatch):
    """The whole loop with fp8_base, on CPU with only the device guard lifted (a run refuses it here): the LoRA
    trains and its files are written from the fp32 adapter."""
    import stages.training.loop as loop

    monkeypatch.setattr(loop, "check_precision", lambda *args, **kwargs: None)  # our own guard, nothing else
    family, outcome, files = _train(tiny_model, tmp_path, fp8_base=True, targets=["to_q", "to_v"])
    assert all(torch.isfinite(torch.tensor(outcome.losses)))
    assert read_lora_file(files["lora1.safetensors"]).network == "lora"


def test_narrow_teacher_weights_predict_like_fp32(tiny_model):
    from stages.families import get_family

    family = get_family("sd15")
    layout = family.layout(tiny_model / "model", None)
    assert_narrow_weights_predict_like_fp32(family, layout, torch.tensor([500, 800]))


def test_fp16_weights_beyond_its_range_are_refused_by_layer(tiny_model):
    """transfer.weights_dtype = fp16 on a model with a weight past 65504: refused, naming the layer and the fix,
    instead of an inf that would make every delta NaN."""
    from core.errors import PipelineError
    from stages.training.precision import store_weights_in

    unet = StableDiffusionPipeline.from_pretrained(tiny_model / "model").unet.requires_grad_(False)
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = 1e6
    with pytest.raises(PipelineError, match=r'conv_in: a weight is beyond fp16.*transfer.weights_dtype = "bf16"'):
        store_weights_in(unet, "fp16", torch.float32)


def test_bf16_weights_of_a_model_released_in_bf16_lose_nothing(tiny_model, tmp_path):
    """A checkpoint whose weights are bf16 values (as FLUX.2, Z-Image, Qwen-Image and FLUX.1 are released) gives
    bit-identical predictions with transfer.weights_dtype = "bf16" and "fp32": the narrowing rounds nothing."""
    import shutil

    from stages.devices import load_frozen
    from stages.families import get_family
    from stages.families.base import Conditioning

    folder = tmp_path / "model"
    shutil.copytree(tiny_model / "model", folder)
    unet = StableDiffusionPipeline.from_pretrained(folder).unet
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    unet.save_pretrained(folder / "unet")
    family = get_family("sd15")
    layout = family.layout(folder, None)
    cond = Conditioning.stack(family.load_text_encoder(layout, "cpu").encode(["a red circle", "a blue square"]))
    x = torch.randn(2, *family.latent_shape(layout, 32), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 800])
    out = {}
    for dtype in ("fp32", "bf16", "fp16"):
        model = load_frozen(family, layout, torch.device("cpu"), dtype, "sdpa")
        with torch.no_grad():
            out[dtype] = family.predict(model, x, t, cond)
    assert torch.equal(out["bf16"], out["fp32"])
    assert not torch.equal(out["fp16"], out["fp32"])  # fp16 has fewer exponent bits: the smallest weights round


@pytest.mark.parametrize("form", ["folder", "single file"])
def test_a_bf16_checkpoint_loads_as_stored(tiny_model, tmp_path, form):
    from stages.families import get_family

    family = get_family("sd15")
    layout = bf16_layout(family, tmp_path, form, tiny_model / "model", tiny_model / "model.safetensors")
    assert_a_bf16_checkpoint_loads_as_stored(family, layout)
