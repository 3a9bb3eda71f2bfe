"""The report as a reader meets it: tables formatted (names, precision, bold, statuses), LaTeX
that compiles on an article page without overfull boxes (pdflatex, when installed), and the HTML
page rendered in headless Chromium (when installed): no console messages, every table and figure
present and visible, a screenshot saved beside the report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from test_report import bench_sweep, make, seeds3

from harness.report import build_report
from harness.report_render import DisplayTable, latex_escape, leading_number, to_html, to_latex

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PDFLATEX = shutil.which("pdflatex")
# As /work/.library/env machines note: a closed network refuses Chromium's background calls.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def test_best_cells_statuses_and_no_index_artefacts():
    text = pd.DataFrame({"listops": ["36.4 ± 0.5", "OOM", "37.1", "n/a"],
                         "char_lm": ["1.200", "1.100", "FAIL", "–"]},
                        index=["transformer", "performer", "mamba", "lstm"])
    table = DisplayTable(text, "Accuracy", "caption", "accuracy", row_label="Model",
                         better={"listops": "max", "char_lm": "min"})
    best = table.best()
    assert best["listops"].tolist() == [False, False, True, False]
    assert best["char_lm"].tolist() == [False, True, False, False]
    classes = table.classes()
    assert classes.loc["performer", "listops"] == "oom" and classes.loc["mamba", "char_lm"] == "fail"
    assert classes.loc["lstm", "listops"] == "na" and classes.loc["lstm", "char_lm"] == "notrun"
    page = to_html(table)
    assert "index" not in page.lower() and "<th" in page  # row labels as headers, no index column
    assert re.search(r'class="data row2 col0 best"[^>]*>37\.1<', page), page
    assert re.search(r'class="data row1 col0 oom"[^>]*>OOM<', page), page
    assert leading_number("2.5 (4.0x)") == 2.5 and leading_number("1,234") == 1234
    assert latex_escape("a_b ± 1 – 2 %") == r"a\_b $\pm$ 1 -- 2 \%"


def test_latex_is_booktabs_bold_and_split_when_tall():
    rows = pd.DataFrame({"Model": [f"m{i}" for i in range(70)], "Ours": [f"{i}.0" for i in range(70)]})
    tex = to_latex(DisplayTable(rows, "Comparison", "Ours against published", "comparison",
                                better={"Ours": "max"}), "tab:c")
    assert tex.count(r"\begin{table*}") == 3 and "part 3 of 3" in tex  # 32 rows a page
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\bfseries 69.0" in tex and r"\resizebox" in tex


def _wide_records(root: Path) -> None:
    """A report with wide tables: 9 models x 7 tasks, several lengths, a long claims table."""
    models = ["transformer", "local", "longformer", "bigbird", "linear_transformer", "performer",
              "linformer", "s4d", "mamba"]
    for i, model in enumerate(models):
        for j, task in enumerate(["listops", "text", "retrieval", "image", "pathfinder", "pathx",
                                  "mqar"]):
            acc = 0.3 + 0.05 * ((i + j) % 7)
            for seed in (0, 1, 2):
                make(root, model=model, task=task, seq_len=1024 if task != "mqar" else 256,
                     seed=seed, val=acc, test=acc + seed / 100)
    bench_sweep(root, models=models, lengths=(1024, 2048, 4096, 8192))


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    _wide_records(root)
    out = root / "report"
    build_report([str(root)], out, plots=False)
    return out


@pytest.mark.skipif(PDFLATEX is None, reason="pdflatex is not installed (Debian: texlive-latex-base "
                                              "texlive-latex-recommended); the LaTeX tables are not compiled")
def test_latex_tables_compile_on_an_article_page_without_overfull_boxes(wide_report, tmp_path):
    tables = sorted((wide_report / "tables").glob("*.tex"))
    assert {t.stem for t in tables} >= {"accuracy", "params", "efficiency", "scaling_exponents",
                                        "comparison", "claims"}
    body = "\n".join(rf"\input{{{t}}}\clearpage" for t in tables)
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx,array}\n"
                                      f"\\begin{{document}}\n{body}\n\\end{{document}}\n")
    proc = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    assert "Overfull" not in log, [l for l in log.splitlines() if "Overfull" in l]
    assert "Float too large" not in log
    assert re.search(r"Output written on doc.pdf \(\d+ pages?", log)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs.get("alt"))


# Run after load by the test's copy of the page: what is present and visible, into the DOM.
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const visible = el => { const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden'; };
  const out = {
    tables: [...document.querySelectorAll('table')].map(t => ({id: t.id, visible: visible(t),
      rows: t.querySelectorAll('tbody tr').length})),
    images: [...document.querySelectorAll('img')].map(i => ({alt: i.alt, visible: visible(i),
      loaded: i.complete && i.naturalWidth > 0})),
    height: document.documentElement.scrollHeight,
  };
  const pre = document.createElement('pre'); pre.id = 'arena-check';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def _chromium(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={cwd / 'profile'}", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                                              "chromium; .ci/run installs it where it can)")
def test_html_report_renders_in_chromium_with_every_table_and_figure(tmp_path):
    root = tmp_path / "runs"
    for model, acc in [("transformer", 0.6), ("linear_transformer", 0.5), ("transformer_xl", 0.55)]:
        for seed in (0, 1):
            run = make(root, model=model, task="listops", seq_len=2000, seed=seed, val=acc,
                       test=acc + seed / 100)
            lines = [{"step": s, "split": "train", "loss": 2.3 / s ** 0.3, "lr": 1e-3}
                     for s in range(10, 310, 10)]
            lines += [{"step": s, "split": "val", "loss": 1.0, "metric_name": "accuracy",
                       "metric": acc * s / 300} for s in (100, 200, 300)]
            (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    make(root, model="performer", task="listops", seq_len=2000, status="oom")
    bench_sweep(root, models=("transformer", "linear_transformer", "transformer_xl", "performer"))
    seeds3(root, model="h3", task="selective_copying", seq_len=4096, val=0.6,
           experiment="mamba_selective_copying")  # matched to a published row: the published figure
    out = tmp_path / "report"
    result = build_report([str(root)], out)
    written = set(result["plots"])
    assert {"accuracy_heatmap", "scaling", "bubble", "published", "training_curves"} <= written

    page = _Page()
    page.feed((out / "report.html").read_text())
    probe = out / "report.check.html"  # the page with the check script, beside it (same links)
    probe.write_text((out / "report.html").read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    proc = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [l for l in proc.stderr.splitlines() if ":CONSOLE" in l]
    assert console == [], console  # the page has no script of its own: any message is a fault
    found = re.search(r'<pre id="arena-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stdout[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    tables = {t["id"]: t for t in check["tables"]}
    assert set(tables) == set(page.tables) and len(tables) == 6  # with the parameters table
    assert all(t["visible"] and t["rows"] > 0 for t in tables.values()), tables
    images = {i["alt"]: i for i in check["images"]}
    assert set(images) == written == set(page.images)
    assert all(i["visible"] and i["loaded"] for i in images.values()), images

    shot = out / "screenshot.png"
    height = min(int(check["height"]) + 50, 16000)
    proc = _chromium([f"--window-size=1280,{height}", f"--screenshot={shot}", "--virtual-time-budget=5000",
                      (out / "report.html").as_uri()], tmp_path)
    assert proc.returncode == 0 and shot.exists() and shot.stat().st_size > 50_000, proc.stderr[-2000:]
    probe.unlink()


def test_one_distinct_colour_per_model_in_every_figure():
    from harness.plots import KELLY, known_models, model_colours, model_markers

    everyone, markers = model_colours(), model_markers()
    assert len(everyone) >= len(known_models())
    # every model is told apart: by colour alone for as many models as the palette has colours,
    # by colour and marker beyond that
    assert len({(everyone[m], markers[m]) for m in everyone}) == len(everyone)
    first = known_models()[:len(KELLY)]
    assert len({everyone[m] for m in first}) == len(first)
    # a model's colour does not depend on which others a figure shows
    assert model_colours(["transformer"])["transformer"] == everyone["transformer"]
    assert model_colours(["mamba", "published-only"])["mamba"] == everyone["mamba"]
    assert everyone["transformer"] != everyone["transformer_xl"]


def test_log_ticks_are_plain_numbers():
    import matplotlib.pyplot as plt

    from harness.plots import plain_log_axis

    fig, ax = plt.subplots()
    ax.plot([0.3, 3000], [0.3, 3000])
    plain_log_axis(ax, "y")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert labels and not any("10^" in l or "times" in l or "$" in l for l in labels), labels
    assert {"0.5", "1", "2", "1,000"} <= set(labels), labels
