"""The DeepSpeed settings an accelerate config puts in the environment, and what a section may ask for under ZeRO
(the runs under DeepSpeed are in tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from core import dist
from core.errors import ConfigError
from stages.training.zero import check_section, engine_config


def settings(monkeypatch, **env):
    for name in [n for n in os.environ if n.startswith("ACCELERATE_DEEPSPEED_")]:
        monkeypatch.delenv(name)
    for name, value in {"ACCELERATE_USE_DEEPSPEED": "true", **env}.items():
        monkeypatch.setenv(name, value)
    return dist.read_deepspeed()


def test_accelerate_zero_lines_and_its_defaults(monkeypatch):
    assert settings(monkeypatch).stage == 2  # accelerate's default zero_stage
    three = settings(monkeypatch, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu")
    assert (three.stage, three.offload_param, three.offload_optimizer) == (3, "cpu", "none")
    assert settings(monkeypatch, ACCELERATE_DEEPSPEED_ZERO_STAGE="0") is None  # plain data parallelism
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert dist.read_deepspeed() is None


def test_a_deepspeed_config_file_gives_its_zero_section(monkeypatch, tmp_path):
    file = tmp_path / "ds.json"
    file.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "optimizer": {"type": "AdamW"},  # the section's own optimizer steps: these are left alone
                "zero_optimization": {
                    "stage": 3,
                    "offload_optimizer": {"device": "cpu"},
                    "stage3_max_live_parameters": 100000,
                    "stage3_param_persistence_threshold": 10,  # raised: the LoRA must stay whole
                    "reduce_bucket_size": "auto",  # (transformers' configs: the defaults stand)
                },
            }
        )
    )
    zero = settings(monkeypatch, ACCELERATE_DEEPSPEED_CONFIG_FILE=str(file))
    assert (zero.stage, zero.offload_optimizer, zero.offload_param) == (3, "cpu", "none")
    assert str(file) in zero.source

    lora = [torch.nn.Parameter(torch.zeros(4, 64)), torch.nn.Parameter(torch.zeros(64, 4))]
    section = SimpleNamespace(batch_size=2, max_grad_norm=0.0)
    config = engine_config(zero, section, 3, lora, torch.device("cpu"), model_size=5 * 10**8)
    assert config["gradient_accumulation_steps"] == 3 and config["gradient_clipping"] == 0.0
    tuned = config["zero_optimization"]
    assert tuned["stage3_max_live_parameters"] == 100000 and tuned["stage3_param_persistence_threshold"] == 257
    assert tuned["stage3_max_reuse_distance"] == 5 * 10**7  # a tenth of the model, where the file says nothing
    assert tuned["reduce_bucket_size"] == 512  # the LoRA's size, not DeepSpeed's 500M numbers
    assert "offload_optimizer" not in tuned  # nothing to offload on the CPU


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "4"}, "zero_stage is '4'; use 0, 1, 2 or 3"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"}, "offload_optimizer_device is 'nvme' (NVMe"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, "offload_param_device is cpu, which only ZeRO stage 3"),
        ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "/nowhere/ds.json"}, "deepspeed_config_file /nowhere/ds.json cannot be"),
    ],
)
def test_a_setting_this_project_cannot_apply_names_its_key(monkeypatch, env, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        settings(monkeypatch, **env)


def test_a_file_that_is_not_json_is_named(monkeypatch, tmp_path):
    file = tmp_path / "ds.json"
    file.write_text("{stage: 3")
    with pytest.raises(ConfigError, match="ds.json is not JSON"):
        settings(monkeypatch, ACCELERATE_DEEPSPEED_CONFIG_FILE=str(file))


def test_init_takes_the_deepspeed_config_so_its_accelerator_sets_up_none(monkeypatch):
    settings(monkeypatch, ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    dist.init()
    try:
        assert dist.zero().stage == 3 and "ACCELERATE_USE_DEEPSPEED" not in os.environ
    finally:
        dist._zero = None


SECTION = {"optimizer": "adamw", "mixed_precision": "bf16", "fp8_base": False}


@pytest.mark.parametrize(
    ("change", "text_encoder", "named"),
    [
        ({"optimizer": "prodigy"}, False, "lora1.optimizer = 'prodigy'"),
        ({"optimizer": "adafactor"}, False, "lora1.optimizer = 'adafactor'"),
        ({}, True, "lora1.train_text_encoder = true"),
        ({"mixed_precision": "fp16"}, False, 'lora1.mixed_precision = "fp16"'),
        ({"fp8_base": True}, False, "lora1.fp8_base and DeepSpeed ZeRO"),
    ],
)
def test_what_zero_would_change_is_refused_by_name(monkeypatch, change, text_encoder, named):
    zero = settings(monkeypatch, ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    check_section(zero, SimpleNamespace(**SECTION), "lora1", False)  # adamw, bf16: allowed
    with pytest.raises(ConfigError) as e:
        check_section(zero, SimpleNamespace(**{**SECTION, **change}), "lora1", text_encoder)
    assert named in str(e.value) and "ZeRO-3" in str(e.value)


def test_a_peer_that_died_inside_a_library_collective_is_a_message(monkeypatch):
    """gloo's error in DeepSpeed's or FSDP's own collectives when another process exited: the one-line message of
    dist's own collectives (cli_common.user_errors prints it), not a traceback; any other error stays one."""
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:30616")
    assert dist.peer_failure(gone) is None  # one process: no peers
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    failure = dist.peer_failure(gone)
    assert "process 1 of 2: another process of this run stopped during a training step" in str(failure)
    assert dist.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
