"""Differential LoRA end to end on the tiny model: per-pair stages, ΔW averaging, eval, bad pairs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import actions, make_pairs


def run(project, *args: str) -> dict:
    return project.run_json(*args, workflow="differential")


def ran(report: dict) -> set[str]:
    return {s for s, a in actions(report).items() if a == "ran"}


def test_differential_runs_per_pair_and_a_new_pair_trains_only_that_pair(differential_project):
    project = differential_project
    first = run(project)
    nodes = {s["name"] for s in first["stages"]}
    per_pair = {f"{s}.{p}.{x}" for s in ("caption", "latents", "text") for p in ("red-circle", "yellow-square")
                for x in "ab"}  # fmt: skip
    assert nodes == per_pair | {"lora1.red-circle", "lora1.yellow-square", "lora2.red-circle",
                                "lora2.yellow-square", "average", "eval"}  # fmt: skip
    assert ran(first) == nodes
    out = project.root / "output" / "differential"
    assert (out / "average" / "lora2_average.safetensors").exists()
    assert (out / "lora2.red-circle" / "lora2.safetensors").exists()
    assert not (out / "lora1.red-circle").exists()  # only LoRA-2s are outputs; LoRA-1 stays in the store
    assert ran(run(project)) == set()

    make_pairs(project.root / "pairs", names=("white-triangle",))
    report = run(project)
    new = {f"{s}.white-triangle.{x}" for s in ("caption", "latents", "text") for x in "ab"}
    assert ran(report) == new | {"lora1.white-triangle", "lora2.white-triangle", "average", "eval"}

    report = run(project, "--set", "differential.lora2.lr=1e-3")
    assert ran(report) == {f"lora2.{p}" for p in ("red-circle", "yellow-square", "white-triangle")} | {
        "average",
        "eval",
    }


def test_the_average_is_the_exact_mean_delta_w_of_the_pairs(differential_project):
    from stages.training.lora_files import read_lora_file
    from stages.training.lora_ops import delta_weight

    run(differential_project)
    out = differential_project.root / "output" / "differential"
    name = "diffusers/pytorch_lora_weights.safetensors"
    pairs = [read_lora_file(out / f"lora2.{p}" / name) for p in ("red-circle", "yellow-square")]
    avg = read_lora_file(out / "average" / name)
    assert avg.ranks == {8}  # 2 pairs x rank 4, nothing dropped
    for module in pairs[0].modules:
        mean = (delta_weight(pairs[0].modules[module]) + delta_weight(pairs[1].modules[module])) / 2
        torch.testing.assert_close(delta_weight(avg.modules[module]), mean, atol=1e-6, rtol=1e-5)
    # The same file in the kohya format carries the same ΔW.
    kohya = read_lora_file(out / "average" / "lora2_average.safetensors")
    assert len(kohya.modules) == len(avg.modules) and kohya.ranks == {8}


def test_compressed_average_reports_its_error(differential_project):
    report = run(differential_project, "--set", "differential.average_rank=2")
    key = next(s["key"] for s in report["stages"] if s["name"] == "average")
    record = json.loads((differential_project.store / "stages" / "average" / key / "manifest.json").read_text())[
        "record"
    ]
    assert record["rank"] == 2 and not record["exact"]
    assert all(0 < e < 1 for e in record["rel_error"].values())


def test_eval_table_is_stored_and_printed(differential_project):
    project = differential_project
    run(project)
    result = project.cli("eval", "differential", "-c", str(project.config), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(record["pairs"]) == {"red-circle", "yellow-square"} and record["samples"] == 2
    for row in record["pairs"].values():
        # LoRA-1 was trained on A: with it A denoises better than with the bare base (4 steps at lr 5e-3).
        assert row["loss_a_lora1"] < row["loss_a_base"]
        assert -1 <= row["direction_lora2"] <= 1 and -1 <= row["direction_average"] <= 1
    table = project.cli("eval", "differential", "-c", str(project.config))
    assert "differential eval" in table.output and "red-circle" in table.output


def test_the_eval_with_bf16_weights_reruns_alone_and_reads_as_the_fp32_one(differential_project):
    """differential.eval_weights_dtype = bf16 stores the model's weights in bf16 and computes in fp32: only the eval
    runs again, its losses and cosines near the fp32 eval's but not equal to them."""
    project = differential_project
    exact = run(project)
    narrow = run(project, "--set", "differential.eval_weights_dtype='bf16'")
    assert ran(narrow) == {"eval"}
    tables = []
    for report in (exact, narrow):
        key = next(s["key"] for s in report["stages"] if s["name"] == "eval")
        tables.append(json.loads((project.store / "stages" / "eval" / key / "manifest.json").read_text())["record"])
    assert tables[1]["weights_dtype"] == "bf16" and tables[0]["weights_dtype"] == "fp32"
    values = [[v for row in t["pairs"].values() for v in row.values()] for t in tables]
    assert values[0] != values[1]
    assert values[1] == pytest.approx(values[0], rel=0.05, abs=0.02)


def test_lora1_merged_in_fp32_gives_the_adapter_s_first_loss(differential_project):
    """W + ΔW merged in fp32 and W with a frozen LoRA adapter compute the same forward: same first LoRA-2 loss."""

    def first_losses(*args):
        report = run(differential_project, *args)
        out = {}
        for s in report["stages"]:
            if s["name"].startswith("lora2."):
                m = differential_project.store / "stages" / "lora2" / s["key"] / "manifest.json"
                out[s["name"]] = json.loads(m.read_text())["record"]["first_loss"]
        return out

    adapter, merged = first_losses(), first_losses("--set", "differential.lora1_mode='merged'")
    for name in adapter:
        assert merged[name] == pytest.approx(adapter[name], rel=1e-5)


def test_paired_noise_replays_lora1_draws():
    from stages.training.loop import DiffusionBatches, TrainData

    class Process:
        num_timesteps = 1000

        def sample_timesteps(self, n, g):
            return torch.randint(0, 1000, (n,), generator=g)

        def noisy_input(self, x0, noise, t):
            return noise  # expose the noise itself

        def target(self, x0, noise, t):
            return x0

    a = TrainData(torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 8), torch.zeros(1, dtype=torch.long))
    b = TrainData(torch.ones(1, 4, 4, 4), torch.ones(1, 3, 8), torch.zeros(1, dtype=torch.long))
    for k in range(3):
        na, ta, _, _ = DiffusionBatches(a, 42, 1, "").micro_batch(k, None, Process())
        nb, tb, _, _ = DiffusionBatches(b, 42, 1, "").micro_batch(k, None, Process())  # paired: lora1's stream
        nc, tc, _, _ = DiffusionBatches(b, 42, 1, "lora2").micro_batch(k, None, Process())  # unpaired
        assert torch.equal(na, nb) and torch.equal(ta, tb)
        assert not torch.equal(na, nc)


def test_gc_keeps_every_artifact_of_the_last_differential_run(differential_project):
    project = differential_project
    run(project)
    result = project.cli("gc", "-c", str(project.config), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed"] == []


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty-b", "side B"),
        ("sizes", "must be images of one size"),
        ("no-pairs-dir", "differential.pairs_dir"),
    ],
)
def test_bad_pairs_are_refused_before_anything_is_written(differential_project, damage, message):
    from PIL import Image

    root = differential_project.root / "pairs"
    if damage == "empty-b":
        for f in (root / "red-circle" / "b").iterdir():
            f.unlink()
    elif damage == "sizes":
        path = root / "red-circle" / "b" / "scene.png"
        Image.open(path).resize((40, 40)).save(path)
    else:
        shutil.rmtree(root)
    result = differential_project.cli("run", "differential")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not differential_project.manifests("caption")
