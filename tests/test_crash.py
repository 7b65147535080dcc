"""kill -9 during latents and during training: nothing partial is trusted, and the next run resumes.

LORA_PIPELINE_FAULT places a real SIGKILL at a named point (core/faults.py), so the kill lands at the
worst moment deterministically: an array written but not committed, a step done but not checkpointed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SUBPROCESS_TIMEOUT, Project, make_images

pytestmark = pytest.mark.slow


def _killed(project, fault: str):
    """A run in a subprocess, SIGKILLed at the fault point."""
    env = {"LORA_PIPELINE_FAULT": fault}
    return project.subprocess("run", "lora", "-c", str(project.config), "--json", env=env)


def _run(project, workflow: str = "lora"):
    """The user's next run after the kill, in this process (the same code, without a subprocess's imports)."""
    return project.run(workflow, "--no-progress")


def _status(project, workflow: str = "lora") -> dict[str, dict]:
    out = project.cli("status", workflow, "--json")
    assert out.exit_code == 0, out.output
    return {s["name"]: s for s in json.loads(out.stdout)["stages"]}


def test_kill_during_latents_then_resume(project):
    make_images(project.root / "images", 4, start=6)  # 10 images
    # Killed while writing the 4th latent: 3 committed, the 4th written to zarr but not in the commit log.
    killed = _killed(project, "pool.put:4")
    assert killed.returncode == -signal.SIGKILL
    assert not project.manifests("latents")
    status = _status(project)
    assert status["caption"]["state"] == "fresh"
    assert (status["latents"]["state"], status["latents"]["progress"]) == ("partial", [3, 10])
    done = _run(project)
    latents = next(s for s in json.loads(done.stdout)["stages"] if s["name"] == "latents")
    assert latents["action"] == "ran" and latents["summary"] == "7 encoded, 3 reused"
    assert "3/10 images already encoded" in done.stderr


def test_external_kill_9_during_training(project):
    project.write_config(lora1={"steps": 120}, runtime={"checkpoint_every": 2})  # ~2 s quiet: room to kill
    cmd = [sys.executable, str(REPO / "cli.py"), "run", "lora", "-c", str(project.config), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=project.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait for the event (the first checkpoint on disk), however long a loaded machine takes to get there.
    started = time.monotonic()
    while not list(project.store.glob("stages/lora1/*/work/ckpt-*")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() - started < SUBPROCESS_TIMEOUT, "time-out: no checkpoint appeared (a hang?)"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(project.store.glob("stages/lora1/*/work/ckpt-*")), "training never reached a checkpoint"
    assert not project.manifests("lora1")
    status = _status(project)["lora1"]
    assert status["state"] == "partial" and status["progress"][0] >= 2
    # The lock died with the process: a new run gets it at once and finishes from the checkpoint.
    done = _run(project)
    assert "resuming from the checkpoint" in done.stderr


def test_a_second_run_on_the_same_store_waits_and_says_who_holds_the_lock(project):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); from cache.store import Store; "
            "s = Store(sys.argv[2]); s.lock.acquire('pipeline run lora'); print('held', flush=True); sys.stdin.read()",
            str(REPO),
            str(project.store),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # holds the lock until killed, however slow the rest of the test is
    assert holder.stdout.readline().strip() == "held"
    cmd = [sys.executable, str(REPO / "cli.py"), "run", "lora", "-c", str(project.config), "--json"]
    second = subprocess.Popen(cmd, cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waited = second.stderr.readline()
    assert f"waiting for the store lock held by pid {holder.pid} (pipeline run lora" in waited
    time.sleep(1)
    assert second.poll() is None and not project.manifests("caption"), "the second run must wait, not work"
    holder.kill()
    holder.wait()
    out, err = second.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert second.returncode == 0, err
    assert {s["action"] for s in json.loads(out)["stages"]} == {"ran"}


def test_kill_during_teacher_resumes_per_step_to_the_same_deltas(transfer_project, tmp_path):
    project = transfer_project
    twin_root = tmp_path.parent / (tmp_path.name + "-twin")
    shutil.copytree(project.root, twin_root)

    env = {"LORA_PIPELINE_FAULT": "teacher.step:3"}  # 3 of 6 steps committed, then SIGKILL
    killed = project.subprocess("run", "transfer", "-c", str(project.config), "--json", env=env)
    assert killed.returncode == -signal.SIGKILL
    assert not project.manifests("teacher")
    teacher = _status(project, "transfer")["teacher"]
    # (inputs, c) x 3 steps of 6, + the held-out and fit sets
    assert teacher["state"] == "partial" and teacher["progress"] == [6, 16]
    resumed = _run(project, "transfer")
    assert "teacher: resuming, 3 of 6 steps and the held-out sets to go" in resumed.stderr
    clean = _run(Project(twin_root, project.settings), "transfer")
    a = {s["name"]: s["key"] for s in json.loads(resumed.stdout)["stages"]}
    b = {s["name"]: s["key"] for s in json.loads(clean.stdout)["stages"]}
    assert a == b

    def deltas(root) -> dict[str, str]:
        m = json.loads((root / ".pipeline" / "stages" / "teacher" / a["teacher"] / "manifest.json").read_text())
        log = root / ".pipeline" / "pools" / m["record"]["pool"] / "committed.jsonl"
        return {e["name"]: e["digest"] for e in map(json.loads, log.read_text().splitlines())}

    assert deltas(project.root) == deltas(twin_root)  # every stored delta bit-identical to the uninterrupted run's


def test_a_killed_run_keeps_its_save_every_steps_files_to_the_same_bytes(project, tmp_path):
    """The LoRA files kept at steps ride in the checkpoints, as previews do: a resumed run ends with those of an
    uninterrupted one."""
    import shutil

    project.write_config(lora1={"save_every_steps": 2})
    twin_root = tmp_path / "twin"
    shutil.copytree(project.root, twin_root)
    killed = _killed(project, "lora1.step:5")  # after the checkpoint and the file of step 4
    assert killed.returncode == -signal.SIGKILL and not project.manifests("lora1")
    _run(project)
    _run(Project(twin_root, project.settings))
    steps = "output/lora/lora1/steps"
    names = sorted(p.name for p in (project.root / steps).iterdir())
    assert names == ["lora1-step000002.safetensors", "lora1-step000004.safetensors"]
    for name in names:
        assert (project.root / steps / name).read_bytes() == (twin_root / steps / name).read_bytes()
