"""Optimizers, lr schedules, parameter groups, EMA, the fused backward pass and gradient checkpointing: numbers
derived by hand from the formulas in docs/training.md, and refusals that name the field and the fix."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from core.errors import ConfigError
from pipeline.config import TrainConfig
from stages.families import Conditioning, get_family
from stages.training.loop import DiffusionBatches, TrainData, TrainJob, train_lora
from stages.training.lora_files import add_lora, lora_state_dict
from stages.training.optim import (
    LoraEMA,
    build_optimizer,
    lr_factor,
    param_groups,
    resolve_lr_schedule,
    resolve_optim,
)
from tests.conftest import train_params


def factors(steps: int, **settings) -> list[float]:
    cfg = TrainConfig(steps=steps, **settings)
    schedule = resolve_lr_schedule(cfg, steps, "lora1")
    return [lr_factor(schedule, steps, s) for s in range(steps)]


def test_schedules_by_hand():
    c = math.cos
    assert factors(5, lr_scheduler="linear") == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    # two cycles over 8 steps: each cycle a cosine from 1 over 4 steps
    cycle = [1, 0.5 * (1 + c(math.pi / 4)), 0.5, 0.5 * (1 + c(3 * math.pi / 4))]
    assert factors(8, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2) == pytest.approx(cycle * 2)
    # (1-r)(1-p)^power + r with r = 0.1, power 2: p = 0.2 -> 0.1 + 0.9 * 0.64
    poly = factors(5, lr_scheduler="polynomial", lr_scheduler_power=2.0, lr_scheduler_min_lr_ratio=0.1)
    assert poly == pytest.approx([1, 0.676, 0.1 + 0.9 * 0.36, 0.1 + 0.9 * 0.16, 0.1 + 0.9 * 0.04])
    assert factors(4, lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.2)[2] == pytest.approx(0.6)
    # inverse_sqrt: 1 at the end of warmup w, then 1/sqrt((s - w + w)/w)
    inv = factors(20, lr_scheduler="inverse_sqrt", warmup_steps=4)
    assert inv[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and inv[12] == pytest.approx(1 / math.sqrt(3))
    assert factors(10001, lr_scheduler="inverse_sqrt")[10000] == pytest.approx(1 / math.sqrt(2))  # timescale 1e4
    # warmup 2, stable, then a cosine to 0 over the last 4 of 10 steps
    wsd = factors(10, lr_scheduler="warmup_stable_decay", warmup_steps=2, decay_steps=4)
    assert wsd == pytest.approx(
        [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 0.5 * (1 + c(math.pi / 4)), 0.5, 0.5 * (1 + c(3 * math.pi / 4))]
    )
    assert factors(3) == [1.0, 1.0, 1.0]


def test_warmup_and_decay_as_a_fraction_of_the_steps():
    cfg = TrainConfig(steps=95, warmup_steps="10%", lr_scheduler="warmup_stable_decay", decay_steps="20%")
    assert resolve_lr_schedule(cfg, 95, "lora1") == {"type": "warmup_stable_decay", "warmup": 9, "decay": 19,
                                                      "min_lr_ratio": 0.0}  # fmt: skip
    with pytest.raises(ConfigError, match=r"lora1: warmup_steps \(60\) \+ decay_steps \(50\) is more than the 100"):
        resolve_lr_schedule(cfg.model_copy(update={"warmup_steps": 60, "decay_steps": "50%"}), 100, "lora1")
    with pytest.raises(ValueError, match="percentage"):
        TrainConfig(warmup_steps="ten%")


def test_an_optimizer_argument_is_checked_against_the_constructor(monkeypatch):
    def resolve(**settings):
        return resolve_optim(TrainConfig(**settings), 10, 1, "lora1")

    assert resolve(optimizer_args={"betas": [0.9, 0.99]})["optimizer_args"] == {"betas": [0.9, 0.99]}
    with pytest.raises(ConfigError, match=r"lora1.optimizer_args.beta1: AdamW takes no `beta1`. It takes: betas, eps"):
        resolve(optimizer_args={"beta1": 0.9})
    with pytest.raises(ConfigError, match=r"lora1.optimizer_args.lr: set it with lora1.lr"):
        resolve(optimizer_args={"lr": 1e-3})
    with pytest.raises(ConfigError, match=r"AdamW refused them \(Invalid beta parameter"):
        resolve(optimizer_args={"betas": [1.5, 0.9]})
    # adafactor: a fixed lr unless relative_step; its defaults are in the key
    args = resolve(optimizer="adafactor")["optimizer_args"]
    assert args == {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    with pytest.raises(ConfigError, match=r"relative_step.*lr_scheduler must be 'constant' and warmup_steps 0"):
        resolve(optimizer="adafactor", optimizer_args={"relative_step": True}, lr_scheduler="cosine")
    # a missing optional package: the extra to install, at planning time
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"lora1.optimizer = 'adamw8bit' needs bitsandbytes.*lora-pipeline\[bnb\]"):
        resolve(optimizer="adamw8bit")


def test_per_group_rates_and_gradient_ascent_are_refused_where_they_cannot_work():
    def resolve(**settings):
        return resolve_optim(TrainConfig(**settings), 10, 1, "lora1")

    with pytest.raises(ConfigError, match="Prodigy estimates one step size"):
        resolve(optimizer="prodigy", lr=1.0, loraplus_lr_ratio=16)
    with pytest.raises(ConfigError, match="Prodigy estimates one step size"):
        resolve(optimizer="prodigy", lr=1.0, block_lr={"mid_block": 2.0})
    resolve(optimizer="prodigy", lr=1.0, block_lr={"mid_block": 0.0})  # freezing a block is no per-group rate
    ascent = "lora1.lr = -0.0001 trains by gradient ascent.*lion has no such mode. Use lora1.optimizer = 'adamw'"
    with pytest.raises(ConfigError, match=ascent):
        resolve(optimizer="lion", lr=-1e-4)
    with pytest.raises(ConfigError, match="a negative multiplier in lora1.block_lr trains by gradient ascent"):
        resolve(optimizer="adafactor", block_lr={"up_blocks.1": -1})
    relative = {"optimizer": "adafactor", "optimizer_args": {"relative_step": True}}
    with pytest.raises(ConfigError, match=r"relative_step sets its own step size.*relative_step = false"):
        resolve(**relative, block_lr={"mid_block": 2.0})
    accum = r"lora1.fused_backward cannot go with lora1.grad_accum = 2.*set grad_accum = 1"
    with pytest.raises(ConfigError, match=accum):
        resolve_optim(TrainConfig(fused_backward=True, max_grad_norm=0, grad_accum=2), 10, 2, "lora1")
    with pytest.raises(ConfigError, match=r"cannot go with lora1.max_grad_norm = 1.0.*max_grad_norm = 0"):
        resolve(fused_backward=True)
    with pytest.raises(ConfigError, match=r"optimizer_groups .*set lora1.fused_backward = true"):
        resolve(optimizer_groups=2)
    with pytest.raises(ValueError, match="not a block"):
        TrainConfig(block_lr={"down blocks": 1.0})


def test_the_student_s_fused_pass_names_the_schedule_s_grad_accum(transfer_project):
    result = transfer_project.cli(
        "run", "transfer", "--set", "student.fused_backward=true", "--set", "student.max_grad_norm=0.0",
        "--set", "schedule.grad_accum=2",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "student.fused_backward cannot go with schedule.grad_accum = 2" in result.output
    assert not transfer_project.manifests("caption")  # refused at planning time


@pytest.fixture
def unet(tiny_model):
    family = get_family("sd15")
    layout = family.layout(tiny_model / "model", None)
    denoiser = family.load_denoiser(layout, "cpu")
    add_lora(denoiser, 4, 4.0, 0.0, family.default_targets, 0)
    return denoiser


def test_loraplus_and_block_multipliers_give_each_parameter_its_rate(unet):
    cfg = TrainConfig(lr=1e-3, loraplus_lr_ratio=16, block_lr={"down_blocks.0": 0.5, "mid_block": 0, "up_blocks.1": -1})
    groups = param_groups(unet, cfg, "lora1")
    rate = {id(p): (g["lr"], g.get("maximize", False)) for g in groups for p in g["params"]}
    checked = 0
    for name, p in unet.named_parameters():
        if ".lora_" not in name:
            continue
        b = 16 if ".lora_B." in name else 1
        if name.startswith("mid_block."):
            assert not p.requires_grad and id(p) not in rate, name  # multiplier 0: not trained
            continue
        mult = 0.5 if name.startswith("down_blocks.0.") else -1 if name.startswith("up_blocks.1.") else 1
        assert rate[id(p)] == (pytest.approx(abs(1e-3 * mult * b)), mult < 0), name
        checked += 1
    assert checked == sum(len(g["params"]) for g in groups) > 0
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
    with pytest.raises(ConfigError, match=r"'up_blocks.0-1' and 'up_blocks.1' both name the LoRA of up_blocks.1"):
        param_groups(unet, TrainConfig(block_lr={"up_blocks.0-1": 1, "up_blocks.1": 2}), "lora1")
    # the tiny UNet has attention (so LoRA targets) in its first down and last up block only
    with pytest.raises(ConfigError, match=r"'down_blocks.7' names no block .*: down_blocks.0, up_blocks.1, mid_block"):
        param_groups(unet, TrainConfig(block_lr={"down_blocks.7": 1}), "lora1")


def test_a_negative_rate_ascends_where_a_positive_one_descends():
    moved = {}
    for lr in (0.1, -0.1):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        start = model.weight.detach().clone()
        cfg = TrainConfig(lr=lr, weight_decay=0.0)
        opt = build_optimizer(param_groups(model, cfg, "lora1"), cfg, torch.device("cpu"))
        assert opt.defaults["fused"] is True  # adamw: torch's fused kernel on a CPU
        model(torch.ones(4, 3)).square().sum().backward()
        opt.step()
        moved[lr] = model.weight.detach() - start
    # Adam's first step is lr * g/|g| elementwise: the same size, the other way
    assert torch.allclose(moved[-0.1], -moved[0.1]) and moved[0.1].abs().min() > 0.09


def test_ema_by_hand():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = LoraEMA(model, {"decay": 0.9, "warmup": True, "every": 2})
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    ema.update(1)  # not a multiple of every: no update
    assert torch.equal(ema.shadow["weight"], torch.tensor([[1.0, 2.0]]))
    ema.update(2)  # the 1st update: decay min(0.9, 1/10)
    expected = 0.1 * torch.tensor([[1.0, 2.0]]) + 0.9 * torch.tensor([[3.0, 4.0]])
    assert torch.allclose(ema.shadow["weight"], expected)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 6.0]]))
    ema.update(4)  # the 2nd: min(0.9, 2/11)
    expected = 2 / 11 * expected + 9 / 11 * torch.tensor([[5.0, 6.0]])
    assert torch.allclose(ema.shadow["weight"], expected)
    with ema.applied():
        assert torch.allclose(model.weight, expected)
    assert torch.equal(model.weight, torch.tensor([[5.0, 6.0]]))  # the raw weights are back


def train(tiny_model, tmp_path, gradient_checkpointing=False, **settings):
    family = get_family("sd15")
    layout = family.layout(tiny_model / "model", None)
    cfg = TrainConfig(**{"rank": 4, "alpha": 4.0, "lr": 1e-2, "steps": 3, "batch_size": 2, **settings})
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(2, 77, 32, generator=g), torch.ones(2, 77, dtype=torch.bool))
    data = TrainData(torch.randn(4, 4, 4, 4, generator=g), cond, torch.tensor([0, 1, 0, 1]))
    params = train_params(family, layout, cfg, (4, 4, 4))
    job = TrainJob(family, layout, "epsilon", params, torch.device("cpu"), tmp_path, progress=False,
                   gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    return train_lora(job, DiffusionBatches(data, params.seed, params.batch_size))


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "adamw"},
        {"optimizer": "adamw", "loraplus_lr_ratio": 4.0, "block_lr": {"up_blocks.1": -1.0}},
        {"optimizer": "adafactor"},
        {"optimizer": "lion", "lr": 1e-3},
    ],
    ids=["adamw", "adamw-groups", "adafactor", "lion"],
)
@pytest.mark.parametrize("chunks", [0, 3])
def test_the_fused_backward_pass_trains_the_same_lora(tiny_model, tmp_path, settings, chunks):
    plain = train(tiny_model, tmp_path / "plain", max_grad_norm=0.0, **settings)
    fused = train(
        tiny_model, tmp_path / "fused", max_grad_norm=0.0, fused_backward=True, optimizer_groups=chunks, **settings
    )
    a, b = lora_state_dict(plain.denoiser), lora_state_dict(fused.denoiser)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    assert plain.losses == pytest.approx(fused.losses, rel=1e-5)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_each_group_steps_with_its_scheduled_rate(tiny_model, tmp_path):
    outcome = train(
        tiny_model, tmp_path, lr=1e-2, steps=4, warmup_steps=1, lr_scheduler="linear", loraplus_lr_ratio=4.0,
        block_lr={"up_blocks.1": 0.5},
    )  # fmt: skip
    f = [1 / 2, 1, 2 / 3, 1 / 3]  # warmup (0+1)/(1+1), then 1 - (s-1)/3
    assert [o["rest"] for o in outcome.lrs] == pytest.approx([1e-2 * x for x in f])
    assert [o["rest (lora_B)"] for o in outcome.lrs] == pytest.approx([4e-2 * x for x in f])
    assert [o["up_blocks.1 (lora_B)"] for o in outcome.lrs] == pytest.approx([2e-2 * x for x in f])


def test_gradient_checkpointing_trains_the_same_lora(tiny_model, tmp_path):
    plain = train(tiny_model, tmp_path / "plain", dropout=0.1)
    ckpt = train(tiny_model, tmp_path / "ckpt", gradient_checkpointing=True, dropout=0.1)
    a, b = lora_state_dict(plain.denoiser), lora_state_dict(ckpt.denoiser)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_ema_is_its_own_lora_file(tiny_model, tmp_path):
    from stages.training.lora_files import read_lora_file
    from stages.training.outputs import write_lora_outputs

    family = get_family("sd15")
    outcome = train(tiny_model, tmp_path, ema_decay=0.5, ema_warmup=False)
    params = train_params(family, family.layout(tiny_model / "model", None), TrainConfig(ema_decay=0.5), (4, 4, 4))
    files = write_lora_outputs(family, outcome, params, tmp_path, "lora1", {})
    raw, ema = (
        read_lora_file(files[f], family.kohya_prefix, "unet") for f in ("lora1.safetensors", "lora1-ema.safetensors")
    )
    assert raw.modules.keys() == ema.modules.keys()
    name = next(iter(raw.modules))
    assert not torch.equal(raw.modules[name].up, ema.modules[name].up)
    assert ema.metadata["lora_pipeline.ema_decay"] == "0.5"
