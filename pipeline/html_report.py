"""`pipeline report`: one self-contained HTML page for the last run of a workflow.

Everything is read from the store (the workflow's ref, the manifests and their output files); the plots are
hand-written inline SVG and the pictures inline PNG, so the page opens anywhere, offline, with no script. Numbers
on the page carry data-* attributes holding the manifest's values, which the browser test compares.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import tempfile
from pathlib import Path

from cache.keys import flatten
from core.errors import PlanError
from stages.base import PlanEnv

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
SECTIONS = ("stages", "training", "fidelity", "teacher", "differential", "previews", "config", "changes")


def build(env: PlanEnv, workflow: str, pictures: bool = True) -> dict:
    """The report's content: plain data, no HTML. pictures=False skips what needs the models (x0 sheets, grid)."""
    doc = env.store.ref_doc(workflow)
    if not doc.get("stages"):
        raise PlanError(
            f"no {workflow} run in this store yet: `pipeline run {workflow}` makes one, then `pipeline report "
            f"{workflow}` shows it."
        )
    kinds = doc.get("kinds", {})
    run = {s["name"]: s for s in (doc.get("run") or {}).get("stages", [])}
    manifests = {}
    for name, key in doc["stages"].items():
        manifests[name] = env.store.load_manifest(kinds.get(name, name), key)
    order = [n for n in run if n in doc["stages"]] + [n for n in doc["stages"] if n not in run]  # the run's order
    stages = []
    for name, key in ((n, doc["stages"][n]) for n in order):
        m, r = manifests[name], run.get(name)
        stages.append(
            {
                "name": name,
                "action": r["action"] if r else "earlier run",
                "key": key,
                "seconds": (r["seconds"] if r and r["action"] == "ran" else 0.0) if r else None,
                "made_in": (m.provenance.get("seconds") if m else None),
                "causes": r["causes"] if r else [],
                "missing": m is None,
            }
        )
    report = {
        "workflow": workflow,
        "finished": (doc.get("run") or {}).get("finished") or doc.get("updated"),
        "stages": stages,
        "training": [],
        "fidelity": None,
        "teacher": None,
        "differential": None,
        "previews": [],
        "config": _config_rows(doc.get("config") or {}),
        "changes": [],
    }
    for name, m in manifests.items():
        if m is None:
            continue
        if "loss.csv" in m.outputs:
            report["training"].append({"name": name, **_read_curves(env, m)})
        previews = sorted(k for k in m.outputs if k.startswith("previews/") and k.endswith(".png"))
        for k in previews:
            step = int("".join(c for c in Path(k).stem if c.isdigit()) or 0)
            report["previews"].append(
                {"stage": name, "step": step, "png": env.store.object_path(m.outputs[k]["digest"])}
            )
        if m.stage == "student":
            report["fidelity"] = {"stage": name, **m.record["fidelity"]}
        if m.stage == "teacher" and "schedule" in doc["stages"]:
            report["teacher"] = _teacher(env, m, manifests, pictures)
        if m.stage == "eval":
            report["differential"] = _differential(env, m, manifests, pictures)
    for name, r in run.items():
        if r.get("replaced"):
            report["changes"].append(_change(env, kinds.get(name, name), name, r["replaced"], manifests.get(name)))
    return report


def _read_curves(env: PlanEnv, m) -> dict:
    path = env.store.read_object(m.outputs["loss.csv"]["digest"], f"{m.stage} loss.csv")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    smoothed, s = [], None
    for v in loss:  # the progress bar's smoothing
        s = v if s is None else 0.9 * s + 0.1 * v
        smoothed.append(s)
    lrs = {c[3:]: [float(r[c]) for r in rows] for c in (rows[0] if rows else {}) if c.startswith("lr:")}
    if not lrs and rows and rows[0].get("lr"):
        lrs = {"lr": [float(r["lr"]) for r in rows]}
    norms = [float(r["grad_norm"]) for r in rows if r.get("grad_norm")]
    return {
        "steps": steps,
        "loss": loss,
        "smoothed": smoothed,
        "lr": lrs,
        "grad_norm": norms if len(norms) == len(rows) else [],
        "final_loss": m.record.get("final_loss"),
    }


def _teacher(env: PlanEnv, teacher, manifests: dict, pictures: bool) -> dict:
    from pipeline.inspect import teacher_report, teacher_sheet

    schedule, latents = manifests.get("schedule"), manifests.get("latents")
    numbers = teacher_report(env, teacher, schedule)  # reads every array once: |Δc| per bin
    out = {"bins": numbers["bins"], "sheets": [], "note": None}
    if pictures and latents is not None:
        steps = sorted({0, numbers["steps"] - 1})
        try:
            with tempfile.TemporaryDirectory() as tmp:
                paths = teacher_sheet(env, teacher, schedule, latents, steps, Path(tmp))
                out["sheets"] = [{"step": s, "data": _png(Path(p))} for s, p in zip(steps, paths, strict=True)]
        except Exception as e:  # the model moved or changed: the page says so instead of failing
            out["note"] = f"x0 sheets not drawn: {e}"
    return out


def _differential(env: PlanEnv, evaluation, manifests: dict, pictures: bool) -> dict:
    out = {"pairs": evaluation.record["pairs"], "mean": evaluation.record.get("direction_average_mean")}
    out["grid"], out["note"] = None, None
    average = manifests.get("average")
    if pictures and average is not None:
        from pipeline.lora_tools import sample as render_grid
        from pipeline.reports import _eval_captions

        files = [k for k in average.outputs if k.endswith(".safetensors") and "/" not in k]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                lora = Path(tmp) / "average.safetensors"
                lora.write_bytes(env.store.read_object(average.outputs[files[0]]["digest"]).read_bytes())
                prompts = sorted({i["caption"] for i in _eval_captions(env)})[:2] or [""]
                grid = Path(tmp) / "grid.png"
                model = env.loaded.resolve(env.config.model.path)
                size = env.config.latents.resolution
                render_grid(model, [str(lora)], prompts, 0, grid, 10, 7.5, size, [0, 0.5, 1], env.family)
                out["grid"] = {"prompts": prompts, "scales": [0, 0.5, 1], "data": _png(grid)}
        except Exception as e:
            out["note"] = f"sample grid not drawn: {e}"
    return out


def _change(env: PlanEnv, kind: str, name: str, old_key: str, new) -> dict:
    old = env.store.load_manifest(kind, old_key)
    if old is None or new is None:
        return {"stage": name, "old_key": old_key, "rows": [], "note": "the earlier artifact is gone (gc)"}
    before, after = flatten(old.preimage.get("params") or {}), flatten(new.preimage.get("params") or {})
    rows = [
        {"field": k, "before": before.get(k), "after": after.get(k)}
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]
    ups = old.preimage.get("upstream", {}), new.preimage.get("upstream", {})
    rows += [
        {"field": f"upstream {u}", "before": ups[0].get(u, "")[:12], "after": ups[1].get(u, "")[:12]}
        for u in sorted(set(ups[0]) | set(ups[1]))
        if ups[0].get(u) != ups[1].get(u)
    ]
    return {"stage": name, "old_key": old_key, "rows": rows, "note": None}


def _config_rows(config: dict) -> list[dict]:
    from pipeline.config import PipelineConfig

    defaults = flatten(PipelineConfig().model_dump(mode="json"))
    return [
        {"field": k, "value": v, "default": defaults.get(k), "changed": k not in defaults or defaults[k] != v}
        for k, v in sorted((flatten(config) if config else {}).items())
    ]


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


# -- HTML ------------------------------------------------------------------------------------------------------


def render(report: dict) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>lora-pipeline report: {e(report['workflow'])}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(report['workflow'])} run</h1><p class=meta>finished {e(str(report['finished']))}; made by "
        "<code>pipeline report</code> from the store's manifests.</p>",
        _nav(report),
        _stages_html(report["stages"]),
        _training_html(report["training"]),
        _fidelity_html(report["fidelity"]),
        _teacher_html(report["teacher"]),
        _differential_html(report["differential"]),
        _previews_html(report["previews"]),
        _config_html(report["config"]),
        _changes_html(report["changes"]),
        "</body></html>",
    ]
    return "\n".join(parts)


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.changed td{background:#fff3c4;font-weight:600}
.meta,.note{color:#666}code{background:#f4f4f4;padding:0 3px}nav a{margin-right:12px}
figure{display:inline-block;margin:8px}figcaption{color:#555;font-size:12px}img{image-rendering:pixelated}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def _nav(report: dict) -> str:
    names = {
        "stages": "Stages",
        "training": "Training curves",
        "fidelity": "Student fidelity",
        "teacher": "Teacher",
        "differential": "Differential eval",
        "previews": "Previews",
        "config": "Config",
        "changes": "Changes",
    }
    return "<nav>" + "".join(f"<a href='#{s}'>{names[s]}</a>" for s in SECTIONS) + "</nav>"


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id={sid}><h2>{title}</h2>{body}</section>"


def _stages_html(stages: list[dict]) -> str:
    e = html.escape
    rows = []
    for s in stages:
        secs = "" if s["seconds"] is None else f"{s['seconds']:.1f}"
        made = "" if s["made_in"] is None else f"{s['made_in']:.1f}"
        rows.append(
            f"<tr data-stage='{e(s['name'])}' data-key='{s['key']}' data-seconds='{s['seconds']}'>"
            f"<td>{e(s['name'])}</td><td>{e(s['action'])}</td><td><code title='{s['key']}'>{s['key'][:12]}</code>"
            f"</td><td class=num>{secs}</td><td class=num>{made}</td><td>{e('; '.join(s['causes']))}"
            f"{' (artifact missing: run again)' if s['missing'] else ''}</td></tr>"
        )
    head = "<tr><th>stage</th><th>action</th><th>key</th><th>seconds</th><th>made in (s)</th><th>cause</th></tr>"
    return _section("stages", "Stages", f"<table>{head}{''.join(rows)}</table>")


def _training_html(training: list[dict]) -> str:
    if not training:
        return _section("training", "Training curves", "<p class=note>No training stage in this workflow.</p>")
    body = []
    for t in training:
        loss = svg_plot(
            {
                "loss": list(zip(t["steps"], t["loss"], strict=False)),
                "smoothed": list(zip(t["steps"], t["smoothed"], strict=False)),
            },
            "step",
            "loss",
        )
        lr = svg_plot({g: list(zip(t["steps"], v, strict=False)) for g, v in t["lr"].items()}, "step", "learning rate")
        norm = (
            svg_plot({"grad norm": list(zip(t["steps"], t["grad_norm"], strict=False))}, "step", "grad norm")
            if t["grad_norm"]
            else ""
        )
        final = t["final_loss"]
        body.append(
            f"<h3>{html.escape(t['name'])}</h3><p data-final-loss='{final}'>final loss (mean of the last 10 steps): "
            f"<b>{final:.4f}</b>, {len(t['steps'])} steps</p>{loss}{lr}{norm}"
        )
    return _section("training", "Training curves", "".join(body))


def _fidelity_html(fid: dict | None) -> str:
    if not fid:
        return _section("fidelity", "Student fidelity", "<p class=note>No student stage in this workflow.</p>")
    curve = fid["curve"]
    series = {
        k: [(c["step"], c[k]) for c in curve]
        for k in ("cosine", "rel_error", "fit_cosine", "fit_rel_error")
        if curve and k in curve[0]
    }
    final = fid.get("final") or {}
    text = (
        f"<p data-final-cosine='{final.get('cosine')}' data-final-rel-error='{final.get('rel_error')}'>final "
        f"cosine <b>{final.get('cosine', float('nan')):.4f}</b>, relative error "
        f"<b>{final.get('rel_error', float('nan')):.4f}</b> on {fid.get('heldout')} held-out samples: the learned "
        f"delta S_L − S against g·Δ of the teacher.</p>"
    )
    return _section("fidelity", "Student fidelity", text + svg_plot(series, "step", "cos / rel. error"))


def _teacher_html(teacher: dict | None) -> str:
    if not teacher:
        return _section("teacher", "Teacher", "<p class=note>No teacher stage in this workflow.</p>")
    bins = teacher["bins"]
    rows = "".join(
        f"<tr data-bin='{b['t']}' data-mean='{b['mean_abs']}'><td>{b['t']}</td><td class=num>{b['rows']}</td>"
        f"<td class=num>{_fmt(b['mean_abs'])}</td><td class=num>{_fmt(b['max_abs'])}</td></tr>"
        for b in bins
    )
    table = f"<table><tr><th>timesteps</th><th>rows</th><th>mean |Δc|</th><th>max |Δc|</th></tr>{rows}</table>"
    bars = svg_bars([(b["t"].split("-")[0], b["mean_abs"] or 0.0) for b in bins], "mean |Δc| per timestep bin (start)")
    sheets = "".join(
        f"<figure><img alt='teacher x0 sheet, step {s['step']}' src='data:image/png;base64,{s['data']}'>"
        f"<figcaption>schedule step {s['step']}: clean, teacher x0, x0 with the LoRA, |Δc|</figcaption></figure>"
        for s in teacher["sheets"]
    )
    note = f"<p class=note>{html.escape(teacher['note'])}</p>" if teacher["note"] else ""
    return _section("teacher", "Teacher: |Δc| per timestep bin and x0 sheets", table + bars + sheets + note)


def _differential_html(diff: dict | None) -> str:
    if not diff:
        return _section("differential", "Differential eval", "<p class=note>No differential eval in this run.</p>")
    cols = [
        "loss_a_base",
        "loss_a_lora1",
        "loss_b_lora1",
        "loss_b_lora1_lora2",
        "direction_lora2",
        "direction_lora2_over_lora1",
        "direction_average",
    ]
    head = "<tr><th>pair</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    rows = "".join(
        f"<tr data-pair='{html.escape(n)}'><td>{html.escape(n)}</td>"
        + "".join(f"<td class=num data-{c.replace('_', '-')}='{r[c]}'>{r[c]:.4f}</td>" for c in cols)
        + "</tr>"
        for n, r in diff["pairs"].items()
    )
    grid = ""
    if diff["grid"]:
        g = diff["grid"]
        grid = (
            f"<figure><img alt='differential sample grid' src='data:image/png;base64,{g['data']}'><figcaption>rows: "
            f"{html.escape(' | '.join(g['prompts']))}; columns: LoRA-2 average at {g['scales']}</figcaption></figure>"
        )
    note = f"<p class=note>{html.escape(diff['note'])}</p>" if diff["note"] else ""
    return _section("differential", "Differential eval", f"<table>{head}{rows}</table>{grid}{note}")


def _previews_html(previews: list[dict]) -> str:
    if not previews:
        body = "<p class=note>No previews (runtime.preview.every = 0).</p>"
    else:
        body = "".join(
            f"<figure data-preview-stage='{html.escape(p['stage'])}' data-preview-step='{p['step']}'>"
            f"<img alt='{html.escape(p['stage'])} preview at step {p['step']}' "
            f"src='data:image/png;base64,{_png(p['png'])}'><figcaption>{html.escape(p['stage'])}, step {p['step']}"
            "</figcaption></figure>"
            for p in previews
        )
    return _section("previews", "Previews by step", body)


def _config_html(rows: list[dict]) -> str:
    e = html.escape
    body = "".join(
        f"<tr class='{'changed' if r['changed'] else ''}' data-field='{e(r['field'])}'><td>{e(r['field'])}</td>"
        f"<td>{e(_show(r['value']))}</td><td>{e(_show(r['default']))}</td></tr>"
        for r in rows
    )
    text = "<p>Highlighted: the settings that differ from the defaults.</p>"
    return _section(
        "config",
        "Resolved config",
        f"{text}<table><tr><th>setting</th><th>value</th><th>default</th></tr>{body}</table>",
    )


def _changes_html(changes: list[dict]) -> str:
    if not changes:
        return _section(
            "changes",
            "Changes against the previous run",
            "<p class=note>No stage re-ran with new settings in this run.</p>",
        )
    e = html.escape
    body = []
    for c in changes:
        rows = "".join(
            f"<tr><td>{e(r['field'])}</td><td>{e(_show(r['before']))}</td><td>{e(_show(r['after']))}</td></tr>"
            for r in c["rows"]
        )
        note = f"<p class=note>{e(c['note'])}</p>" if c["note"] else ""
        body.append(
            f"<h3 data-changed-stage='{e(c['stage'])}'>{e(c['stage'])} (was <code>{c['old_key'][:12]}</code>)</h3>"
            f"{note}<table><tr><th>setting</th><th>before</th><th>after</th></tr>{rows}</table>"
        )
    return _section("changes", "Changes against the previous run", "".join(body))


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}"


def _show(v) -> str:
    return "" if v is None else str(v)


# -- plots -----------------------------------------------------------------------------------------------------


def svg_plot(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, w: int = 520, h: int = 220) -> str:
    """Lines of (x, y) points on shared axes, with min/max ticks and a legend: a few KB of SVG per plot."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0 or 1) * 0.05, y1 + abs(y1 or 1) * 0.05
    left, right, top, bottom = 60, 10, 10, 36
    pw, ph = w - left - right, h - top - bottom

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img' aria-label='{ylabel}'>",
        f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#bbb'/>",
    ]
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, yy = px(x0, yv)
        out.append(f"<text x='{left - 4}' y='{yy + 4:.1f}' text-anchor='end'>{yv:.3g}</text>")
        out.append(f"<line x1='{left}' x2='{left + pw}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#eee'/>")
    for xv in (x0, (x0 + x1) / 2, x1):
        xx, _ = px(xv, y0)
        out.append(f"<text x='{xx:.1f}' y='{top + ph + 14}' text-anchor='middle'>{xv:.4g}</text>")
    out.append(f"<text x='{left + pw / 2}' y='{h - 4}' text-anchor='middle'>{html.escape(xlabel)}</text>")
    out.append(
        f"<text x='12' y='{top + ph / 2}' transform='rotate(-90 12 {top + ph / 2})' text-anchor='middle'>"
        f"{html.escape(ylabel)}</text>"
    )
    for n, (name, pts) in enumerate(series.items()):
        color = PALETTE[n % len(PALETTE)]
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(x, y) for x, y in pts))
        out.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{coords}'/>")
        out.append(
            f"<text x='{left + 8}' y='{top + 14 + 14 * n}' fill='{color}' style='fill:{color}'>"
            f"{html.escape(name)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def svg_bars(values: list[tuple[str, float]], label: str, w: int = 520, h: int = 200) -> str:
    if not values:
        return ""
    top_value = max(v for _, v in values) or 1.0
    left, bottom, top = 50, 40, 16
    ph, bw = h - bottom - top, (w - left - 10) / len(values)
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img' aria-label='{label}'>",
        f"<text x='{left}' y='12'>{html.escape(label)} (max {top_value:.3g})</text>",
    ]
    for i, (name, v) in enumerate(values):
        bh = v / top_value * ph
        x = left + i * bw
        out.append(
            f"<rect x='{x + 2:.1f}' y='{top + ph - bh:.1f}' width='{bw - 4:.1f}' height='{bh:.1f}' "
            f"fill='{PALETTE[0]}'/>"
        )
        out.append(f"<text x='{x + bw / 2:.1f}' y='{top + ph + 14}' text-anchor='middle'>{html.escape(name)}</text>")
    out.append("</svg>")
    return "".join(out)


def write(env: PlanEnv, workflow: str, out: Path, pictures: bool = True) -> dict:
    """Build and write the page; -> {"path", "bytes", "sections"}."""
    report = build(env, workflow, pictures)
    page = render(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return {"path": str(out), "bytes": len(page.encode()), "sections": list(SECTIONS), "workflow": workflow}
