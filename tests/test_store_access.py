"""A store that cannot be written, and a run stopped by SIGTERM: named messages, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SUBPROCESS_TIMEOUT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def readonly_project(project):
    """The project after one run, its store made read-only: a read-only bind mount (what a store on a
    read-only share or snapshot is; permission bits do not bind root), or without one, permission bits."""
    assert project.run_json()
    store = project.store
    if os.geteuid() != 0:  # pragma: no cover - CI and the dev machines run as root
        for path in [store, *store.rglob("*")]:
            os.chmod(path, 0o555 if path.is_dir() else 0o444)
        yield project
        for path in [store, *store.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        return
    mount = subprocess.run(["mount", "--bind", str(store), str(store)], capture_output=True, text=True)
    if mount.returncode != 0:  # pragma: no cover
        pytest.skip(f"running as root without the right to mount a read-only store: {mount.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(store)], capture_output=True, text=True)
        assert ro.returncode == 0, ro.stderr
        yield project
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_a_read_only_store_reports_status_and_refuses_run_and_gc_by_name(readonly_project):
    root = readonly_project.root
    cfg = str(root / "pipeline.toml")
    status = run_cli(["status", "lora", "-c", cfg, "--json"], cwd=root)
    assert status.returncode == 0, status.stderr
    assert {s["state"] for s in json.loads(status.stdout)["stages"]} == {"fresh"}
    for args in (["run", "lora", "-c", cfg, "--set", "lora1.lr=5e-4"], ["gc", "-c", cfg]):
        result = run_cli(args, cwd=root)
        assert result.returncode == 2, result.stderr
        assert "is read-only" in result.stderr and str(root / ".pipeline") in result.stderr
        assert "Traceback" not in result.stderr


def test_sigterm_stops_a_run_like_ctrl_c_and_the_next_run_resumes(project):
    project.write_config(lora1={"steps": 400}, runtime={"checkpoint_every": 2})
    cmd = [sys.executable, str(REPO / "cli.py"), "run", "lora", "-c", str(project.config), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # an event, not a clock: the training stage has started
        if line.startswith("lora1: running"):
            break
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        pytest.fail(f"time-out: the run did not stop within {SUBPROCESS_TIMEOUT} s of SIGTERM")
    assert proc.returncode == 143, err
    assert "interrupted: finished items are kept; run the same command again to resume." in err
    assert "Traceback" not in err
    assert not project.manifests("lora1")


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`pipeline lora info FILE | head -1`: the reader has left before the output comes (its end of the pipe is
    closed before the command starts, so every write fails). No traceback, no error message."""
    from safetensors.torch import save_file

    lora = tmp_path / "l.safetensors"
    factors = {
        "lora_unet_a_to_q.lora_down.weight": torch.ones(2, 4),
        "lora_unet_a_to_q.lora_up.weight": torch.ones(4, 2),
    }
    save_file(factors, str(lora))
    read_end, write_end = os.pipe()
    os.close(read_end)
    cmd = [sys.executable, str(REPO / "cli.py"), "lora", "info", str(lora)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    err = proc.stderr.read().decode()
    proc.wait(timeout=SUBPROCESS_TIMEOUT)
    assert "Traceback" not in err and "error" not in err.lower(), err
