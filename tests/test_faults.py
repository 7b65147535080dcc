"""The fault-injection suite: kill -9 every stage of `transfer` and `differential` at each fault point, resume,
and compare the final store with an uninterrupted run's, byte for byte.

LORA_PIPELINE_FAULT=<point>:<n> SIGKILLs the process at the n-th pass of a named point (core/faults.py), so
each kill lands at the worst moment deterministically: an array written but not committed (pool.put), a
step done but not checkpointed (<stage>.step), right after a checkpoint (<stage>.checkpoint).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from conftest import (
    DIFFERENTIAL_SETTINGS,
    SMALL_SETTINGS,
    TINY_BUCKETS,
    TRANSFER_SETTINGS,
    Project,
    make_images,
    make_mixed_images,
    make_pairs,
)

pytestmark = pytest.mark.slow


def _settings(base: dict) -> dict:
    settings = json.loads(json.dumps(base))
    settings.setdefault("runtime", {})["checkpoint_every"] = 2
    settings["runtime.preview"] = {"every": 2, "steps": 2}  # previews too: they must survive a kill
    return settings


# Every training method of docs/training.md on at once (the fused backward pass excludes grad_accum > 1 and
# clipping by design; tests/test_optim.py checks those with the unfused loop), on a DoRA, with the text encoder's
# LoRA. The other networks are killed in the other workflows: a LoHa teacher LoRA and a DoRA student in transfer, a
# PiSSA LoRA-1 (whose start is recomputed from the base weights on resume) in differential.
EVERYTHING = {
    "network": "dora", "rank": 4, "alpha": 8.0, "rslora": True, "lr": 1e-3, "steps": 6, "batch_size": 2, "dropout": 0.1,
    "loss": "huber", "huber_schedule": "snr", "min_snr_gamma": 5.0, "noise_offset": 0.05, "adaptive_noise_scale": 0.01,
    "multires_noise_iterations": 2, "ip_noise_gamma": 0.05, "min_timestep": 50, "max_timestep": 950,
    "optimizer": "adamw", "optimizer_args": {"betas": [0.9, 0.99]}, "lr_scheduler": "cosine_with_restarts",
    "lr_scheduler_num_cycles": 2, "warmup_steps": "20%", "loraplus_lr_ratio": 4.0,
    "block_lr": {"down_blocks.0": 0.5, "up_blocks.1": -0.5, "mid_block": 0}, "ema_decay": 0.9,
    "fused_backward": True, "optimizer_groups": 3, "max_grad_norm": 0.0,
    "train_text_encoder": True, "text_encoder_lr": 5e-4, "loraplus_text_encoder_lr_ratio": 2.0,
}  # fmt: skip

WORKFLOWS = {
    "lora": (
        {
            **_settings(SMALL_SETTINGS),
            "lora1": EVERYTHING,
            "data": {"caption_prefix": "sks, photo, ", "shuffle_caption": True, "keep_tokens": 1},
            "runtime": {"checkpoint_every": 2, "gradient_checkpointing": True},
            "runtime.preview": {"every": 2, "steps": 2, "ema": True},
        },
        ["lora1.step:3", "lora1.checkpoint:4"],
    ),
    "transfer": (
        {
            **_settings(TRANSFER_SETTINGS),
            "lora1": {**TRANSFER_SETTINGS["lora1"], "network": "loha"},
            "student": {**TRANSFER_SETTINGS["student"], "network": "dora"},
            "data": {"caption_prefix": "sks, photo, ", "shuffle_caption": True, "caption_tag_dropout_rate": 0.2},
            # images of three aspect ratios in buckets, two random crops each, mirrored too: 24 views, steps whose
            # micro-batches differ in shape (the teacher's and prior's arrays stored flat)
            "latents": {**TINY_BUCKETS, "resolution": 32, "crop": "random", "crop_variants": 2, "flip_aug": True},
            "schedule": {**TRANSFER_SETTINGS["schedule"], "grad_accum": 2, "heldout_images": 0},
        },
        [
            "pool.put:3",  # latents: 2 views committed, the 3rd written but not in the commit log
            "lora1.step:3",  # a step past the checkpoint at 2
            "lora1.checkpoint:2",  # right after the checkpoint was renamed into place
            "teacher.step:2",
            "prior.step:2",
            "student.step:5",
            "student.checkpoint:4",
        ],
    ),
    "differential": (
        {
            **_settings(DIFFERENTIAL_SETTINGS),
            "differential.lora1": {**DIFFERENTIAL_SETTINGS["differential.lora1"], "lora_init": "pissa"},
        },
        ["lora1.step:3", "lora2.step:3", "lora2.checkpoint:2"],
    ),
}


def _make(root: Path, tiny_model: Path, workflow: str) -> Project:
    shutil.copytree(tiny_model / "model", root / "model")
    if workflow == "transfer":
        shutil.copytree(tiny_model / "student", root / "student")
    if workflow == "transfer":
        make_mixed_images(root / "images", 6)
    elif workflow == "lora":
        make_images(root / "images", 6)
    else:
        make_pairs(root / "pairs")
    return Project(root, json.loads(json.dumps(WORKFLOWS[workflow][0])))


def _killed(project: Project, workflow: str, fault: str):
    """The run that dies: a subprocess, SIGKILLed at the fault point."""
    env = {"LORA_PIPELINE_FAULT": fault}
    return project.subprocess("run", workflow, "-c", str(project.config), "--json", "--no-progress", env=env)


def _run(project: Project, workflow: str):
    """A plain run, in this process (it saves a subprocess's imports; the bytes it writes may not depend on which
    process writes them, so this is also part of the check)."""
    return project.run(workflow, "--no-progress")


def fingerprint(store: Path) -> dict[str, dict]:
    """Every committed artifact: its outputs' digests and the digests of the pool arrays it references."""
    out = {}
    for path in sorted(store.glob("stages/*/*/manifest.json")):
        m = json.loads(path.read_text())
        arrays = {}
        for pool_id, names in m["pools"].items():
            log = store / "pools" / pool_id / "committed.jsonl"
            digests = {e["name"]: e["digest"] for e in map(json.loads, log.read_text().splitlines())}
            arrays[pool_id] = {n: digests[n] for n in names}
        out[f"{m['stage']}/{m['key']}"] = {
            "outputs": {k: v["digest"] for k, v in m["outputs"].items()},
            "arrays": arrays,
        }
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model) -> dict[str, dict]:
    prints = {}
    for workflow in WORKFLOWS:
        project = _make(tmp_path_factory.mktemp(f"straight-{workflow}"), tiny_model, workflow)
        _run(project, workflow)
        prints[workflow] = fingerprint(project.store)
    return prints


@pytest.mark.parametrize("workflow, fault", [(w, f) for w, (_, faults) in WORKFLOWS.items() for f in faults])
def test_killed_at_a_fault_point_then_resumed_writes_the_bytes_of_an_uninterrupted_run(
    tmp_path, tiny_model, uninterrupted, workflow, fault
):
    project = _make(tmp_path, tiny_model, workflow)
    killed = _killed(project, workflow, fault)
    assert killed.returncode == -signal.SIGKILL, f"the fault point {fault} was never reached:\n{killed.stderr}"
    status = project.cli("status", workflow, "--json")
    assert status.exit_code == 0, status.output
    states = {s["name"]: s["state"] for s in json.loads(status.stdout)["stages"]}
    assert set(states.values()) - {"fresh"}, "a killed stage must not look finished"
    resumed = _run(project, workflow)
    if fault.split(".")[1].split(":")[0] in ("step", "checkpoint") and fault.split(":")[1] != "1":
        assert "resum" in resumed.stderr, "the second run must continue from the saved progress"
    assert fingerprint(project.store) == uninterrupted[workflow]
