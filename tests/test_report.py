"""The HTML report of the tiny virtual cohort's run (conftest.virtual_run): every section, every exclusion with
its reason, self-contained, and rendered by headless Chromium (Debian's package) with no broken image."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

CHROMIUM = shutil.which("chromium")
#: Appended to a copy of the page: after load, the body records how many images there are and how many broke.
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
});</script>"""


def _page(virtual_run) -> str:
    return (virtual_run["work"] / "results" / "report" / "index.html").read_text(encoding="utf-8")


def test_report_has_every_section_and_every_exclusion(virtual_run):
    page, results = _page(virtual_run), virtual_run["work"] / "results"
    for heading in ("Cohort", "Quality control", "Training curves", "Results"):
        assert f"<h2>{heading}</h2>" in page, heading
    for method in ("ceiling", "decomposition", "decomposition+regression", "baseline"):
        assert f"<td>{html.escape(method)}</td>" in page, method
    for column in json.loads((results / "dataset" / "folds.json").read_text())["columns"]:
        assert f"<h3>{column} (" in page, column
    assert "Osteoporosis screening from T-scores" in page and "Robustness: per pose" in page
    assert "Decomposition examples" in page and "Scatter and Bland–Altman" in page
    assert "Image decomposition accuracy (seed 004 Table 3)" in page and "<th>mean Dice</th>" in page
    # robustness variants have their own table, not rows of the main one
    assert "Robustness: localised field and JPEG re-compression" in page and "PCC JPEG 10" in page
    assert "<td>decomposition+regression @JPEG50</td>" not in page
    # the training experiments (seed 004 §4.2.3, §4.2.5) beside the main training, per pose
    assert "Robustness: training experiments" in page  # the tiny run's: uncalibrated CT (pa_only: test_workflow)
    assert "targets from phantomless-calibrated CT (uncalibrated CT)" in page
    assert "<td>decomposition @uncalibrated_ct</td>" not in page  # an experiment is not a row of the main table
    assert "Crop localiser for bmdpipe predict" in page and "centre error mm (median)" in page
    assert "<h2>Seed 000: chest landmarks</h2>" in page and "seed 000 landmarks and ROIs" in page
    # seed 000's models beside seed 004's methods (Table I), screening at its thresholds (Tables II and III)
    assert "<h2>Seed 000: BMD from chest radiographs</h2>" in page and "Seed 000 Table I" in page
    assert "Seed 000 Tables II and III" in page and "<th>T ≤ -1.75</th>" in page and "<td>AttMultiPatch</td>" in page
    # its figures for the paper's model (AttMultiROI where a fold trained it): fit line and Bland–Altman at L1,
    # patients by osteoporotic vertebrae, cross-vertebra differences beside the error
    featured = "AttMultiROI" if "<td>AttMultiROI</td>" in page else "Base"
    assert f"Seed 000 Fig. 5: {featured} at L1" in page and "Seed 000 Fig. 7: patient-level classification" in page
    assert "Seed 000 Fig. 8" in page and "<th>|T12−L1|</th>" in page and "<th>MAE L1</th>" in page
    for patient, reason in json.loads((results / "dataset" / "folds.json").read_text())["excluded"].items():
        assert html.escape(reason) in page, patient
    qc = pd.read_csv(results / "qc" / "patients.tsv", sep="\t", keep_default_na=False)
    for reason in qc[qc.status != "ok"].reason:
        assert html.escape(reason) in page
    # self-contained: every image is embedded, nothing is fetched
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) >= 10 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:|file:|/)', page)


def _render(page: str, path) -> tuple[int, int]:
    """(images, broken images) of ``page`` after load in headless Chromium."""
    path.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={path.parent / 'chromium-profile'}", "--virtual-time-budget=20000", "--dump-dom",
           path.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:2000]
    images = re.search(r'data-images="(\d+)"', body.group(0))
    broken = re.search(r'data-broken="(\d+)"', body.group(0))
    assert images and broken, body.group(0)
    return int(images.group(1)), int(broken.group(1))


def test_report_renders_in_headless_chromium_with_no_broken_image(virtual_run, tmp_path):
    if CHROMIUM is None:
        if os.geteuid() == 0:
            pytest.fail("chromium is missing: `make test` installs Debian's chromium package as root")
        pytest.skip("needs Debian's chromium package (make test installs it when run as root)")
    page = _page(virtual_run)
    images, broken = _render(page, tmp_path / "report.html")
    assert images == page.count("<img ") and images >= 10 and broken == 0, (images, broken)
    # the check can fail: one image's data cut short renders broken
    first = re.search(r'src="data:image/png;base64,([^"]{200})', page)
    damaged = page.replace(first.group(1), "A" * 200, 1)
    assert _render(damaged, tmp_path / "damaged.html") == (images, 1)


def test_snakemake_report_has_the_captions(virtual_run, tmp_path):
    """`snakemake --report` on the finished run: a page with the workflow description and the rules' captions."""
    from conftest import snakemake_run

    out = tmp_path / "snakemake_report.html"
    snakemake_run("--configfile", str(virtual_run["config"]), "--directory", str(virtual_run["work"]),
                  "--report", str(out), timeout=600)
    text = out.read_text(encoding="utf-8")
    for caption in ("One row per patient, stage and radiograph", "Held-out BMD agreement pooled over the 2",
                    "The self-contained HTML report of this run", "learned from CT"):
        assert caption in text, caption
    for category in ("Quality control", "Results", "Report"):
        assert category in text, category
