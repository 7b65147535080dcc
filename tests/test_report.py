"""`pipeline report`: one self-contained HTML page per workflow run, its numbers equal to the manifests', and the
page rendered in headless Chromium (Debian's package, `make browser`): every section there, every image loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import stage_manifest

from pipeline.html_report import SECTIONS

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class Page(HTMLParser):
    """The parts of the page the tests read: section ids, data-* attributes by tag, img sources, <b> texts."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.data, self.images, self.bold, self.changed = [], [], [], [], []
        self._b = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        if tag == "tr" and a.get("class") == "changed":
            self.changed.append(a["data-field"])
        if any(k.startswith("data-") for k in a):
            self.data.append((tag, a))
        self._b = tag == "b"

    def handle_data(self, data):
        if self._b:
            self.bold.append(data)
            self._b = False

    def attrs(self, name: str) -> list[dict]:
        return [a for _, a in self.data if name in a]


def report_of(project, workflow: str, *args: str) -> tuple[dict, Path]:
    result = project.cli("report", workflow, "-c", str(project.config), "--json", *args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    return doc, Path(doc["path"])


def test_the_transfer_report_holds_the_manifests_numbers_and_what_changed(transfer_project):
    project = transfer_project
    project.write_config(runtime={"preview": {"every": 2, "steps": 2}})
    project.run_json(workflow="transfer")
    second = project.run_json("--set", "student.lr=3e-4", workflow="transfer")
    doc, path = report_of(project, "transfer", "--set", "student.lr=3e-4")
    assert path == project.root / "output" / "transfer" / "report.html" and path.stat().st_size == doc["bytes"]
    text = path.read_text()
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    page = Page(text)
    assert page.sections == list(SECTIONS)

    rows = {a["data-stage"]: a for a in page.attrs("data-stage")}
    for s in second["stages"]:  # the stage table is the last run's: action, key and seconds
        assert rows[s["name"]]["data-key"] == s["key"]
        assert float(rows[s["name"]]["data-seconds"]) == pytest.approx(s["seconds"], abs=1e-3)
    student = stage_manifest(project, second, "student")
    final = [float(a["data-final-loss"]) for a in page.attrs("data-final-loss")]
    lora1 = stage_manifest(project, second, "lora1")
    assert final == [lora1["record"]["final_loss"], student["record"]["final_loss"]]
    fid = page.attrs("data-final-cosine")[0]
    assert float(fid["data-final-cosine"]) == student["record"]["fidelity"]["final"]["cosine"]
    assert f"{student['record']['fidelity']['final']['cosine']:.4f}" in page.bold

    from pipeline.api import open_project
    from pipeline.inspect import teacher_report

    env = open_project(project.config, ["student.lr=3e-4"])
    teacher, schedule = (env.store.load_manifest(s, env.store.read_ref("transfer")[s]) for s in ("teacher", "schedule"))
    bins = teacher_report(env, teacher, schedule)["bins"]
    assert [(a["data-bin"], a["data-mean"]) for a in page.attrs("data-bin")] == [
        (b["t"], str(b["mean_abs"])) for b in bins
    ]
    assert len([i for i in page.images if i.startswith("data:image/png;base64,")]) == len(page.images) >= 3
    previews = [a for a in page.attrs("data-preview-step")]
    assert {a["data-preview-stage"] for a in previews} == {"lora1", "student"}

    assert "student.lr" in page.changed and "transfer.student_model" in page.changed  # differs from the defaults
    assert "runtime.device" not in page.changed
    assert [a["data-changed-stage"] for a in page.attrs("data-changed-stage")] == ["student"]
    assert re.search(r"<td>lr</td><td>0\.001</td><td>0\.0003</td>", text)

    loss_csv = (project.root / "output" / "transfer" / "student" / "loss.csv").read_text().splitlines()
    assert loss_csv[0] == "step,loss,grad_norm,lr" and all(len(line.split(",")) == 4 for line in loss_csv[1:])


def test_the_differential_report_has_its_eval_table_and_grid(differential_project):
    project = differential_project
    report = project.run_json(workflow="differential")
    doc, path = report_of(project, "differential")
    page = Page(path.read_text())
    record = stage_manifest(project, report, "eval")["record"]
    pairs = {a["data-pair"] for a in page.attrs("data-pair")}
    assert pairs == set(record["pairs"])
    values = {float(a["data-direction-average"]) for a in page.attrs("data-direction-average")}
    assert values == {r["direction_average"] for r in record["pairs"].values()}
    assert any("differential sample grid" in t for t in [path.read_text()])


def test_no_run_yet_is_a_clear_error(project):
    result = project.cli("report", "transfer", "-c", str(project.config))
    assert result.exit_code == 2 and "no transfer run in this store yet" in result.output
    assert "Traceback" not in result.output
    result = project.cli("report", "-c", str(project.config))  # the default: the workflow that ran last
    assert result.exit_code == 2 and "no workflow has run in this store yet" in result.output
    result = project.cli("report", "lorra", "-c", str(project.config))
    assert result.exit_code == 2 and "unknown workflow 'lorra'" in result.output


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  const sections = [...document.querySelectorAll('section')].map(s => s.id);
  const svgs = [...document.querySelectorAll('svg')].filter(s => s.getBoundingClientRect().width > 0).length;
  const out = document.createElement('pre');
  out.id = 'check';
  const losses = [...document.querySelectorAll('[data-final-loss] b')].map(b => b.textContent);
  out.textContent = JSON.stringify({images: imgs.length, broken, sections, svgs, losses});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(transfer_project, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on this machine: `make browser` installs Debian's package (CI runs it)")
    project = transfer_project
    project.write_config(runtime={"preview": {"every": 2, "steps": 2}})
    report = project.run_json(workflow="transfer")
    _, path = report_of(project, "transfer")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    checked = tmp_path / "checked.html"  # the test's copy with a probe script; the report itself has none
    checked.write_text(path.read_text().replace("</body>", CHECK + "</body>"))
    dom = subprocess.run([browser, *flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=300)
    found = re.search(r'<pre id="check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["sections"] == list(SECTIONS) and check["broken"] == [] and check["images"] >= 3
    assert check["svgs"] >= 4  # loss, lr, grad norm and fidelity plots laid out with a size
    finals = [stage_manifest(project, report, s)["record"]["final_loss"] for s in ("lora1", "student")]
    assert check["losses"] == [f"{v:.4f}" for v in finals]  # what the page shows is what the manifests hold

    shot = tmp_path / "report.png"
    run = subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        colours = img.convert("RGB").resize((60, 120)).getcolors(maxcolors=60 * 120)
    assert img.size == (1200, 2400) and len(colours) > 20  # text, plots and pictures, not a blank page
