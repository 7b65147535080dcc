"""Two processes against one (torchrun, gloo, the CPU): what the multi-process protocol costs.

On the demo project (tiny SD 1.5-shaped model), lora1 runs `--steps` optimizer steps
  a) in one process with grad_accum = 2, and
  b) in two processes (torchrun --nproc_per_node 2) with grad_accum = 1: the same global batch, the same LoRA;
each in a fresh store, alternated `--repeats` times. It prints the lora1 stage's seconds (the manifest's) and the
wall time of the whole command for both, and their ratios (b / a). On 2 cores two processes share the cores one
process's threads had, so ≈1x is the expectation; the point is the protocol's overhead (planning on every rank,
barriers, one gradient all-reduce per step), not a speed-up.

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


def run(config: Path, steps: int, processes: int) -> tuple[float, float]:
    """(lora1 seconds, wall seconds) of one fresh `pipeline run lora`."""
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
    cli = ["-m", "cli", "run", "lora", "-c", str(config), "--json", *sets]
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
        sys.exit(f"run failed ({processes} processes):\n{out.stderr[-3000:]}")
    lora1 = next(s for s in json.loads(out.stdout)["stages"] if s["name"] == "lora1")
    return lora1["seconds"], wall


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
                f"{processes} process(es): lora1 {[round(r[0], 2) for r in rows]} s, "
                f"wall {[round(r[1], 2) for r in rows]} s"
            )
        one = [statistics.median(r[i] for r in results[1]) for i in (0, 1)]
        two = [statistics.median(r[i] for r in results[2]) for i in (0, 1)]
        print(
            f"lora1 stage, {args.steps} steps (global batch 2 x 2): 2 processes / 1 process = {two[0] / one[0]:.3f} "
            f"({two[0]:.2f} vs {one[0]:.2f} s; "
            f"{1000 * two[0] / args.steps:.1f} vs {1000 * one[0] / args.steps:.1f} ms/step)"
        )
        print(
            f"whole command (planning, caption/latents/text on rank 0, lora1): {two[1] / one[1]:.3f} "
            f"({two[1]:.2f} vs {one[1]:.2f} s)"
        )


if __name__ == "__main__":
    main()
