"""The FSDP settings an accelerate config puts in the environment, and the units they make of a real UNet (the
runs under FSDP are in tests/test_distributed.py)."""

from __future__ import annotations

import os

import pytest

from core import dist
from core.errors import ConfigError
from stages.training.fsdp import wrap_units

ACCELERATE = {"ACCELERATE_USE_FSDP": "true"}


def settings(monkeypatch, **env):
    for name in [n for n in os.environ if n.startswith("FSDP_")]:
        monkeypatch.delenv(name)
    for name, value in {**ACCELERATE, **env}.items():
        monkeypatch.setenv(name, value)
    return dist.read_fsdp()


def test_accelerate_strategies_by_name_or_number_and_fsdp2_reshard(monkeypatch):
    assert settings(monkeypatch).strategy == "FULL_SHARD"  # accelerate's default
    assert settings(monkeypatch, FSDP_SHARDING_STRATEGY="2").strategy == "SHARD_GRAD_OP"  # older configs' numbers
    assert not settings(monkeypatch, FSDP_SHARDING_STRATEGY="SHARD_GRAD_OP").reshard_after_forward
    hybrid = settings(monkeypatch, FSDP_SHARDING_STRATEGY="hybrid_shard")
    assert hybrid.hybrid and hybrid.reshard_after_forward
    assert settings(monkeypatch, FSDP_SHARDING_STRATEGY="NO_SHARD") is None  # replicas: the plain processes
    assert settings(monkeypatch, FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="false").strategy == "SHARD_GRAD_OP"
    assert settings(monkeypatch, FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="true").strategy == "FULL_SHARD"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert dist.read_fsdp() is None


def test_init_takes_the_fsdp_config_from_accelerate_so_its_accelerator_sets_up_none(monkeypatch):
    settings(monkeypatch, FSDP_SHARDING_STRATEGY="SHARD_GRAD_OP", FSDP_ACTIVATION_CHECKPOINTING="true")
    dist.init()
    try:
        assert dist.fsdp().strategy == "SHARD_GRAD_OP" and dist.fsdp().activation_checkpointing
        assert "ACCELERATE_USE_FSDP" not in os.environ
    finally:
        dist._fsdp = None


@pytest.fixture(scope="module")
def unet(tiny_model):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model / "model", subfolder="unet")


def test_units_are_the_blocks_diffusers_names_children_first(monkeypatch, unet):
    units = wrap_units(unet, settings(monkeypatch))
    names = {type(u).__name__ for u in units}
    assert names == set(unet._no_split_modules)
    position = {id(u): i for i, u in enumerate(units)}
    for unit in units:  # a block inside another block comes before it (fully_shard goes bottom-up)
        for inner in unit.modules():
            if inner is not unit and id(inner) in position:
                assert position[id(inner)] < position[id(unit)]


def test_named_classes_size_based_and_no_wrap(monkeypatch, unet):
    blocks = wrap_units(unet, settings(monkeypatch, FSDP_TRANSFORMER_CLS_TO_WRAP="BasicTransformerBlock"))
    assert blocks and {type(u).__name__ for u in blocks} == {"BasicTransformerBlock"}
    assert wrap_units(unet, settings(monkeypatch, FSDP_AUTO_WRAP_POLICY="NO_WRAP")) == []
    total = sum(p.numel() for p in unet.parameters())
    by_size = wrap_units(
        unet, settings(monkeypatch, FSDP_AUTO_WRAP_POLICY="SIZE_BASED_WRAP", FSDP_MIN_NUM_PARAMS="20000")
    )
    taken: set[int] = set()
    assert by_size
    for unit in by_size:  # children first: each unit holds at least 20000 weights no unit inside it took
        own = [p for p in unit.parameters() if id(p) not in taken]
        assert sum(p.numel() for p in own) >= 20000
        taken.update(id(p) for p in own)
    assert (
        wrap_units(
            unet, settings(monkeypatch, FSDP_AUTO_WRAP_POLICY="SIZE_BASED_WRAP", FSDP_MIN_NUM_PARAMS=str(total + 1))
        )
        == []
    )


def test_a_class_the_model_lacks_is_named_with_the_ones_it_has(monkeypatch, unet):
    with pytest.raises(ConfigError) as e:
        wrap_units(unet, settings(monkeypatch, FSDP_TRANSFORMER_CLS_TO_WRAP="FluxTransformerBlock,ResnetBlock2D"))
    message = str(e.value)
    assert "fsdp_transformer_layer_cls_to_wrap names FluxTransformerBlock" in message
    assert "Transformer2DModel" in message and "BasicTransformerBlock" in message
