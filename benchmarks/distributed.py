"""Two processes against one (torchrun, gloo, the CPU): what the multi-process protocol costs.

On the demo project (tiny SD 1.5-shaped model), `pipeline run transfer` with lora1 at `--steps` optimizer steps
  a) in one process with lora1.grad_accum = 2, and
  b) in two processes (torchrun --nproc_per_node 2) with grad_accum = 1: the same global batch, the same LoRA;
each in a fresh store, alternated `--repeats` times. It prints the seconds of the sharded stages (latents and
text: batches; lora1: micro-steps; teacher and prior: schedule steps) and the wall time of the whole command for
both, and their ratios (b / a). On 2 cores two processes share the cores one process's threads had, so ≈1x is the
expectation; the point is the protocol's overhead (planning on every rank, barriers, the gradient all-reduce,
per-rank pool logs), not a speed-up.

With --fsdp it compares, on `pipeline run lora`, two plain processes (torchrun) with two under an accelerate FSDP
config (FULL_SHARD and SHARD_GRAD_OP, `accelerate launch`): lora1's seconds (ratio to the plain run) and the bytes
of the base model each process keeps (the artifact's record), the saving FSDP is for.

With --loading it measures what fsdp_cpu_ram_efficient_loading is for: the demo's UNet replaced by one of SD 1.5's
size (random weights, `--width 320`: 841M parameters, saved in bf16 as checkpoints are, loaded in fp32: 3.1 GiB),
`pipeline run lora` under FSDP FULL_SHARD on two processes, the processes loading the model at once and in turn;
it prints the peak of the machine's memory in use above what it was before the command (sampled every 20 ms; the
page cache left out) and lora1's seconds.

With --zero it compares, on `pipeline run lora`, two plain processes (torchrun) with two under DeepSpeed ZeRO-2 and
ZeRO-3 (`accelerate launch`, examples/accelerate-deepspeed.yaml's settings): lora1's seconds (ratio to the plain
run), the bytes of the base model each process keeps (the artifact's record) and the peak memory in use of the
whole command; `--width N` replaces the demo's UNet with an SD 1.5-shaped one as --loading does.

    .venv/bin/python benchmarks/distributed.py [--steps 60] [--repeats 3] [--fsdp | --loading [--width 320] |
                                               --zero [--width 0]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHARDED = ("latents", "text", "lora1", "teacher", "prior")


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_sharding_strategy: {strategy}
  fsdp_cpu_ram_efficient_loading: {in_turn}
  fsdp_sync_module_states: true
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: false
"""

ZERO_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: {stage}
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: false
"""


def run(
    config: Path,
    steps: int,
    processes: int,
    workflow: str = "transfer",
    fsdp: str = "",
    in_turn: bool = False,
    memory: list | None = None,
    zero: int = 0,
) -> tuple[dict[str, float], float, dict]:
    """({sharded stage: seconds}, wall seconds, lora1's record) of one fresh `pipeline run <workflow>`; fsdp: an
    accelerate FSDP config's sharding strategy (2 processes under `accelerate launch`), in_turn its
    fsdp_cpu_ram_efficient_loading; zero: a DeepSpeed ZeRO stage instead. `memory` gets the peaks of memory in use
    while lora1 loads and in the whole command (watch_memory)."""
    shutil.rmtree(config.parent / ".pipeline", ignore_errors=True)
    shutil.rmtree(config.parent / "output", ignore_errors=True)
    sets = [
        "--set",
        f"lora1.steps={steps}",
        "--set",
        f"lora1.grad_accum={2 // processes}",
        "--set",
        "runtime.preview.every=0",
        "--no-progress",
    ]
    cli = ["-m", "cli", "run", workflow, "-c", str(config), "--json", *sets]
    if processes == 1:
        cmd = [sys.executable, *cli]
    elif fsdp or zero:
        accelerate_config = config.parent / (f"fsdp-{fsdp}.yaml" if fsdp else f"zero{zero}.yaml")
        text = FSDP_CONFIG.format(strategy=fsdp, in_turn=str(in_turn).lower()) if fsdp else ZERO_CONFIG
        accelerate_config.write_text(text.format(stage=zero) if zero else text)
        launch = ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
        cmd = [sys.executable, *launch, "--main_process_port", str(free_port()), *cli]
    else:
        port = str(free_port())
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            *cli,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
    import psutil

    before = psutil.virtual_memory().used
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=stderr, text=True, env=env)
        peak = watch_memory(proc, before, stderr)
        wall = time.perf_counter() - started
        stdout.seek(0), stderr.seek(0)
        out = subprocess.CompletedProcess(cmd, proc.returncode, stdout.read(), stderr.read())
    if memory is not None:
        memory.append(peak)
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if not line.startswith(("[rank0]:   ", "[rank1]:   "))]
        sys.exit(f"run failed ({processes} processes):\n" + "\n".join(lines[-60:]))
    report = out.stdout[out.stdout.index("{") :]  # (under DeepSpeed the launcher logs a line first)
    stages = {s["name"]: s["seconds"] for s in json.loads(report)["stages"]}
    manifest = next((config.parent / ".pipeline" / "stages" / "lora1").glob("*/manifest.json"))
    record = json.loads(manifest.read_text())["record"]
    return {name: stages[name] for name in SHARDED if name in stages}, wall, record


def watch_memory(proc, before: int, stderr) -> tuple[int, int]:
    """Wait for `proc`, sampling the machine's memory in use (psutil's `used`: not the page cache, which the
    processes' mappings of one model file share and the system can drop) -> the peaks above `before` (bytes) while
    lora1 loads its model (up to its FSDP line, which rank 0 prints when every process has sharded its model) and
    in the whole command."""
    import psutil

    loading = peak = 0
    loaded = False
    while proc.poll() is None:
        used = psutil.virtual_memory().used - before
        peak = max(peak, used)
        if not loaded:
            stderr.seek(0)
            said = stderr.read()
            loaded = "lora1: FSDP" in said or "lora1: DeepSpeed" in said
            loading = used if loaded else max(loading, used)
        time.sleep(0.02)
    return loading, peak


def bigger_unet(config: Path, width: int) -> int:
    """Replace the demo's UNet with one of SD 1.5's layout at `width` channels (random weights) -> parameters."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = config.parent / "models" / "tiny-sd15" / "unet"
    tiny = UNet2DConditionModel.load_config(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=tiny["in_channels"],
        out_channels=tiny["out_channels"],
        cross_attention_dim=tiny["cross_attention_dim"],
        block_out_channels=(width, width * 2, width * 4, width * 4),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=tiny["sample_size"],
    )
    shutil.rmtree(folder)
    unet.to(torch.bfloat16).save_pretrained(folder)  # as checkpoints ship; the training stages load it in fp32
    return sum(p.numel() for p in unet.parameters())


def compare_loading(config: Path, steps: int, repeats: int, width: int) -> None:
    """Peak memory of the run's processes together, FSDP FULL_SHARD on 2, loading at once against in turn."""
    params = bigger_unet(config, width)
    size = f"{params / 1e6:.0f}M parameters ({params * 4 / 2**30:.2f} GiB in fp32; bf16 on disk)"
    print(f"UNet of {size}, lora1 {steps} steps")
    peaks: dict[bool, list] = {False: [], True: []}
    seconds: dict[bool, list] = {False: [], True: []}
    for _ in range(repeats):
        for in_turn in (False, True):
            stages, _, _ = run(config, steps, 2, "lora", "FULL_SHARD", in_turn, peaks[in_turn])
            seconds[in_turn].append(stages["lora1"])
    gib = 2**30
    for in_turn in (False, True):
        print(
            f"{'in turn' if in_turn else 'at once'}: peak memory in use while loading "
            f"{[round(p[0] / gib, 2) for p in peaks[in_turn]]} GiB, in the whole command "
            f"{[round(p[1] / gib, 2) for p in peaks[in_turn]]} GiB, lora1 {[round(s, 1) for s in seconds[in_turn]]} s"
        )
    for i, phase in enumerate(("while loading", "in the whole command")):
        at_once, in_turn = (statistics.median(p[i] for p in peaks[t]) for t in (False, True))
        print(f"in turn / at once, peak {phase}: {in_turn / at_once:.3f} ({(at_once - in_turn) / gib:.2f} GiB less)")
    ratio = statistics.median(seconds[True]) / statistics.median(seconds[False])
    print(f"in turn / at once, lora1 seconds: {ratio:.3f}")


def compare_zero(config: Path, steps: int, repeats: int, width: int) -> None:
    """lora1 on two plain processes against two under ZeRO-2 and ZeRO-3: seconds, the base model's bytes per
    process and the peak memory in use of the whole command."""
    if width:
        params = bigger_unet(config, width)
        print(f"UNet of {params / 1e6:.0f}M parameters ({params * 4 / 2**30:.2f} GiB in fp32), lora1 {steps} steps")
    stages = (0, 2, 3)
    results: dict[int, list] = {s: [] for s in stages}
    peaks: dict[int, list] = {s: [] for s in stages}
    for _ in range(repeats):
        for stage in stages:
            results[stage].append(run(config, steps, 2, "lora", memory=peaks[stage], zero=stage))
    gib = 2**30
    plain = statistics.median(r[0]["lora1"] for r in results[0])
    plain_peak = statistics.median(p[1] for p in peaks[0])
    print(
        f"2 processes, no DeepSpeed: lora1 {[round(r[0]['lora1'], 2) for r in results[0]]} s, peak memory in use "
        f"{[round(p[1] / gib, 2) for p in peaks[0]]} GiB"
    )
    for stage in stages[1:]:
        seconds = statistics.median(r[0]["lora1"] for r in results[stage])
        record = results[stage][0][2]["deepspeed"]
        peak = statistics.median(p[1] for p in peaks[stage])
        print(
            f"ZeRO-{stage}: lora1 {[round(r[0]['lora1'], 2) for r in results[stage]]} s, {seconds / plain:.3f} x the "
            f"plain run; base model per process {record['local_bytes'] / 2**20:.2f} of "
            f"{record['base_bytes'] / 2**20:.2f} MiB ({record['local_bytes'] / record['base_bytes']:.3f}); peak memory "
            f"in use {[round(p[1] / gib, 2) for p in peaks[stage]]} GiB, {peak / plain_peak:.3f} x the plain run"
        )


def compare_fsdp(config: Path, steps: int, repeats: int) -> None:
    """lora1 on two plain processes against two under FSDP: seconds and the base model's bytes per process."""
    strategies = ("", "FULL_SHARD", "SHARD_GRAD_OP")
    results: dict[str, list] = {s: [] for s in strategies}
    for _ in range(repeats):
        for strategy in strategies:
            results[strategy].append(run(config, steps, 2, "lora", strategy))
    plain = statistics.median(r[0]["lora1"] for r in results[""])
    print(f"2 processes, no FSDP: lora1 {[round(r[0]['lora1'], 2) for r in results['']]} s")
    for strategy in strategies[1:]:
        seconds = statistics.median(r[0]["lora1"] for r in results[strategy])
        sharding = results[strategy][0][2]["fsdp"]
        print(
            f"FSDP {strategy}: lora1 {[round(r[0]['lora1'], 2) for r in results[strategy]]} s, "
            f"{seconds / plain:.3f} x the plain run; base model per process {sharding['local_bytes'] / 2**20:.2f} "
            f"of {sharding['base_bytes'] / 2**20:.2f} MiB ({sharding['local_bytes'] / sharding['base_bytes']:.3f}), "
            f"{sharding['units']} units"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fsdp", action="store_true", help="compare FSDP with plain processes on lora1")
    ap.add_argument("--loading", action="store_true", help="FSDP's peak memory, loading at once against in turn")
    ap.add_argument("--zero", action="store_true", help="compare DeepSpeed ZeRO-2/3 with plain processes on lora1")
    ap.add_argument(
        "--width", type=int, default=None, help="--loading (320), --zero (0: the demo's): the UNet's first channels"
    )
    args = ap.parse_args()
    from pipeline.demo import ensure_demo

    with tempfile.TemporaryDirectory() as tmp:
        config = ensure_demo(Path(tmp) / "demo")
        if args.loading:
            compare_loading(config, args.steps, args.repeats, 320 if args.width is None else args.width)
            return
        if args.zero:
            compare_zero(config, args.steps, args.repeats, args.width or 0)
            return
        if args.fsdp:
            compare_fsdp(config, args.steps, args.repeats)
            return
        results = {1: [], 2: []}
        for _ in range(args.repeats):
            for processes in (1, 2):
                results[processes].append(run(config, args.steps, processes))
        for processes, rows in results.items():
            print(
                f"{processes} process(es): "
                + ", ".join(f"{name} {[round(r[0][name], 2) for r in rows]} s" for name in SHARDED)
                + f", wall {[round(r[1], 2) for r in rows]} s"
            )
        for name in SHARDED:
            one = statistics.median(r[0][name] for r in results[1])
            two = statistics.median(r[0][name] for r in results[2])
            print(f"{name}: 2 processes / 1 process = {two / one:.3f} ({two:.2f} vs {one:.2f} s)")
        one = statistics.median(r[1] for r in results[1])
        two = statistics.median(r[1] for r in results[2])
        print(f"whole command: {two / one:.3f} ({two:.2f} vs {one:.2f} s)")


if __name__ == "__main__":
    main()
