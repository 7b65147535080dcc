"""Two processes against one (torchrun, gloo, the CPU): what the multi-process protocol costs.

On the demo project (tiny SD 1.5-shaped model), `pipeline run transfer` with lora1 at `--steps` optimizer steps
  a) in one process with lora1.grad_accum = 2, and
  b) in two processes (torchrun --nproc_per_node 2) with grad_accum = 1: the same global batch, the same LoRA;
each in a fresh store, alternated `--repeats` times. It prints the seconds of the sharded stages (latents and
text: batches; lora1: micro-steps; teacher and prior: schedule steps) and the wall time of the whole command for
both, and their ratios (b / a). On 2 cores two processes share the cores one process's threads had, so ≈1x is the
expectation; the point is the protocol's overhead (planning on every rank, barriers, the gradient all-reduce,
per-rank pool logs), not a speed-up.

    .venv/bin/python benchmarks/distributed.py [--steps 60] [--repeats 3]
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


def run(config: Path, steps: int, processes: int) -> tuple[dict[str, float], float]:
    """({sharded stage: seconds}, wall seconds) of one fresh `pipeline run transfer`."""
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
    cli = ["-m", "cli", "run", "transfer", "-c", str(config), "--json", *sets]
    if processes == 1:
        cmd = [sys.executable, *cli]
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
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if not line.startswith(("[rank0]:   ", "[rank1]:   "))]
        sys.exit(f"run failed ({processes} processes):\n" + "\n".join(lines[-60:]))
    stages = {s["name"]: s["seconds"] for s in json.loads(out.stdout)["stages"]}
    return {name: stages[name] for name in SHARDED}, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from pipeline.demo import ensure_demo

    with tempfile.TemporaryDirectory() as tmp:
        config = ensure_demo(Path(tmp) / "demo")
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
