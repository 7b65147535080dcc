"""[runtime] log_with: TensorBoard event files and offline W&B runs of every stage run, read back with the
backends' own readers; a missing extra is refused by name before anything runs."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from conftest import stage_manifest


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    out = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    out["__images__"] = events.Tags()["images"]
    return out


def test_tensorboard_gets_every_stage_s_figures_in_a_run_per_stage_run(transfer_project):
    project = transfer_project
    project.write_config(runtime={"log_with": ["tensorboard"], "preview": {"every": 2, "steps": 2}})
    first = project.run_json(workflow="transfer")
    second = project.run_json("--set", "student.lr=3e-4", workflow="transfer")
    keys = {s["name"]: s["key"] for s in first["stages"]}
    logs = project.root / "logs" / "tensorboard"

    lora1 = scalars(logs / f"lora1-{keys['lora1'][:8]}")
    assert {"loss", "loss_smoothed", "grad_norm", "step_seconds"} <= set(lora1)
    assert any(tag.startswith("lr/") for tag in lora1) and "preview" in lora1["__images__"]
    path = project.root / "output" / "transfer" / "lora1" / "loss.csv"
    rows = list(csv.DictReader(path.open()))
    assert [s for s, _ in lora1["loss"]] == [int(r["step"]) for r in rows]
    assert [v for _, v in lora1["loss"]] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    assert [v for _, v in lora1["grad_norm"]] == pytest.approx([float(r["grad_norm"]) for r in rows], rel=1e-5)

    student = scalars(logs / f"student-{keys['student'][:8]}")
    curve = stage_manifest(project, first, "student")["record"]["fidelity"]["curve"]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in student["fidelity/cosine"]] == [
        (c["step"], c["cosine"]) for c in curve
    ]
    teacher = scalars(logs / f"teacher-{keys['teacher'][:8]}")
    assert len(teacher["teacher/mean_abs_delta"]) >= 5 and all(v > 0 for _, v in teacher["teacher/mean_abs_delta"])

    # the re-run's student is a run of its own beside the first; nothing else re-ran, nothing else logged again
    new_student = next(s["key"] for s in second["stages"] if s["name"] == "student")
    assert (logs / f"student-{new_student[:8]}").is_dir() and new_student != keys["student"]
    runs = sorted(p.name.rsplit("-", 1)[0] for p in logs.iterdir())
    assert runs == sorted(["lora1", "teacher", "prior", "student", "student"] + _other(first))


def _other(report: dict) -> list[str]:
    """The stages of a run that log nothing but still open a run (text, latents, ...): each has its folder only
    when it wrote something; TensorBoard writes an event file on open, so every stage that ran has one."""
    return [s["name"] for s in report["stages"] if s["name"] not in ("lora1", "teacher", "prior", "student")]


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (a LevelDB-style log of protobuf records, 32 KiB blocks, after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_wandb_offline_writes_a_run_per_stage_run_with_its_history(project):
    import json

    project.write_config(runtime={"log_with": ["wandb"]})
    report = project.run_json()
    key = next(s["key"] for s in report["stages"] if s["name"] == "lora1")
    runs = sorted((project.root / "logs" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    names, history = {}, {}
    for path in runs:
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                names[path] = r.run.display_name
            elif kind == "history":
                step = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(path, []).append(step)
    lora1 = next(p for p, n in names.items() if n == f"lora1-{key[:8]}")
    steps = history[lora1]
    assert len(steps) == project.settings["lora1"]["steps"]
    assert {"loss", "loss_smoothed", "grad_norm", "step_seconds"} <= set(steps[-1])
    record = stage_manifest(project, report, "lora1")["record"]
    tail = [s["loss"] for s in steps][-10:]
    assert sum(tail) / len(tail) == pytest.approx(record["final_loss"], rel=1e-6)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_extra_is_named_and_nothing_runs(project, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # import fails as where the extra is not installed
    project.write_config(runtime={"log_with": [backend]})
    result = project.cli("run", "lora")
    assert result.exit_code == 2, result.output
    assert f"lora-pipeline[{backend}]" in result.output and "runtime.log_with" in result.output
    assert "Traceback" not in result.output and not project.manifests("latents")
