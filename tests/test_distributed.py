"""Several processes (torchrun, gloo on the CPU): the training stages share their micro-steps, so a 2-process run
trains the LoRA of a 1-process run with twice the gradient accumulation; rank 0 alone plans, commits and exports;
a killed rank fails the stage with nothing committed, and the run resumes from rank 0's checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
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


def torchrun(project: Project, *args: str, env: dict | None = None, workflow: str = "lora"):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port"]
    cmd = [sys.executable, *launcher, str(free_port()), "-m", "cli", "run", workflow, "-c", str(project.config)]
    cmd += ["--json", *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **launch_temp(project), **(env or {})}
    try:
        return subprocess.run(
            cmd, cwd=project.root, capture_output=True, text=True, env=environ, timeout=SUBPROCESS_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"time-out: torchrun ran for over {SUBPROCESS_TIMEOUT} s (a hang?)")


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as torchrun gives each process: the same float summation order


def launch_temp(project: Project) -> dict:
    """TMPDIR beside the project: torchrun and accelerate launch leave a torchelastic_* folder per run in it."""
    temp = project.root.parent / "launch-temp"
    temp.mkdir(exist_ok=True)
    return {"TMPDIR": str(temp)}


def one_thread(project: Project, workflow: str = "lora", *args: str):
    """`pipeline run WORKFLOW` in this process (no subprocess's imports), on one thread as torchrun gives each
    process: the same float summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return project.run(workflow, *args)
    finally:
        torch.set_num_threads(threads)


def pool_arrays(project: Project, stage: str) -> dict[str, bytes]:
    """The bytes of every array the stage's artifact references in its pools."""
    from cache.store import Store

    store = Store(project.store)
    manifest = json.loads(project.manifests(stage)[0].read_text())
    out = {}
    for pid, names in manifest["pools"].items():
        pool = store.pool(pid)
        out.update({f"{pid}/{n}": pool.get(n).tobytes() for n in names})
    return out


def test_a_rank_killed_while_encoding_latents_leaves_its_rows_for_a_one_process_run(project, tmp_path):
    project.write_config(runtime={"checkpoint_every": 2, "encode_batch_size": 1})  # 6 batches: 3 per rank
    reference = copy_of(project, tmp_path / "reference")
    one_thread(reference)
    killed = torchrun(project, env={"LORA_PIPELINE_FAULT": "latents.batch:2@1"})  # rank 1, after its 2nd batch
    assert killed.returncode != 0 and not project.manifests("latents")
    assert "already encoded" in one_thread(project).stderr
    assert pool_arrays(project, "latents") == pool_arrays(reference, "latents")


def lora(project: Project) -> dict[str, torch.Tensor]:
    return load_file(project.root / "output" / "lora" / "lora1" / "lora1.safetensors")


def copy_of(project: Project, where: Path) -> Project:
    shutil.copytree(project.root / "model", where / "model")
    shutil.copytree(project.root / "images", where / "images")
    return Project(where, json.loads(json.dumps(project.settings)))


def one_process(project: Project, tmp_path: Path, accum: int) -> Project:
    """A copy of the project (its model and images) that ran `pipeline run lora` in one process of one thread with
    lora1.grad_accum = accum: what W processes with accum / W each must train."""
    one = copy_of(project, tmp_path / "one")
    one_thread(one, "lora", "--set", f"lora1.grad_accum={accum}")
    return one


def assert_same_lora(project: Project, other: Project, *names: str) -> None:
    """lora1's files (lora1.safetensors unless named) are the same in both projects, to fp32 tolerance."""
    for name in names or ("lora1.safetensors",):
        a, b = (load_file(p.root / "output/lora/lora1" / name) for p in (project, other))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_two_processes_train_the_lora_of_one_with_twice_the_accumulation(project, tmp_path):
    two = torchrun(project)
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout)  # one report, from rank 0
    assert [s["action"] for s in report["stages"]] == ["ran"] * 4
    manifest = json.loads(project.manifests("lora1")[0].read_text())
    assert manifest["preimage"]["params"]["processes"] == 2  # not the artifact of a 1-process run

    one = one_process(project, tmp_path, accum=2)
    assert pool_arrays(project, "latents") == pool_arrays(one, "latents")  # split by batch, the same bytes
    assert pool_arrays(project, "text") == pool_arrays(one, "text")
    assert_same_lora(project, one)
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


def imported_teacher_and_reference(project: Project, tmp_path: Path) -> Project:
    """Train a LoRA and import it as the teacher's (nothing upstream of the teacher then depends on the number of
    processes); -> a copy of the project, store included (the same latents and text), that ran the transfer in one
    process of one thread."""
    project.run_json()
    shutil.copyfile(project.root / "output/lora/lora1/lora1.safetensors", project.root / "teacher.safetensors")
    project.write_config(transfer={"student_model": "student", "teacher_lora": "teacher.safetensors"})
    reference = copy_of(project, tmp_path / "reference")
    shutil.copytree(project.root / "student", reference.root / "student")
    shutil.copyfile(project.root / "teacher.safetensors", reference.root / "teacher.safetensors")
    shutil.copytree(project.store, reference.store)
    one_thread(reference, "transfer")
    return reference


def assert_the_student_of(reference: Project, project: Project) -> None:
    """The project's student is the reference's (to 1e-6), and so is its fidelity curve (to 1e-4)."""
    a = load_file(project.root / "output/transfer/student/student.safetensors")
    b = load_file(reference.root / "output/transfer/student/student.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    curve = [line.split(",") for line in (project.root / "output/transfer/student/fidelity.csv").read_text().split()]
    wanted = [line.split(",") for line in (reference.root / "output/transfer/student/fidelity.csv").read_text().split()]
    assert len(curve) > 2 and curve[0] == wanted[0]
    assert all(
        abs(float(x) - float(y)) < 1e-4
        for r, w in zip(curve[1:], wanted[1:], strict=True)
        for x, y in zip(r, w, strict=True)
    )


def teacher_arrays(project: Project, stage: str = "teacher") -> dict[str, bytes]:
    return pool_arrays(project, stage)


def test_the_teacher_splits_its_steps_and_a_run_killed_on_two_resumes_on_one_to_the_same_bytes(
    transfer_project, tmp_path
):
    """Each rank computes every other schedule step and writes its own rows and log; killed with rank 1 at its
    2nd step, the transfer resumes in ONE process, redoes only the missing steps and writes the bytes of an
    uninterrupted 1-process run (the teacher's key does not depend on the number of processes)."""
    project = transfer_project
    reference = imported_teacher_and_reference(project, tmp_path)
    killed = torchrun(project, workflow="transfer", env={"LORA_PIPELINE_FAULT": "teacher.step:2@1"})
    assert killed.returncode != 0, killed.stderr[-4000:]
    assert not project.manifests("teacher")
    pool_dir = next((project.store / "pools" / "teacher").iterdir())
    logs = sorted(p.name for p in pool_dir.glob("committed.*.jsonl"))
    assert logs == ["committed.r0.jsonl", "committed.r1.jsonl"]  # each rank its own log

    assert "teacher: resuming" in one_thread(project, "transfer").stderr
    assert teacher_arrays(project) == teacher_arrays(reference)
    assert sorted(p.name for p in pool_dir.glob("committed*.jsonl")) == ["committed.jsonl"]  # folded by rank 0
    a = load_file(project.root / "output/transfer/student/student.safetensors")
    b = load_file(reference.root / "output/transfer/student/student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accum", [2, 1])
def test_two_processes_make_the_teacher_and_student_of_one(transfer_project, tmp_path, accum):
    """The teacher's and prior's steps split, the same bytes; the student splits each step's micro-steps when
    schedule.grad_accum is a multiple of the processes (the same LoRA to fp32 rounding), else trains on rank 0."""
    project = transfer_project
    project.write_config(schedule={"grad_accum": accum})
    reference = imported_teacher_and_reference(project, tmp_path)
    two = torchrun(project, workflow="transfer")
    assert two.returncode == 0, two.stderr[-3000:]
    assert teacher_arrays(project) == teacher_arrays(reference)
    assert teacher_arrays(project, "prior") == teacher_arrays(reference, "prior")  # the prior splits its steps too
    for stage in ("teacher", "prior"):  # each process loads the whole model: one at a time (dist.in_turn)
        assert f"{stage}: the 2 processes of this node load the model one after another" in two.stderr
    keys = {s["name"]: s["key"] for s in json.loads(two.stdout)["stages"]}
    assert project.manifests("teacher")[0].parent.name == keys["teacher"]
    a = load_file(project.root / "output/transfer/student/student.safetensors")
    b = load_file(reference.root / "output/transfer/student/student.safetensors")
    if accum == 2:  # each rank one micro-step of every step; the gradients averaged
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
        assert "trains on process 0 alone" not in two.stderr and "train on process 0 alone" not in two.stderr
    else:
        assert all(torch.equal(a[k], b[k]) for k in a)  # rank 0 alone: the 1-process bytes
        assert "student: schedule.grad_accum = 1 is not a multiple of the 2 processes" in two.stderr
        # said once, before the teacher runs, while changing schedule.grad_accum costs nothing yet
        warning = "warning: student: schedule.grad_accum = 1 is not a multiple of the 2 processes, so the student will"
        assert two.stderr.count(warning) == 1
        assert two.stderr.index(warning) < two.stderr.index("teacher: the 2 processes of this node load")


def test_bf16_under_two_processes_previews_measures_and_predicts_the_prior_under_autocast(transfer_project):
    """With mixed_precision = bf16 the frozen base is stored in bf16; several processes do not hand the denoiser to
    accelerate (which would wrap its forward in autocast), so the previews, the student's fidelity and its
    on-the-fly prior enter the training's autocast themselves."""
    project = transfer_project
    project.write_config(
        schedule={"grad_accum": 2}, **{"runtime.preview": {"every": 3, "width": 32, "height": 32, "steps": 2}}
    )
    sets = ["lora1.mixed_precision='bf16'", "student.mixed_precision='bf16'", "student.prior='on_the_fly'"]
    two = torchrun(project, *[a for s in sets for a in ("--set", s)], workflow="transfer")
    assert two.returncode == 0, two.stderr[-3000:]
    for stage in ("lora1", "student"):
        assert sorted(p.name for p in (project.root / "output/transfer" / stage / "previews").iterdir()) == [
            "step000003.png",
            "step000006.png",
        ]
    student = json.loads(project.manifests("student")[0].read_text())["record"]
    assert student["fidelity"]["curve"] and all(math.isfinite(c["cosine"]) for c in student["fidelity"]["curve"])


def two_nodes(project: Project, tmp_path: Path, per_node: int = 1, env: dict | None = None) -> list[tuple[str, str]]:
    """Two torchrun "nodes" (their own launchers, `per_node` processes each) that reach the project through two
    paths to the same folder, as two hosts mounting one shared filesystem -> each launcher's (stdout, stderr)."""
    mount = tmp_path / "node1-mount"
    mount.symlink_to(project.root, target_is_directory=True)
    port = str(free_port())
    procs = []
    for node, root in ((0, project.root), (1, mount)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(per_node)]
        cmd += ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port]
        cmd += ["-m", "cli", "run", "lora", "-c", str(root / "pipeline.toml"), "--json"]
        environ = {**os.environ, **ONE_THREAD, **launch_temp(project), **(env or {})}
        procs.append(
            subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
        )
    outs = [p.communicate(timeout=SUBPROCESS_TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    return outs


def test_two_nodes_with_two_mounts_of_one_store_train_as_one_node(project, tmp_path):
    """Two nodes of one process each: rank 0 alone writes; the LoRA is the one of one node's 2 processes."""
    outs = two_nodes(project, tmp_path)
    report = json.loads(outs[0][0])  # node 0's rank 0 reports; node 1 prints nothing on stdout
    assert outs[1][0] == "" and [s["action"] for s in report["stages"]] == ["ran"] * 4
    single = copy_of(project, tmp_path / "single-node")
    assert torchrun(single).returncode == 0
    a, b = lora(project), lora(single)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("FSDP_SHARDING_STRATEGY", "HALF_SHARD", "fsdp_sharding_strategy is 'HALF_SHARD'"),
        ("FSDP_AUTO_WRAP_POLICY", "LAYER_WRAP", "fsdp_auto_wrap_policy is 'LAYER_WRAP'"),
        ("FSDP_MIN_NUM_PARAMS", "1e6", "fsdp_min_num_params is '1e6'"),
    ],
)
def test_an_fsdp_setting_this_project_cannot_apply_is_a_config_error(project, monkeypatch, variable, value, named):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv(variable, value)
    result = project.cli("run", "lora")
    assert result.exit_code == 2 and named in result.output and "Traceback" not in result.output
    assert not project.manifests("caption")


FSDP_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "accelerate-fsdp.yaml"
DEEPSPEED_CONFIG = FSDP_CONFIG.with_name("accelerate-deepspeed.yaml")


def launch_with(project: Project, config, *args: str, env: dict | None = None, workflow: str = "lora"):
    """`accelerate launch --config_file <config> -m cli run <workflow> ...` in the project."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd = [*launcher, "--main_process_port", str(free_port()), "-m", "cli", "run", workflow, "-c", str(project.config)]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **launch_temp(project), **(env or {})}
    try:
        return subprocess.run(
            [*cmd, "--json", *args],
            cwd=project.root,
            capture_output=True,
            text=True,
            env=environ,
            timeout=SUBPROCESS_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"time-out: accelerate launch ran for over {SUBPROCESS_TIMEOUT} s (a hang?)")


def example_config(project: Project, example: Path, name: str, **lines) -> Path:
    """The example accelerate config with the given lines of its nested section put in (`zero_stage=2`)."""
    text = example.read_text()
    for key, value in lines.items():
        text, found = re.subn(rf"^  {key}: .*$", f"  {key}: {value}", text, flags=re.MULTILINE)
        assert found == 1, f"{example.name} has no {key} line"
    config = project.root / name
    config.write_text(text)
    return config


def accelerate_launch(
    project: Project, strategy: str, *args: str, env: dict | None = None, workflow: str = "lora", **fsdp_config
):
    """`accelerate launch --config_file fsdp.yaml -m cli run ...` with examples/accelerate-fsdp.yaml, its
    fsdp_sharding_strategy and any other fsdp_config line given (`fsdp_activation_checkpointing="true"`) put in."""
    lines = {"fsdp_sharding_strategy": strategy, **fsdp_config}
    config = example_config(project, FSDP_CONFIG, f"fsdp-{strategy}.yaml", **lines)
    return launch_with(project, config, *args, env=env, workflow=workflow)


@pytest.mark.parametrize(("strategy", "in_turn"), [("FULL_SHARD", "true"), ("HYBRID_SHARD", "false")])
def test_fsdp_shards_the_base_model_and_trains_the_lora_of_one_process(project, tmp_path, strategy, in_turn):
    """An accelerate FSDP config (the model's transformer blocks as units): each process keeps half the UNet's
    weights (HYBRID_SHARD: shards within the node, of 2 processes here), every process renders the previews'
    forwards, and the LoRA is the 1-process one with twice the accumulation, as without FSDP; whether the processes
    load the model in turn (fsdp_cpu_ram_efficient_loading) or at once."""
    project.write_config(**{"runtime.preview": {"every": 3, "width": 64, "height": 64, "steps": 2}})
    fsdp = accelerate_launch(project, strategy, fsdp_cpu_ram_efficient_loading=in_turn)
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    assert f"lora1: FSDP {strategy} over 2 processes" in fsdp.stderr
    record = json.loads(project.manifests("lora1")[0].read_text())["record"]["fsdp"]
    assert record["processes"] == 2 and "BasicTransformerBlock" in record["classes"] and record["units"] > 4
    assert any("one after another" in note for note in record["notes"]) == (in_turn == "true")
    said = "lora1: the 2 processes of this node load the model one after another" in fsdp.stderr
    assert said == (in_turn == "true")  # said before rank 0 waits through the others' turns
    assert record["local_bytes"] <= 0.55 * record["base_bytes"]  # half, and the padding of odd shapes
    previews = sorted(p.name for p in (project.root / "output/lora/lora1/previews").iterdir())
    assert previews == ["step000003.png", "step000006.png"]

    assert_same_lora(project, one_process(project, tmp_path, accum=2))


def test_a_run_killed_under_fsdp_resumes_from_its_checkpoint_with_or_without_fsdp(project, tmp_path):
    """The checkpoint of an FSDP run is a whole LoRA and its optimizer, as without FSDP: a run killed at step 3
    resumes under SHARD_GRAD_OP, or under plain torchrun, to the LoRA of an uninterrupted FSDP run (with the
    config's activation checkpointing, which recomputes the same forwards)."""
    checkpointing = {"fsdp_activation_checkpointing": "true"}
    whole = copy_of(project, tmp_path / "whole")
    first = accelerate_launch(whole, "SHARD_GRAD_OP", **checkpointing)
    assert first.returncode == 0 and "; activation checkpointing" in first.stderr, first.stderr[-3000:]

    killed = accelerate_launch(project, "SHARD_GRAD_OP", env={"LORA_PIPELINE_FAULT": "lora1.step:3@1"}, **checkpointing)
    assert killed.returncode != 0 and not project.manifests("lora1")
    for resume in ("fsdp", "torchrun"):
        run = copy_of(project, tmp_path / resume)
        shutil.copytree(project.store, run.store)  # the killed run's store, checkpoint included
        resumed = accelerate_launch(run, "SHARD_GRAD_OP", **checkpointing) if resume == "fsdp" else torchrun(run)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming from the checkpoint at step 2/6" in resumed.stderr
        a, b = lora(run), lora(whole)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_fsdp_trains_the_student_of_one_process_and_measures_its_fidelity_on_every_process(transfer_project, tmp_path):
    """The student under FSDP: each rank one micro-step of every schedule step, the held-out fidelity's forwards
    run on both processes (rank 0 records them): the student and its fidelity curve of a 1-process run."""
    project = transfer_project
    project.write_config(schedule={"grad_accum": 2})
    reference = imported_teacher_and_reference(project, tmp_path)
    fsdp = accelerate_launch(project, "FULL_SHARD", workflow="transfer")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "student: FSDP FULL_SHARD over 2 processes" in fsdp.stderr
    assert teacher_arrays(project) == teacher_arrays(reference)
    assert_the_student_of(reference, project)


def test_fsdp_trains_lora2_over_a_frozen_lora1_as_two_plain_processes_do(differential_project, tmp_path):
    """Differential LoRA under FSDP: LoRA-1 of each pair, then LoRA-2 over it as a frozen adapter (sharded with
    the base weights): the LoRA-2 files of a torchrun run without FSDP."""
    project = differential_project
    shutil.copytree(project.root / "model", tmp_path / "plain" / "model")
    shutil.copytree(project.root / "pairs", tmp_path / "plain" / "pairs")
    plain = Project(tmp_path / "plain", json.loads(json.dumps(project.settings)))
    fsdp = accelerate_launch(project, "FULL_SHARD", workflow="differential")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "lora2.red-circle: FSDP FULL_SHARD" in fsdp.stderr
    assert torchrun(plain, workflow="differential").returncode == 0
    files = sorted((project.root / "output/differential").rglob("lora2*.safetensors"))
    assert len(files) == 3  # each pair's LoRA-2 and their average
    # FSDP's backward hooks sum a few gradients in another order (1e-11 apart, measured), which Adam's step, the
    # same size for a tiny gradient as for a large one, carries to ~3e-5 over LoRA-1's and LoRA-2's 8 steps at
    # lr 5e-3; a LoRA-2 trained over anything else moves by the order of lr x steps
    for path in files:
        a, b = load_file(path), load_file(plain.root / path.relative_to(project.root))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_fsdp_keeps_every_trained_parameter_whole_text_encoder_dora_prodigy_and_ema(project, tmp_path):
    """What trains beside the LoRA stays out of the shards: a text encoder's LoRA, DoRA's magnitudes, Prodigy's
    global sums over all parameters and the EMA give the files of two plain processes (with the mid block's
    weights kept whole too: fsdp_ignored_modules)."""
    sets = ["lora1.train_text_encoder=true", "lora1.network=dora", "lora1.optimizer=prodigy", "lora1.lr=1.0"]
    args = [a for s in [*sets, "lora1.ema_decay=0.9"] for a in ("--set", s)]
    fsdp = accelerate_launch(project, "FULL_SHARD", *args, env={"FSDP_IGNORED_MODULES": "^mid_block$"})
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "; fsdp_ignored_modules keeps whole: 1 modules" in fsdp.stderr
    plain = copy_of(project, tmp_path / "plain")
    assert torchrun(plain, *args).returncode == 0
    for name in ("lora1.safetensors", "lora1-ema.safetensors"):
        a = load_file(project.root / "output/lora/lora1" / name)
        b = load_file(plain.root / "output/lora/lora1" / name)
        assert any(k.startswith("lora_te_") for k in a) and any(k.endswith(".dora_scale") for k in a)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_hybrid_fsdp_over_two_nodes_shards_within_each_and_trains_the_lora_of_one_process(project, tmp_path):
    """HYBRID_SHARD over two nodes of two processes (the environment accelerate's config gives): each node's two
    processes share the model's weights, the nodes hold one copy each; the LoRA of one process with grad_accum 4."""
    hybrid = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}
    outs = two_nodes(project, tmp_path, per_node=2, env=hybrid)
    assert "lora1: FSDP HYBRID_SHARD over 4 processes" in outs[0][1]
    record = json.loads(project.manifests("lora1")[0].read_text())["record"]["fsdp"]
    assert record["processes"] == 4 and record["local_bytes"] <= 0.55 * record["base_bytes"]  # halves, not quarters
    assert record["local_bytes"] >= 0.45 * record["base_bytes"]
    assert_same_lora(project, one_process(project, tmp_path, accum=4))


def test_run_with_processes_starts_them_itself_and_a_killed_one_is_named_without_a_traceback(project, tmp_path):
    """`pipeline run lora --processes 2`: the launcher built in (torch's, as torchrun starts them), the LoRA of one
    process with twice the accumulation; a process killed by a signal is named by the command, which prints no
    launcher traceback, and the same command resumes. The launches leave nothing in the temp folder (torch's
    launcher, left to itself, leaves a torchelastic_* folder there per run)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    two = project.subprocess(
        "run", "lora", "-c", str(project.config), "--processes", "2", "--json", env={"TMPDIR": str(temp)}
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert list(temp.iterdir()) == []
    assert [s["action"] for s in json.loads(two.stdout)["stages"]] == ["ran"] * 4  # one report: rank 0's
    assert json.loads(project.manifests("lora1")[0].read_text())["preimage"]["params"]["processes"] == 2
    assert_same_lora(project, one_process(project, tmp_path, accum=2))

    args = ["run", "lora", "-c", str(project.config), "--processes", "2", "--set", "lora1.steps=8"]
    killed = project.subprocess(*args, env={"LORA_PIPELINE_FAULT": "lora1.step:5@1", "TMPDIR": str(temp)})
    assert killed.returncode == 1
    assert "error: process 1 of 2 was stopped by SIGKILL" in killed.stderr
    assert "Traceback" not in killed.stderr and "ChildFailedError" not in killed.stderr, killed.stderr
    assert list(temp.iterdir()) == []
    resumed = project.subprocess(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at step 4/8" in resumed.stderr


IN_TURN = """
import sys, time
from pathlib import Path
from core import dist

dist.init()
log, r = Path(sys.argv[1]), dist.rank()
with dist.in_turn():
    with log.open("a") as f:
        f.write(f"start {r}\\n")
    time.sleep(2)  # were process 1 let in during 0's turn, or 0 let out during 1's, the order below would show it
    with log.open("a") as f:
        f.write(f"end {r}\\n")
with log.open("a") as f:
    f.write(f"after {r}\\n")
"""


def test_the_processes_of_a_node_load_in_turn(tmp_path):
    """dist.in_turn (fsdp_cpu_ram_efficient_loading): process 1 starts its block only after process 0 ended its,
    and both leave it when the last turn has ended."""
    from conftest import REPO

    script, log = tmp_path / "in_turn.py", tmp_path / "log.txt"
    script.write_text(IN_TURN)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, *launcher, str(free_port()), str(script), str(log)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = log.read_text().split("\n")[:-1]
    assert lines[:4] == ["start 0", "end 0", "start 1", "end 1"] and sorted(lines[4:]) == ["after 0", "after 1"]


def deepspeed_launch(project: Project, stage: int, *args: str, env: dict | None = None, workflow: str = "lora"):
    """`accelerate launch` with examples/accelerate-deepspeed.yaml at ZeRO stage `stage`."""
    config = example_config(project, DEEPSPEED_CONFIG, f"zero{stage}.yaml", zero_stage=stage)
    return launch_with(project, config, *args, env=env, workflow=workflow)


def test_deepspeed_zero3_shards_the_base_model_and_trains_the_lora_of_one_process(project, tmp_path):
    """examples/accelerate-deepspeed.yaml (ZeRO-3) on 2 CPU processes: each keeps about half the UNet's weights,
    every process renders the previews' forwards, and the LoRA, losses and clipped gradient norms are the 1-process
    run's with twice the accumulation; a run killed after its checkpoint resumes from every process's piece of the
    optimizer state to the same LoRA."""
    project.write_config(
        lora1={"max_grad_norm": 0.05, "ema_decay": 0.9},
        **{"runtime.preview": {"every": 3, "width": 64, "height": 64, "steps": 2}},
    )
    killed = deepspeed_launch(project, 3, env={"LORA_PIPELINE_FAULT": "lora1.step:3@1"})
    assert killed.returncode != 0 and not project.manifests("lora1"), killed.stderr[-3000:]
    work = next((project.store / "stages" / "lora1").glob("*/work"))
    assert sorted(p.name for p in (work / "ckpt-0000002" / "zero" / "state").iterdir())  # each process's piece
    resumed = deepspeed_launch(project, 3)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from the checkpoint at step 2/6" in resumed.stderr
    assert "lora1: DeepSpeed ZeRO-3 over 2 processes" in resumed.stderr
    # stdout: rank 0's report alone, after the launcher's own line (accelerate imports DeepSpeed, which logs the
    # accelerator it found to stdout)
    launcher, report = resumed.stdout.split("\n{", 1)
    assert all("real_accelerator.py" in line for line in launcher.splitlines())
    assert [s["action"] for s in json.loads("{" + report)["stages"]][-1] == "ran"
    record = json.loads(project.manifests("lora1")[0].read_text())["record"]["deepspeed"]
    assert record["stage"] == 3 and record["processes"] == 2
    assert record["local_bytes"] <= 0.6 * record["base_bytes"]  # half, and the small weights every process keeps
    previews = sorted(p.name for p in (project.root / "output/lora/lora1/previews").iterdir())
    assert previews == ["step000003.png", "step000006.png"]

    one = one_process(project, tmp_path, accum=2)
    assert_same_lora(project, one, "lora1.safetensors", "lora1-ema.safetensors")  # the EMA, too
    figures = [line.split(",")[1:3] for line in (project.root / "output/lora/lora1/loss.csv").read_text().splitlines()]
    assert figures == [
        line.split(",")[1:3] for line in (one.root / "output/lora/lora1/loss.csv").read_text().splitlines()
    ]


def test_a_zero2_checkpoint_resumes_under_zero2_alone_and_another_launch_is_told_why(project, tmp_path):
    """ZeRO-2 keeps the base model whole on every process and splits the LoRA's optimizer state: a run killed after
    its checkpoint is refused, by name, by a plain 2-process launch (the checkpoint's optimizer state is in pieces),
    and resumes under ZeRO-2 to the LoRA of a 1-process run with twice the accumulation."""
    killed = deepspeed_launch(project, 2, env={"LORA_PIPELINE_FAULT": "lora1.step:3@1"})
    assert killed.returncode != 0 and not project.manifests("lora1")
    plain = torchrun(project)
    assert plain.returncode != 0 and not project.manifests("lora1")
    assert "was written under DeepSpeed ZeRO-2 on 2 processes, and this run is without DeepSpeed" in plain.stderr
    assert "loop.py" not in plain.stderr  # a message, not a traceback of ours (torchrun prints its own below it)
    resumed = deepspeed_launch(project, 2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from the checkpoint at step 2/6" in resumed.stderr
    record = json.loads(project.manifests("lora1")[0].read_text())["record"]["deepspeed"]
    assert record["stage"] == 2 and record["local_bytes"] == record["base_bytes"] > 0

    assert_same_lora(project, one_process(project, tmp_path, accum=2))


def test_deepspeed_zero2_trains_the_student_of_one_process(transfer_project, tmp_path):
    """The student under ZeRO-2: each rank one micro-step of every schedule step (DeepSpeed accumulates one per
    process, and averages), rank 0 measures the fidelity with its whole model: the student and its fidelity curve of
    a 1-process run."""
    project = transfer_project
    project.write_config(schedule={"grad_accum": 2})
    reference = imported_teacher_and_reference(project, tmp_path)
    zero = deepspeed_launch(project, 2, workflow="transfer")
    assert zero.returncode == 0, zero.stderr[-3000:]
    assert "student: DeepSpeed ZeRO-2 over 2 processes" in zero.stderr
    assert_the_student_of(reference, project)
