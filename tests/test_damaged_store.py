"""A store damaged by hand heals: a missing object or a garbled latent is re-made, everything else reused."""

from __future__ import annotations

import json

from conftest import actions


def test_a_deleted_output_file_is_made_again(project):
    project.run_json()
    manifest = json.loads(project.manifests("lora1")[0].read_text())
    obj = manifest["outputs"]["lora1.safetensors"]["digest"]
    (project.store / "objects" / obj[:2] / obj).unlink()
    status = {s["name"]: s for s in json.loads(project.cli("status", "lora", "--json").stdout)["stages"]}
    assert status["lora1"]["state"] == "stale"
    assert "store: output lora1.safetensors is missing" in status["lora1"]["causes"]
    report = project.run_json()
    assert actions(report) == {"caption": "reused", "latents": "reused", "text": "reused", "lora1": "ran"}
    assert (project.store / "objects" / obj[:2] / obj).exists(), "same settings, same bytes"


def test_a_garbled_latent_is_dropped_then_re_encoded(project):
    from cache.store import Store

    project.write_config(runtime={"encode_batch_size": 2})  # 2 latents per chunk
    project.run_json()
    latents = json.loads(project.manifests("latents")[0].read_text())
    pool = Store(project.store).pool(latents["record"]["pool"])
    name = sorted(latents["pools"][latents["record"]["pool"]])[0]
    chunk = pool.location(name)
    assert sum(pool.location(n) == chunk for n in pool.committed()) == 2
    chunk.write_bytes(b"\0" * chunk.stat().st_size)

    failed = project.cli("run", "lora", "--set", "lora1.lr=5e-4")  # lora1 must read every latent
    assert failed.exit_code == 1
    assert "was damaged" in failed.output and "run the same command again" in failed.output
    assert "Traceback" not in failed.output

    report = project.run_json("--set", "lora1.lr=5e-4")
    assert actions(report) == {"caption": "reused", "latents": "ran", "text": "reused", "lora1": "ran"}
    # both latents of the garbled chunk are re-made in one run, the other chunks' reused
    assert next(s for s in report["stages"] if s["name"] == "latents")["summary"] == "2 encoded, 4 reused"
