"""The `pipeline` command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import typer  # noqa: E402

from core.errors import PipelineError  # noqa: E402
from pipeline.cli_common import ConfigOpt, JsonOpt, SetOpt, on_sigterm, quiet_exit, user_errors  # noqa: E402
from pipeline.cli_lora import FamilyOpt, family_for, lora_app  # noqa: E402


def _flag_types_hidden() -> None:
    """typer's rich help prints `<bool>` after every flag (`--version <bool>`), as if it took a value; a flag takes
    none, so its type column stays empty."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)


_flag_types_hidden()

app = typer.Typer(
    help="Staged, content-hashed LoRA training for diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"lora-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Staged, content-hashed LoRA training for diffusion models."""
    import logging

    # accelerate imports deepspeed wherever it is installed, and DeepSpeed then tells every machine without a GPU that
    # it found none, on stdout (where `--json` keeps its one document): noise (the training stages say what runs where)
    logging.getLogger("DeepSpeed").addFilter(_no_cpu_accelerator_notice)


def _no_cpu_accelerator_notice(record) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def _same_command(ctx: typer.Context) -> list[str]:
    """The arguments of the running command without --processes, for the processes `run --processes` starts."""
    params = ctx.params
    args = [ctx.command.name]
    for param in sorted(ctx.command.params, key=lambda p: p.param_type_name != "argument"):
        value = params.get(param.name)
        if param.param_type_name == "argument":
            args.append(str(value))
        elif param.name == "processes" or value is None or value == param.default or value == []:
            continue
        elif param.is_flag:
            args.append(param.opts[0])
        elif param.multiple:
            args += [a for v in value for a in (param.opts[0], str(v))]
        else:
            args += [param.opts[0], str(value)]
    return args


def _env(config: Path, overrides: list[str]):
    from pipeline.api import open_project

    return open_project(config, overrides)


def _progress(env, as_json: bool, hidden: bool = False) -> bool:
    """Pick how long work shows its progress: JSON lines on stderr for --json, a bar on a terminal, a line every
    runtime.progress_every seconds elsewhere (CI, nohup). -> whether to show it at all."""
    from core import progress

    progress.configure("json" if as_json else "auto", env.config.runtime.progress_every)
    return not hidden


@app.command()
@user_errors
def init(
    path: Path = typer.Argument(Path("pipeline.toml"), help="Where to write the example config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    as_json: bool = JsonOpt,
):
    """Write a commented example config with every key at its default."""
    from pipeline.schema_docs import example_config_toml

    if path.exists() and not force:
        raise PipelineError(f"{path} already exists; pass --force to overwrite it.")
    path.write_text(example_config_toml())
    next_step = "set data.images and model.path, then run `pipeline run lora`"
    if as_json:
        typer.echo(json.dumps({"written": str(path), "next": next_step}, indent=1))
    else:
        typer.echo(f"wrote {path}: {next_step}.")


@app.command()
@user_errors
def run(
    ctx: typer.Context,
    workflow: str = typer.Argument(..., help="Workflow to run: lora, transfer or differential."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    only: str = typer.Option(None, "--only", help="Run this one stage on the upstream artifacts that exist."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and why each stage would run; run nothing."),
    demo: bool = typer.Option(
        False, "--demo", help="Use the built-in demo project in ./pipeline-demo (built on first use)."
    ),
    family: str = typer.Option(
        "sd15",
        "--family",
        help="With --demo: the demo's model family, sd15, sdxl, flux1, zimage, flux2 or qwenimage "
        "(./pipeline-demo-<family> for all but sd15).",
    ),
    as_json: bool = JsonOpt,
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Show no progress (bars, lines or, with --json, JSON lines on stderr)."
    ),
    processes: int = typer.Option(
        None,
        "--processes",
        min=1,
        help="Run on this many processes of this machine (one per GPU), as `torchrun --nproc_per_node N` does.",
    ),
    resume: bool = typer.Option(False, "--resume", hidden=True),  # kohya's habit: resuming needs no flag
):
    """Run a workflow: reuse every fresh stage, run the rest, print what happened."""
    from pipeline import reports
    from pipeline.api import run_workflow, workflow_names

    if demo:
        from pipeline.demo import ensure_demo
        from stages.families import FAMILIES

        if workflow not in workflow_names():  # before building anything
            raise PipelineError(f"unknown workflow {workflow!r}. Known workflows: {', '.join(workflow_names())}.")
        if family not in FAMILIES:
            raise PipelineError(f"--family {family!r}: the demo has {', '.join(FAMILIES[:-1])} and {FAMILIES[-1]}.")
        config = ensure_demo(family=family)
    elif family != "sd15":
        raise PipelineError(
            "--family picks the demo's model family; it goes with --demo (set model.family in a config)."
        )
    if resume:
        typer.echo(
            "note: --resume is not needed: every `pipeline run` resumes what an interrupted run left (the last "
            "checkpoint of a training stage, every committed row of the others). Running as usual.",
            err=True,
        )
    from core import dist

    try:
        env = _env(config, set_)  # a config error is said once, before any process starts
        if processes and processes > 1:
            raise typer.Exit(dist.launch(processes, _same_command(ctx)))  # (a --demo is built by now)
        dist.init()  # under torchrun / accelerate launch: join the other processes (docs/distributed.md)
    except PipelineError as e:
        if dist.size() > 1 and not dist.is_main():  # every rank read the same config and launcher: rank 0 says it
            raise typer.Exit(e.exit_code) from None
        raise
    runs = run_workflow(env, workflow, only=only, dry_run=dry_run, progress=_progress(env, as_json, no_progress))
    if not dist.is_main():  # rank 0 reports
        return
    if as_json:
        typer.echo(
            json.dumps({"workflow": workflow, "dry_run": dry_run, "stages": [r.__dict__ for r in runs]}, indent=1)
        )
        return
    reports.print_runs(runs, dry_run)
    if demo and not dry_run and not only:  # the epilogue reads the whole workflow's outputs
        reports.demo_epilogue(workflow, runs, config, set_, family)
    elif not dry_run:
        reports.run_epilogue(workflow, runs, config)


@app.command("eval")
@user_errors
def eval_(
    workflow: str = typer.Argument("differential", help="The workflow to evaluate: differential or transfer."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    as_json: bool = JsonOpt,
):
    """Print the eval table of a differential run, or the student's fidelity of a transfer run (fit on the
    training images and fidelity on the held-out ones); runs what is stale first."""
    from pipeline import reports
    from pipeline.api import run_workflow

    if workflow not in ("differential", "transfer"):
        raise PipelineError(f"eval {workflow!r}: choose differential or transfer.")
    env = _env(config, set_)
    runs = run_workflow(env, workflow, progress=_progress(env, as_json))
    if workflow == "transfer":
        fidelity = reports.transfer_fidelity(env, runs)
        if as_json:
            typer.echo(json.dumps(fidelity, indent=1))
        else:
            reports.print_transfer_fidelity(fidelity)
        return
    record = reports.eval_record(env)
    if as_json:
        typer.echo(json.dumps(record, indent=1))
        return
    reports.print_eval(record)


@app.command()
@user_errors
def report(
    workflow: str = typer.Argument(None, help="lora, transfer or differential (default: the last one that ran)."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    out: Path = typer.Option(None, "--out", help="The HTML file (default: <output_dir>/<workflow>/report.html)."),
    open_: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
    no_pictures: bool = typer.Option(
        False, "--no-pictures", help="Leave out what needs the models (teacher x0 sheets, the differential grid)."
    ),
    as_json: bool = JsonOpt,
):
    """Write one self-contained HTML page for the last run of a workflow: stages, curves, fidelity, teacher |Δ|,
    the differential eval, previews, the config and what changed since the previous run. Runs nothing."""
    from pipeline import api

    env = _env(config, set_)
    result = api.report(env, workflow, out, pictures=not no_pictures)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        from pipeline.reports import short

        typer.echo(f"wrote {short(result['path'])} ({result['bytes'] / 1024:.0f} KiB, {result['workflow']} run)")
    if open_:
        import webbrowser

        webbrowser.open(Path(result["path"]).resolve().as_uri())


@app.command()
@user_errors
def status(
    workflow: str = typer.Argument(None, help="Workflow to show (default: every workflow with a run, else lora)."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    as_json: bool = JsonOpt,
):
    """Show FRESH / STALE / MISSING / PARTIAL per stage, with why, against the current config."""
    from pipeline import api

    report = api.status(_env(config, set_), workflow)
    if as_json:
        typer.echo(json.dumps(report[0] if workflow else {"workflows": report}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    for wf in report:
        table = Table(title=f"workflow {wf['workflow']}", show_edge=False, pad_edge=False)
        for col in ("stage", "state", "key", "why"):
            table.add_column(col, overflow="fold")
        for s in wf["stages"]:
            state = s["state"].upper() + (f" {s['progress'][0]}/{s['progress'][1]}" if s["progress"] else "")
            table.add_row(s["name"], state, s["key"][:12], "; ".join(s["causes"]))
        Console(width=160).print(table)
        for s in wf["stages"]:
            for note in s["notes"]:
                typer.echo(f"{s['name']}: {note}")


@app.command()
@user_errors
def inspect(
    what: str = typer.Argument(..., help="What to look at: dataset, teacher, schedule or latents."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    workflow: str = typer.Option("transfer", "--workflow", "-w", help="The workflow whose artifact to inspect."),
    step: list[int] = typer.Option([], "--step", help="Schedule step(s) to show or draw (repeatable)."),
    out: Path = typer.Option(None, "--out", help="Write PNG sheets into this folder (loads the model's VAE)."),
    as_json: bool = JsonOpt,
):
    """Numbers and pictures: the data set (before any run), or cached artifacts: teacher deltas, the schedule, the
    latents."""
    from pipeline import inspect as ins
    from pipeline import reports

    if what not in ("dataset", "teacher", "schedule", "latents"):
        raise PipelineError(f"inspect {what!r}: choose dataset, teacher, schedule or latents.")
    env = _env(config, set_)
    if what == "dataset":
        from pipeline.dataset_report import dataset_report, dataset_sheets

        report = dataset_report(env)
        if out is not None:
            report["sheets"] = dataset_sheets(env, report, out)
        del report["_rows"]
    elif what == "latents":
        latents = ins.find_artifact(env, workflow, "latents")
        report = ins.latents_report(env, latents)
        if out is not None:
            report["sheets"] = ins.latents_sheet(env, latents, out)
    elif what == "schedule":
        report = ins.schedule_report(env, ins.find_artifact(env, workflow, "schedule"), step or [0])
    else:
        teacher = ins.find_artifact(env, workflow, "teacher")
        schedule = env.store.load_manifest("schedule", teacher.preimage["upstream"]["schedule"])
        if schedule is None:
            raise PipelineError("the teacher's schedule artifact is gone from the store; run `pipeline run transfer`.")
        report = ins.teacher_report(env, teacher, schedule)
        if out is not None:
            n = report["steps"]
            chosen = step or sorted({0, n // 2, n - 1})
            latents = env.store.load_manifest("latents", teacher.preimage["upstream"]["latents"])
            report["sheets"] = ins.teacher_sheet(env, teacher, schedule, latents, chosen, out)
    env.store.memo.save()
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    reports.print_inspect(report)


@app.command()
@user_errors
def config(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    keys: bool = typer.Option(False, "--keys", help="Print every config key with its type, default and meaning."),
    as_json: bool = JsonOpt,
):
    """Print the resolved config (file plus --set overrides) as TOML, or the reference of every key."""
    from pipeline.schema_docs import config_reference, config_reference_markdown, resolved_config_toml

    if keys:
        typer.echo(json.dumps(config_reference(), indent=1) if as_json else config_reference_markdown())
        return
    from pipeline.config_loading import load_config

    resolved = load_config(config, set_).config
    if as_json:
        typer.echo(json.dumps(resolved.model_dump(mode="json"), indent=1))
    else:
        typer.echo(resolved_config_toml(resolved), nl=False)


@app.command()
@user_errors
def history(
    stage: str = typer.Argument(..., help="A stage (lora1, student, lora2, teacher, ...) or node (lora1.red-circle)."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    as_json: bool = JsonOpt,
):
    """Every run of a stage the store keeps (until `pipeline gc`), oldest first: key, time, what changed, final loss
    and the LoRA files it kept. `pipeline export STAGE --key K` copies one out."""
    from pipeline.api import stage_history

    report = stage_history(_env(config, set_), stage)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    runs = report["runs"]
    typer.echo(f"{report['stage']}: {len(runs)} artifact(s) in the store, oldest first")
    for n, r in enumerate(runs, 1):
        loss = f"loss {r['final_loss']:.4f}" if isinstance(r["final_loss"], float) else ""
        steps = f"{r['steps']} steps" if r["steps"] else ""
        used = f"  <- {', '.join(r['current'])}" if r["current"] else ""
        when = (r["committed"] or "")[:16].replace("T", " ")
        typer.echo(f"  #{n}  {when}  key {r['key'][:12]}  {steps:>10}  {loss}{used}")
        for change in r["changes"][:6]:
            typer.echo(f"        {change}")
        if len(r["changes"]) > 6:
            typer.echo(f"        ... and {len(r['changes']) - 6} more changes")
        if r["saved_steps"]:
            typer.echo(f"        LoRA kept at steps {', '.join(map(str, r['saved_steps']))} (export with --step N)")
    if runs and report["stage"] in ("lora1", "student", "lora2"):
        typer.echo(f"Copy one out: pipeline export {report['stage']} --key {runs[0]['key'][:8]} --out FILE.safetensors")


@app.command()
@user_errors
def export(
    stage: str = typer.Argument(..., help="lora1, student or lora2 (or a node such as lora1.red-circle)."),
    key: str = typer.Option(
        None,
        "--key",
        help="The artifact's key, or its first characters (`pipeline history`). Default: the one the last run uses.",
    ),
    out: Path = typer.Option(None, "--out", help="The file to write (default: <output_name>-<key>.safetensors here)."),
    step: int = typer.Option(None, "--step", help="The LoRA kept at this step (save_every_steps) instead of the last."),
    fmt: str = typer.Option(
        "kohya",
        "--format",
        help="kohya (the single file ComfyUI, A1111 and kohya load) or diffusers (load_lora_weights).",
    ),
    precision: str = typer.Option(
        None, "--precision", help="fp32, fp16 or bf16 (default: the section's save_precision)."
    ),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    as_json: bool = JsonOpt,
):
    """Copy a LoRA file of any run the store keeps (`pipeline history`) to a file; never overwrites one."""
    from pipeline.api import export_lora

    if fmt not in ("kohya", "diffusers"):
        raise PipelineError(f"--format {fmt}: use kohya or diffusers.")
    if precision is not None and precision not in ("fp32", "float", "fp16", "bf16"):
        raise PipelineError(f"--precision {precision}: use fp32, fp16 or bf16.")
    result = export_lora(_env(config, set_), stage, key, out, step, fmt, precision)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    verb = "wrote" if result["written"] else "already there:"
    typer.echo(f"{verb} {result['file']} ({result['stage']} {result['key'][:12]}, {result['from']})")


@app.command()
@user_errors
def gc(
    config: Path = ConfigOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
    as_json: bool = JsonOpt,
):
    """Remove store entries that no workflow's last run reaches."""
    from pipeline.api import collect_garbage

    report = collect_garbage(config, dry_run)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    for r in report["removed"]:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {r['kind']:7} {r['bytes']:>12,} B  {r['path']}")
    verb = "would free" if dry_run else "freed"
    typer.echo(f"{verb} {report['bytes']:,} bytes in {len(report['removed'])} entries")
    from pipeline.history import TRAINING

    loras = sorted({Path(r["path"]).parent.name for r in report["removed"] if r["kind"] == "stage"} & set(TRAINING))
    if dry_run and loras:
        typer.echo(
            f"Earlier LoRAs of {', '.join(loras)} are among them. To keep one, copy it out first: "
            f"`pipeline history {loras[0]}` lists them, `pipeline export {loras[0]} --key K --out FILE` copies one."
        )


@app.command()
@user_errors
def verify(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    as_json: bool = JsonOpt,
):
    """Re-hash every input and store file and name what differs (exit 1 if anything does); damaged store
    files are dropped, so the next run re-makes them."""
    from pipeline import api

    env = _env(config, set_)
    report = api.verify(env, progress=_progress(env, as_json))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        from pipeline import reports

        reports.print_verify(report)
    if not report["ok"]:
        raise typer.Exit(1)


import_app = typer.Typer(help="Bring settings over from other trainers.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("kohya")
@user_errors
def import_kohya(
    file: Path = typer.Argument(..., help="A kohya sd-scripts dataset config (the --dataset_config TOML)."),
    out: Path = typer.Option(None, "--out", help="Write the settings to this new file (never overwritten)."),
    as_json: bool = JsonOpt,
):
    """A kohya dataset config as pipeline.toml settings: every key mapped to ours, or named with the reason not."""
    from pipeline.kohya_import import import_kohya as run_import
    from pipeline.kohya_import import settings_toml

    report = run_import(file)
    text = settings_toml(report, file)
    if out is not None:
        if out.exists():
            raise PipelineError(f"{out} already exists; choose another --out (the file is never overwritten).")
        out.write_text(text)
    if as_json:
        typer.echo(json.dumps({**report, "toml": text, "written": str(out) if out else None}, indent=1))
        return
    if out is None:
        typer.echo(text)
        return
    for m in report["mapped"]:
        typer.echo(f"  {m['kohya']} -> {m['ours']}")
    for u in report["unmapped"]:
        typer.echo(f"  {u['kohya']}: not imported: {u['why']}")
    typer.echo(f"wrote {out}: set model.path in it, then `pipeline run lora -c {out}`.")


app.add_typer(lora_app, name="lora")


@app.command()
@user_errors
def sample(
    model: Path = typer.Option(..., "--model", help="A diffusers folder or a single .safetensors checkpoint."),
    lora: list[str] = typer.Option([], "--lora", help="FILE:WEIGHT (repeatable); all are applied together."),
    prompt: list[str] = typer.Option(..., "--prompt", help="A prompt: one grid row each (repeatable)."),
    scale: str = typer.Option(
        "0,1", "--scales", help="Comma-separated multipliers of the LoRA weights: one column each."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise (the same in every cell)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Sampling steps (DDIM)."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    size: int = typer.Option(512, "--size", help="Image size in pixels (a multiple of 8)."),
    out: Path = typer.Option(Path("grid.png"), "--out", help="The PNG to write."),
    single_file_config: Path = typer.Option(None, "--single-file-config", help="Configs for a single-file model."),
    family: str = FamilyOpt,
    as_json: bool = JsonOpt,
):
    """Render a PNG grid: prompts x LoRA scales, with diffusers' sampler on one seed."""
    from pipeline.lora_tools import parse_weighted
    from pipeline.lora_tools import sample as render_grid

    try:
        scales = [float(x) for x in scale.split(",") if x.strip()]
    except ValueError:
        raise PipelineError(f"--scales {scale!r}: give comma-separated numbers, e.g. 0,0.5,1") from None
    if size % 8:
        raise PipelineError(f"--size {size}: must be a multiple of 8")
    for spec in lora:
        parse_weighted(spec)  # a bad weight fails before any model loads
    report = render_grid(
        model,
        lora,
        prompt,
        seed,
        out,
        steps,
        guidance,
        size,
        scales,
        family_for(family, model, lora),
        single_file_config,
    )
    typer.echo(json.dumps(report, indent=1) if as_json else f"wrote {out} ({len(prompt)} x {len(scales)} images)")


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        app()
    finally:
        quiet_exit()


if __name__ == "__main__":
    main()
