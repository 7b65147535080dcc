"""Several processes (torchrun, gloo on the CPU): the training stages share their micro-steps, so a 2-process run
trains the LoRA of a 1-process run with twice the gradient accumulation; rank 0 alone plans, commits and exports;
a killed rank fails the stage with nothing committed, and the run resumes from rank 0's checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT, Project
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(project: Project, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "cli",
        "run",
        "lora",
        "-c",
        str(project.config),
        "--json",
        *args,
    ]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        return subprocess.run(
            cmd, cwd=project.root, capture_output=True, text=True, env=environ, timeout=SUBPROCESS_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"time-out: torchrun ran for over {SUBPROCESS_TIMEOUT} s (a hang?)")


def lora(project: Project) -> dict[str, torch.Tensor]:
    return load_file(project.root / "output" / "lora" / "lora1" / "lora1.safetensors")


def copy_of(project: Project, where: Path) -> Project:
    shutil.copytree(project.root / "model", where / "model")
    shutil.copytree(project.root / "images", where / "images")
    return Project(where, json.loads(json.dumps(project.settings)))


def test_two_processes_train_the_lora_of_one_with_twice_the_accumulation(project, tmp_path):
    two = torchrun(project)
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout)  # one report, from rank 0
    assert [s["action"] for s in report["stages"]] == ["ran"] * 4
    manifest = json.loads(project.manifests("lora1")[0].read_text())
    assert manifest["preimage"]["params"]["processes"] == 2  # not the artifact of a 1-process run

    one = copy_of(project, tmp_path / "one")
    one.run_json("--set", "lora1.grad_accum=2")
    a, b = lora(project), lora(one)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    losses = [line.split(",")[1] for line in (project.root / "output/lora/lora1/loss.csv").read_text().splitlines()]
    assert losses == [line.split(",")[1] for line in (one.root / "output/lora/lora1/loss.csv").read_text().splitlines()]

    # the latents, text and caption artifacts are the ones a 1-process run makes: a plain run reuses them
    again = one.run_json()
    assert {s["name"]: s["action"] for s in again["stages"]}["latents"] == "reused"


def test_a_killed_rank_fails_the_stage_with_nothing_committed_then_the_run_resumes(project, tmp_path):
    whole = copy_of(project, tmp_path / "whole")
    assert torchrun(whole).returncode == 0

    killed = torchrun(project, env={"LORA_PIPELINE_FAULT": "lora1.step:3@1"})  # rank 1 dies at step 3 of 6
    assert killed.returncode != 0
    assert not project.manifests("lora1") and project.manifests("text")  # the stages before it stay committed
    work = next((project.store / "stages" / "lora1").glob("*/work"))
    assert (work / "ckpt-0000002").is_dir()  # rank 0's checkpoint of step 2

    resumed = torchrun(project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at step 2/6" in resumed.stderr
    a, b = lora(project), lora(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the bytes of the uninterrupted run
