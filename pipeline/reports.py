"""What the `pipeline` command prints: run tables, the demo epilogues, the eval and inspect reports.

cli.py parses arguments and calls into pipeline/; this module turns results into text (rich tables).
"""

from __future__ import annotations

from pathlib import Path

import typer


def print_runs(runs, dry_run: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    columns = ("stage", "plan", "key", "why") if dry_run else ("stage", "action", "key", "seconds", "output")
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in runs:
        if dry_run:
            table.add_row(r.name, r.action, r.key[:12], "; ".join(r.causes))
        else:
            # a stage without exported files is found in the store by its short key (`pipeline status`, --json)
            where = short(r.location) if r.outputs else f"store: {r.name.split('.')[0]} {r.key[:12]}"
            table.add_row(r.name, r.action, r.key[:12], f"{r.seconds:.1f}", where)
    Console(width=160).print(table)


def short(path: str) -> str:
    """A path relative to the working directory when it is below it."""
    try:
        return str(Path(path).relative_to(Path.cwd())) + ("/" if path.endswith("/") else "")
    except ValueError:
        return path


def demo_epilogue(workflow: str, runs, config: Path, overrides: list[str], family: str = "sd15") -> None:
    demo = "--demo" if family == "sd15" else f"--demo --family {family}"
    if workflow == "differential":
        _differential_epilogue(runs, config, overrides, demo)
    else:
        _epilogue(workflow, runs, config, demo)
    _report_line(workflow, config, overrides)


def run_epilogue(workflow: str, runs, config: Path) -> None:
    """After a run that trained something: the LoRA files it wrote and for which programs, the final loss, and the
    next useful commands. Nothing after a run that reused everything (the table says it all)."""
    trained = [r for r in runs if r.action == "ran" and r.name.split(".")[0] in ("lora1", "lora2", "student")]
    if not trained:
        return
    outputs = [o for r in runs for o in r.outputs]
    typer.echo("")
    for r in trained:
        mine = [o for o in r.outputs if o.endswith(".safetensors")]
        kohya = [o for o in mine if "/diffusers/" not in o and "-ema." not in o and "/steps/" not in o]
        kept = [o for o in mine if "/steps/" in o]
        diffusers = [o for o in mine if "/diffusers/" in o]
        typer.echo(f"{r.name} trained: final {r.summary}" if r.summary.startswith("loss") else f"{r.name} trained")
        for path in kohya:
            typer.echo(f"  {short(path)}  (kohya format: ComfyUI, A1111/Forge, kohya's tools, diffusers)")
        for path in diffusers:
            typer.echo(f"  {short(path)}  (diffusers format: load_lora_weights)")
        if kept:
            typer.echo(f"  and {len(kept)} LoRA(s) of earlier steps in {short(str(Path(kept[0]).parent))}/")
        if not mine:
            typer.echo(f"  its LoRA stays in the store ({r.key[:12]}); the workflow's own output is below")
        if r.replaced:
            kind = r.name.split(".")[0]
            typer.echo(
                f"  the {r.name} it replaces ({r.replaced[:8]}) stays in the store: `pipeline history {kind} -c "
                f"{config}` lists it, `pipeline export {kind} --key {r.replaced[:8]} -c {config}` copies it out"
            )
    average = [o for o in outputs if o.endswith("lora2_average.safetensors")]
    if average:
        typer.echo(f"LoRA-2, the average of the pairs: {short(average[0])}")
    stage = "student" if workflow == "transfer" else ("lora1" if workflow == "lora" else "differential.lora2")
    typer.echo(
        f"Next: pipeline report {workflow} -c {config}   (curves, previews, what changed)\n"
        f"      pipeline run {workflow} -c {config} --set {stage}.lr=...   (re-runs only what that changes)"
    )


def _report_line(workflow: str, config: Path, overrides: list[str]) -> None:
    """Write the run's HTML report (pipeline report) and say where it is."""
    from pipeline.api import open_project, report

    result = report(open_project(config, overrides), workflow)
    typer.echo(
        f"Report: {short(result['path'])}  (one HTML page: stages, curves, pictures; "
        f"`pipeline report {workflow} -c {config} --open` rewrites and opens it)"
    )


def _epilogue(workflow: str, runs, config: Path, demo: str) -> None:
    outputs = [o for r in runs for o in r.outputs]
    final = "student" if workflow == "transfer" else "lora1"
    lora = next((o for o in outputs if o.endswith(f"{final}.safetensors")), None)
    previews = sorted({str(Path(o).parent) for o in outputs if "/previews/" in o})
    typer.echo(f"\nLoRA (single-file format, for ComfyUI and A1111): {short(lora) if lora else 'none'}")
    typer.echo(f"Previews: {', '.join(short(p) for p in previews) or 'none'}")
    if workflow == "transfer":
        student = next(r for r in runs if r.name == "student")
        typer.echo(f"Student: {student.summary or 'reused (see pipeline status transfer)'}")
        typer.echo(
            f"Try: pipeline run transfer {demo} --set student.lr=1e-3   (re-runs the student only)\n"
            f"     pipeline inspect teacher -c {config} --out {short(str(Path(config).parent / 'sheets'))}"
        )
    else:
        typer.echo(f"Try: pipeline status lora -c {config}   or   pipeline run lora {demo} --set lora1.lr=5e-4")


def _differential_epilogue(runs, config: Path, overrides: list[str], demo: str = "--demo") -> None:
    """The eval table, and a grid of base vs base + the averaged LoRA-2 at weights 0, 0.5 and 1."""
    from cache.store import Store
    from pipeline.config_loading import load_config
    from pipeline.lora_tools import sample as render_grid
    from stages.base import PlanEnv

    loaded = load_config(config, overrides)
    env = PlanEnv(loaded, Store(loaded.store_dir))
    print_eval(eval_record(env))
    average = next(o for r in runs for o in r.outputs if o.endswith("lora2_average.safetensors"))
    grid = env.loaded.resolve(env.config.runtime.output_dir) / "differential" / "sample-grid.png"
    prompts = sorted({i["caption"] for i in _eval_captions(env)})[:2]
    model = env.loaded.resolve(env.config.model.path)
    render_grid(model, [average], prompts, 0, grid, 10, 7.5, env.config.latents.resolution, [0, 0.5, 1], env.family)
    typer.echo(f"\nLoRA-2 (average of the pairs, single-file format): {short(average)}")
    typer.echo(f"Sample grid (rows: prompts; columns: LoRA-2 at 0, 0.5, 1): {short(str(grid))}")
    typer.echo(
        f"Try: pipeline eval differential -c {config}   or   pipeline run differential {demo} "
        f"--set differential.paired_noise=true"
    )


def eval_record(env) -> dict:
    from pipeline.inspect import find_artifact

    return find_artifact(env, "differential", "eval").record


def _eval_captions(env) -> list[dict]:
    """The caption tables of every pair side in the differential workflow's last run."""
    out = []
    for name, key in env.store.read_ref("differential").items():
        if name.startswith("caption."):
            manifest = env.store.load_manifest("caption", key)
            out += manifest.record["items"] if manifest else []
    return out


def transfer_fidelity(env, runs) -> dict:
    """The student's fidelity record of a transfer run: the curve, the held-out images, the final values."""
    run = next(r for r in runs if r.name == "student")
    return env.store.load_manifest("student", run.key).record["fidelity"]


def print_transfer_fidelity(fidelity: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    held = fidelity.get("heldout_images") or []
    title = "student fidelity: the learned delta S_L − S against g·Δ of the teacher"
    table = Table(title=title, show_edge=False, pad_edge=False, title_justify="left")
    columns = [("step", "step")]
    if held:
        columns += [("fit_cosine", "fit cos (train images)"), ("fit_rel_error", "fit rel.err")]
    label = "held-out images" if held else "held-out draws"
    columns += [("cosine", f"cos ({label})"), ("rel_error", "rel.err")]
    for _, name in columns:
        table.add_column(name, justify="right")
    for row in fidelity["curve"]:
        table.add_row(*(str(row[k]) if k == "step" else f"{row[k]:.4f}" for k, _ in columns))
    Console(width=160).print(table)
    if held:
        typer.echo(f"held-out images (never in the schedule): {', '.join(held)}")
    else:
        typer.echo("schedule.heldout_images = 0: every figure is measured on the training images (fit only).")


def print_eval(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="differential eval (held-out noise)", show_edge=False, pad_edge=False, title_justify="left")
    cols = ("pair", "A: base", "A: +L1", "B: +L1", "B: +L1+L2", "L2 → B−A", "L2 over L1 → B−A", "avg L2 → B−A")
    for col in cols:
        table.add_column(col)
    for name, r in record["pairs"].items():
        table.add_row(
            name,
            *(f"{r[k]:.4f}" for k in ("loss_a_base", "loss_a_lora1", "loss_b_lora1", "loss_b_lora1_lora2")),
            f"{r['direction_lora2']:.3f}",
            f"{r['direction_lora2_over_lora1']:.3f}",
            f"{r['direction_average']:.3f}",
        )
    Console(width=160).print(table)
    typer.echo(
        "Losses: mean squared denoising error (lower: the model reproduces that image). LoRA-1 should lower A's loss, "
        "LoRA-2 B's on top of LoRA-1. → B−A: cosine between the move of the x0 prediction from a noisy A and z_B − z_A "
        "(> 0: towards B), for LoRA-2 alone, LoRA-2 over LoRA-1, and the pairs' average LoRA-2 alone."
    )


def print_inspect(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)

    def table(title: str, rows: list[dict]) -> None:
        if not rows:
            return
        t = Table(title=title, show_edge=False, pad_edge=False, title_justify="left")
        for col in rows[0]:
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(*(_cell(v) for v in r.values()))
        console.print(t)

    stage = report["stage"]
    if stage == "dataset":
        _print_dataset(report, console, table)
        return
    console.print(f"[bold]{stage}[/bold] {report['key'][:12]}")
    if stage == "teacher":
        console.print(
            f"{report['steps']} steps x {report['rows_per_step']} rows, delta mode {report['delta_mode']}, "
            f"teacher weights {report.get('weights_dtype', 'fp32')} (computed in fp32), "
            f"{report['bytes_per_sample_step']:,.0f} bytes stored per sample-step"
        )
        table("arrays", [{"kind": k, **v} for k, v in report["arrays"].items()])
        table("|delta_cond| per timestep bin", report["bins"])
    elif stage == "schedule":
        spec = report["spec"]
        console.print(
            f"{report['rows']} rows ({spec['steps']} steps x {spec['grad_accum']} x {spec['batch_size']}), "
            f"{report['heldout']} held out, {report['dropped_captions']} dropped captions, seed {spec['seed']}, "
            f"torch {report['torch']}"
        )
        table("timesteps", report["timesteps"])
        table("items drawn", [{"item": k, "rows": v} for k, v in report["items"].items()])
        for s, rows in report["steps"].items():
            table(f"step {s}", rows)
    else:
        console.print(
            f"{report['items']} items ({report['unique']} unique), shape {report['shape']} {report['dtype']}, "
            f"{report['bytes']:,} bytes, {report['nonfinite']} non-finite, scaling factor {report['latent_space']}"
        )
        table("channels", report["channels"])
    for path in report.get("sheets", []):
        console.print(f"sheet: {short(path)}")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_verify(report: dict) -> None:
    """What `pipeline verify` found, one line per difference, then the counts."""
    for d in report["inputs"]["differ"]:
        typer.echo(f"changed  {d['path']} ({d['field']}): its content is not what the last runs used")
    for what in ("objects", "arrays"):
        for path in report[what]["damaged"]:
            typer.echo(f"damaged  {path}: dropped, the next run re-makes it")
    for path in report["objects"]["missing"]:
        typer.echo(f"missing  {path}: the next run re-makes it")
    for what in ("manifests", "refs"):
        for d in report[what]["damaged"]:
            typer.echo(f"damaged  {d['path']} ({d['why']}): the next run rewrites it")
    counts = ", ".join(f"{report[k]['checked']} {k}" for k in ("inputs", "objects", "arrays", "manifests", "refs"))
    typer.echo(f"verified {counts}: " + ("all intact" if report["ok"] else "see above; run your workflow again"))


def _print_dataset(report: dict, console, table) -> None:
    c = report["captions"]
    console.print(f"[bold]dataset[/bold] {report['folder']}: {report['images']} images")
    if report["smallest"]:
        console.print(
            f"smallest {report['smallest']['size']} ({report['smallest']['path']}), largest "
            f"{report['largest']['size']} ({report['largest']['path']})"
        )
    table("formats", [{"format and mode": k, "images": v} for k, v in report["formats"].items()])
    if "buckets" in report:
        table("buckets (latents.buckets)", report["buckets"])
    else:
        table("aspect ratio", [{"width / height": g["group"], "images": g["images"]} for g in report["aspect_ratios"]])
    if report["enlarged"]:
        why = "smaller than their bucket" if "buckets" in report else f"short side below {report['resolution']} px"
        console.print(f"enlarged by the crop ({why}):")
        table("", report["enlarged"])
    if report["over_max_pixels"]:
        console.print("over runtime.max_image_pixels (the caption stage refuses them):")
        table("", report["over_max_pixels"])
    table("unreadable", report["unreadable"])
    if report["multi_frame"]:
        console.print(f"multi-frame files (trained on frame 0): {', '.join(report['multi_frame'][:10])}")
    missing = len(c["missing"])
    fallback = f'default_caption "{c["default_caption"]}"' if c["default_caption"] is not None else "an error"
    if c.get("tag_mode"):  # the tagger writes their captions (or every caption, in replace mode)
        fallback = f"tag.mode = {c['tag_mode']}: the tagger's tags, else {fallback}"
    console.print(
        f"captions: {c['distinct']} distinct; tags per caption {c['tags_min']} / {c['tags_median']:g} / "
        f"{c['tags_max']} (min / median / max); {missing} image(s) without a caption ({fallback})"
    )
    table("most frequent tags", report["top_tags"])
    if report["duplicates"]:
        console.print("duplicates (the same content: encoded once, but each file is a training item, seen more often):")
        table("", [{"files": ", ".join(d)} for d in report["duplicates"]])
    for path in report.get("sheets", []):
        console.print(f"sheet: {path}")
