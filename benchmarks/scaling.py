"""How the data side grows with the data set: 50 / 500 / 5,000 generated images at 64 px on the tiny SD model.

For each size, one fresh project (the demo's tiny model, the demo's shapes drawn at 64 px with their captions):
- `pipeline run lora` from an empty store, each stage's seconds from its JSON report: latents seconds per image,
  lora1 seconds per step (a fixed 40 steps, so the growth is the data's, not the training's);
- peak RSS of that process (os.wait4);
- the latent pool on disk: bytes, files and folders per image, against the latent bytes themselves, and against
  the layout before chunking (one zarr array per item), written in this run from the same latents (the baseline);
- `pipeline status lora` seconds on the finished project.

With --buckets, a third of the images are stretched to 96x48 (landscape) and a third to 48x96 (portrait), and
latents.buckets = "auto" (32 to 128 px in steps of 16 at resolution 64) sends them to 80x48, 48x80 and 64x64: a pool
array per bucket shape, batches drawn within one bucket.

    .venv/bin/python benchmarks/scaling.py [--sizes 50 500 5000] [--buckets]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STEPS = 40


def tree_counts(path: Path) -> tuple[int, int, int]:
    """(bytes allocated on disk, files, folders) under path: the blocks of every file and folder, as du counts."""
    files = [p for p in path.rglob("*") if p.is_file()]
    folders = [p for p in path.rglob("*") if p.is_dir()]
    return sum(p.stat().st_blocks * 512 for p in [*files, *folders]), len(files), len(folders)


def per_item_layout(latents: dict, folder: Path) -> tuple[int, int, int]:
    """The same latents written as before chunking: one zarr array per item (its chunk is the whole array)."""
    import zarr

    group = zarr.open_group(str(folder), mode="a")
    for name, arr in latents.items():
        z = group.create_array(name=name, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape)
        z[...] = arr
    return tree_counts(folder)


BUCKETS = 'buckets = "auto"\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16\n'


def stretch_some(folder: Path) -> None:
    """Every third image to 96x48 and every third to 48x96 (the rest stay 64x64)."""
    from PIL import Image

    for n, path in enumerate(sorted(folder.glob("*.png"))):
        size = [None, (96, 48), (48, 96)][n % 3]
        if size:
            with Image.open(path) as im:
                im.resize(size, Image.Resampling.BICUBIC).save(path)


def measure(n: int, root: Path, env: dict, buckets: bool = False) -> dict:
    from cache.store import Store
    from pipeline.demo import ensure_demo, write_images

    demo = ensure_demo(root / "demo").parent  # returns its pipeline.toml
    project = root / f"p{n}"
    project.mkdir()
    write_images(project / "images", count=n, size=64, seed=n)
    if buckets:
        stretch_some(project / "images")
    (project / "pipeline.toml").write_text(
        f'[model]\npath = "{demo / "models" / "tiny-sd15"}"\n[latents]\nresolution = 64\n{BUCKETS if buckets else ""}'
        f"[lora1]\nrank = 4\nalpha = 4.0\nsteps = {STEPS}\nbatch_size = 4\n[runtime]\ncheckpoint_every = 0\n"
        "[runtime.preview]\nevery = 0\n"
    )
    cli = [sys.executable, str(REPO / "cli.py")]
    t0 = time.perf_counter()
    with open(root / "out.json", "wb") as out, open(root / "err.txt", "wb") as err:
        proc = subprocess.Popen(
            [*cli, "run", "lora", "-c", "pipeline.toml", "--json", "--no-progress"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{n} images: pipeline run failed:\n{(root / 'err.txt').read_text()[-3000:]}")
    seconds = {s["name"]: s["seconds"] for s in json.loads((root / "out.json").read_text())["stages"]}
    t0 = time.perf_counter()
    subprocess.run([*cli, "status", "lora", "-c", "pipeline.toml", "--json"], cwd=project, env=env, check=True,
                   capture_output=True)  # fmt: skip
    status = time.perf_counter() - t0

    store = Store(project / ".pipeline")
    manifest = next(store.root.glob("stages/latents/*/manifest.json"))
    record = json.loads(manifest.read_text())["record"]
    pool = store.pool(record["pool"])  # bucketed: one array per shape, in the same pool
    names = sorted(pool.committed())
    latents = pool.get_many(names)
    latent_bytes = sum(a.nbytes for a in latents.values())
    chunked = tree_counts(pool.arrays_dir)
    baseline = per_item_layout(latents, root / f"baseline{n}.zarr")
    return {
        "images": n,
        "unique": len(names),
        "latents_s_per_image": seconds["latents"] / n,
        "lora1_s_per_step": seconds["lora1"] / STEPS,
        "run_wall_s": wall,
        "status_s": status,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "latent_bytes": latent_bytes,
        "chunked": chunked,
        "per_item": baseline,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 500, 5000])
    ap.add_argument("--buckets", action="store_true", help="mixed aspect ratios, latents.buckets = auto")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lp-scale-") as tmp:
        for n in args.sizes:
            row = measure(n, Path(tmp), env, args.buckets)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| images | latents s/img | lora1 s/step | run wall s | status s | peak RSS MiB | store B/img (x latent) "
        "| files/img | folders/img | per-item layout B/img (x latent) | its files/img | its folders/img |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        u = r["unique"]
        (cb, cf, cd), (bb, bf, bd) = r["chunked"], r["per_item"]
        lb = r["latent_bytes"]
        print(
            f"| {r['images']} | {r['latents_s_per_image']:.4f} | {r['lora1_s_per_step']:.4f} | {r['run_wall_s']:.1f} "
            f"| {r['status_s']:.2f} | {r['peak_rss_mib']:.0f} | {cb / u:.0f} ({cb / lb:.2f}x) | {cf / u:.3f} "
            f"| {cd / u:.4f} | {bb / u:.0f} ({bb / lb:.2f}x) | {bf / u:.2f} | {bd / u:.2f} |"
        )


if __name__ == "__main__":
    main()
