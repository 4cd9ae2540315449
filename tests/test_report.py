"""Tests for explain.report.write_reports: files, links, escaping, strict JSON, and a headless-Chromium render."""
from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from explain.report import safe_name, write_reports
from explain.types import PatientExplanation

SCRIPT = "<script>alert(1)</script>"
MODEL_INFO = {"name": "synthetic-test-model", "model_dir": "/models/synthetic", "classes": ["negative", "positive"],
              "versions": {"torch": "2.14.1", "numpy": "2.4.6"}, "created": "2025-11-21T04:00:00Z"}


# -- test data ----------------------------------------------------------------------------------------------------
def _full_patient() -> PatientExplanation:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    gray = np.clip(0.3 + 0.5 * np.exp(-((yy - 20) ** 2 + (xx - 28) ** 2) / 60) + 0.03 * rng.standard_normal((48, 48)),
                   0, 1)
    gmap = np.exp(-((yy - 20) ** 2 + (xx - 28) ** 2) / 40) - 0.6 * np.exp(-((yy - 38) ** 2 + (xx - 10) ** 2) / 30)
    green = np.zeros((40, 48, 3))  # pure green: easy to find in the screenshot
    green[..., 1] = 1.0
    words = ["Chest", "radiograph:", "focal", "opacity", "right", "lower", "lobe", SCRIPT, "no", "effusion"]
    scores = [0.01, -0.02, 0.12, 0.45, 0.03, -0.01, 0.02, 0.0, -0.20, 0.05]
    return PatientExplanation(
        id="P/001 Müller ü", target="positive", probs={"negative": 0.18, "positive": 0.82}, pred="positive",
        method="ig", images=[green, gray], image_maps=[rng.normal(size=(40, 48)) * 0.1, gmap],
        words=words, word_scores=scores,
        features=["age", "crp", "sex", "smoking"], feature_values=["63", "87.5", "F", "former"],
        feature_scores=[0.05, 0.31, -0.02, -0.11],
        modality_share={"image": 0.45, "text": 0.35, "tabular": 0.20},
        modality_ablation={"image": 0.21, "text": 0.15, "tabular": -0.02},
        attention={"image": 0.5, "text": 0.3, "tabular": 0.2}, convergence_delta=0.0031)


def _tabular_only() -> PatientExplanation:
    return PatientExplanation(
        id="../../etc/passwd", target="positive", probs={"negative": 0.7, "positive": 0.3}, pred="negative",
        features=["age", "crp"], feature_values=["40", "nan"], feature_scores=[float("nan"), np.float32(-0.1)],
        modality_share={"tabular": 1.0}, convergence_delta=float("nan"))


def _text_only(pid: str) -> PatientExplanation:
    return PatientExplanation(id=pid, target="positive", probs={"negative": np.float64(0.4), "positive": 0.6},
                              pred="positive", words=["mild", "cough"], word_scores=[0.1, -0.3],
                              modality_share={"text": 1.0})


ERROR = "image file not found: /data/<b>x</b>.dcm"


@pytest.fixture(scope="module")
def explanations():
    return [_full_patient(), _tabular_only(),
            PatientExplanation(id="P003 failed", target="positive", error=ERROR),
            _text_only("dup"), _text_only("dup")]


@pytest.fixture(scope="module")
def reports(tmp_path_factory, explanations):
    import matplotlib

    backend = matplotlib.get_backend()
    out = tmp_path_factory.mktemp("reports")
    written = write_reports(explanations, out, model_info=MODEL_INFO)
    assert matplotlib.get_backend() == backend, "write_reports must not switch the global matplotlib backend"
    return out, written


# -- a tiny HTML parser -------------------------------------------------------------------------------------------
class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.words: list[dict] = []   # <span class="w ..."> in the report text
        self.rows: list[dict] = []    # index table rows
        self._word = None
        self._row = None
        self.text_parts: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        cls = (a.get("class") or "").split()
        if tag == "span" and "w" in cls:
            self._word = {**a, "text": ""}
        if tag == "tr" and ("ok" in cls or "error" in cls):
            self._row = {"class": cls, "text": "", "hrefs": []}
        if tag == "a" and self._row is not None:
            self._row["hrefs"].append(a.get("href"))

    def handle_endtag(self, tag):
        if tag == "span" and self._word is not None:
            self.words.append(self._word)
            self._word = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text_parts.append(data)
        if self._word is not None:
            self._word["text"] += data
        if self._row is not None:
            self._row["text"] += data

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def _page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def _pages(out: Path) -> list[Path]:
    return sorted(out.glob("*.html"))


def _rgba_alpha(style: str) -> float:
    m = re.search(r"rgba\(\s*\d+,\s*\d+,\s*\d+,\s*([0-9.]+)\)", style or "")
    return float(m.group(1)) if m else 0.0


def _no_nan(name):
    raise ValueError(f"non-strict JSON constant {name}")


# -- structure ----------------------------------------------------------------------------------------------------
def test_one_page_per_ok_patient_and_a_json_per_patient(reports, explanations):
    out, written = reports
    ok = [e for e in explanations if e.error is None]
    pages = sorted(out.glob("patient_*.html"))
    assert len(pages) == len(ok) == 4            # the duplicated id still gets its own page
    assert len(list((out / "attributions").glob("*.json"))) == len(explanations)
    assert (out / "index.html").is_file() and (out / "attributions.parquet").is_file()
    for rel, path in written.items():
        assert path == out / rel and path.is_file()
        assert path.resolve().is_relative_to(out.resolve())   # "../../etc/passwd" stays inside
    assert set(written) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_index_lists_every_patient_in_order_and_links_resolve(reports, explanations):
    out, _ = reports
    idx = _page(out / "index.html")
    assert len(idx.rows) == len(explanations)
    linked = []
    for row, e in zip(idx.rows, explanations):
        assert e.id in row["text"]
        if e.error is None:
            assert row["hrefs"] and len(row["hrefs"]) == 1
            target = out / row["hrefs"][0]
            assert target.is_file() and target.parent == out
            linked.append(target)
            assert e.pred in row["text"] and f"{e.probs[e.pred]:.3f}" in row["text"]
        else:
            assert row["hrefs"] == [] and "error" in row["class"]
            assert ERROR in row["text"]
    assert len(set(linked)) == 4
    assert "5 patients · 4 reports · 1 error" in idx.text
    # Error records get no page; the back links on the pages resolve too.
    assert not list(out.glob(f"patient_{safe_name('P003 failed')}*"))
    for page in linked:
        hrefs = [a["href"] for t, a in _page(page).tags if t == "a"]
        assert hrefs == ["index.html"]


def test_error_message_is_escaped_in_index(reports):
    out, _ = reports
    raw = (out / "index.html").read_text(encoding="utf-8")
    assert "&lt;b&gt;x&lt;/b&gt;" in raw and "<b>x</b>" not in raw


def test_pages_are_self_contained(reports):
    out, _ = reports
    for path in _pages(out):
        raw = path.read_text(encoding="utf-8")
        page = Page(raw)
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", raw, re.I), path.name
        assert not re.search(r"url\(|@import|@font-face", raw, re.I), path.name
        tags = {t for t, _ in page.tags}
        assert not tags & {"script", "link", "iframe", "object", "embed"}, path.name
        csp = [a.get("content", "") for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
        assert csp and "default-src 'none'" in csp[0] and "img-src data:" in csp[0]
        for t, a in page.tags:
            if t == "img":
                src = a["src"]
                assert src.startswith("data:image/png;base64,")
                assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
                assert a.get("alt")


def test_report_text_is_escaped_and_highlighted_by_strength(reports, explanations):
    out, _ = reports
    full = explanations[0]
    page_path = out / f"patient_{safe_name(full.id)}.html"
    raw = page_path.read_text(encoding="utf-8")
    assert SCRIPT not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "<script" not in raw.lower()
    page = Page(raw)
    assert [w["text"] for w in page.words] == full.words      # text content survives escaping unchanged
    alphas = [_rgba_alpha(w.get("style")) for w in page.words]
    strongest = int(np.argmax(np.abs(full.word_scores)))
    assert alphas[strongest] == max(alphas) and sorted(alphas)[-2] < alphas[strongest]
    assert "rgba(220, 38, 38" in page.words[strongest]["style"]                # positive = red
    neg = full.word_scores.index(-0.20)
    assert "rgba(37, 99, 235" in page.words[neg]["style"]                      # negative = blue
    assert page.words[strongest]["title"] == "attribution: +0.4500"
    for w, s in zip(page.words, full.word_scores):                           # opacity ∝ |score| / max|score|
        assert _rgba_alpha(w.get("style")) == pytest.approx(0.85 * abs(s) / 0.45, abs=2e-3)


def test_patient_page_content(reports, explanations):
    out, _ = reports
    full = explanations[0]
    page = _page(out / f"patient_{safe_name(full.id)}.html")
    text = " ".join(page.text.split())
    assert full.id in text and "Predicted class positive" in text
    for cls, p in full.probs.items():
        assert cls in text and f"{p:.3f}" in text
    assert "Integrated Gradients (ig)" in text and "0.0031" in text
    for key in ("synthetic-test-model", "/models/synthetic", "2025-11-21T04:00:00Z", "torch", "2.14.1"):
        assert key in text
    assert "45.0%" in text and "+0.210" in text and "50.0%" in text   # share, ablation drop, attention
    assert "crp" in text and "87.5" in text
    assert len([t for t, _ in page.tags if t == "img"]) == 3           # 2 image/overlay figures + feature chart
    assert "not available for this patient" not in text.lower()


def test_absent_modalities_are_labelled_not_charted(reports, explanations):
    out, _ = reports
    tab = explanations[1]
    page = _page(out / f"patient_{safe_name(tab.id)}.html")
    text = " ".join(page.text.split()).lower()
    assert text.count("not available for this patient") == 4   # image + text sections, 2 modality-table rows
    assert len([t for t, _ in page.tags if t == "img"]) == 1     # only the tabular chart
    raw = (out / f"patient_{safe_name(tab.id)}.html").read_text(encoding="utf-8")
    assert "<dt>Convergence delta</dt><dd>n/a</dd>" in raw     # NaN delta is shown as n/a, not "nan"


def test_model_modalities_limit_sections(tmp_path):
    e = _text_only("only-text")
    write_reports([e], tmp_path, model_info={"name": "m", "modalities": ["text"]})
    text = _page(tmp_path / f"patient_{safe_name(e.id)}.html").text
    assert "Report text" in text and "Images" not in text and "Tabular data" not in text


# -- machine-readable output --------------------------------------------------------------------------------------
def test_json_is_strict_and_round_trips(reports, explanations):
    out, _ = reports
    names = {}
    for e in explanations:
        path = out / "attributions" / f"{safe_name(e.id)}.json"
        if e.id == "dup":
            names.setdefault("dup", 0)
            names["dup"] += 1
            if names["dup"] == 2:
                path = out / "attributions" / f"{safe_name(e.id)}-2.json"
        d = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_nan)
        assert d["id"] == e.id and d["target"] == e.target and d["error"] == e.error
        assert d["probs"] == pytest.approx({k: float(v) for k, v in e.probs.items()})
        for got, want in zip(d["feature_scores"], e.feature_scores):
            assert (got is None) if math.isnan(want) else got == pytest.approx(float(want))
        assert d["word_scores"] == pytest.approx(e.word_scores)
        assert d["images"] == [list(np.shape(a)) for a in e.images]
        for got, want in zip(d["image_maps"], e.image_maps):
            assert np.allclose(np.asarray(got), want, atol=1e-6)
        delta = e.convergence_delta
        assert d["convergence_delta"] == (None if delta is None or math.isnan(delta) else pytest.approx(delta))


def test_parquet_has_one_row_per_patient(reports, explanations):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    out, _ = reports
    df = pd.read_parquet(out / "attributions.parquet")
    assert list(df["id"]) == [e.id for e in explanations]
    assert json.loads(df["probs"].iloc[0]) == pytest.approx(explanations[0].probs)
    assert df["share_image"].iloc[0] == pytest.approx(0.45)
    assert df["error"].iloc[2] == ERROR and pd.isna(df["error"].iloc[0])
    assert df["file"].is_unique


def test_safe_name():
    ids = ["P/001", "P 001", "p-001", "P-001", "Müller", "..", "", "患者", "a" * 300]
    names = [safe_name(i) for i in ids]
    assert len(set(n.lower() for n in names)) == len(ids)
    for n in names:
        assert re.fullmatch(r"[a-z0-9._-]+-[0-9a-f]{8}", n) and len(n) <= 49 and not n.startswith(".")
    assert safe_name("Müller").startswith("muller-") and safe_name("P/001") == safe_name("P/001")


# -- headless browser ---------------------------------------------------------------------------------------------
def _chromium() -> str:
    exe = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    if not exe:
        pytest.skip("chromium not installed: run .ci/install-browser")
    return exe


def _run_chromium(exe: str, tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--window-size=1200,1600",
           # without this the screenshot can be taken before every raster tile is painted (seen: 1 run in 3)
           "--run-all-compositor-stages-before-draw",
           *extra, url]
    env = {**os.environ, "HOME": str(tmp)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


def test_patient_page_renders_in_headless_chromium(reports, explanations, tmp_path):
    exe = _chromium()
    out, _ = reports
    page = out / f"patient_{safe_name(explanations[0].id)}.html"
    shot = tmp_path / "page.png"
    t0 = time.perf_counter()

    # 1. The page as written: screenshot + DOM after load; the page must log nothing (its CSP would report any
    #    attempted fetch or script as a console error).
    proc = _run_chromium(exe, tmp_path, page.as_uri(), f"--screenshot={shot}", "--dump-dom")
    assert not _console_lines(proc.stderr), _console_lines(proc.stderr)
    dom = proc.stdout
    assert "Predicted class" in dom and "synthetic-test-model" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script" not in dom.lower()

    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert px.shape == (1600, 1200, 3)
    assert px.std() > 20, "screenshot is (nearly) blank"
    assert (px > 245).all(axis=-1).mean() < 0.97, "screenshot is (nearly) all white"
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    green = ((g > 200) & (r < 60) & (b < 60)).sum()     # the pure-green test image, decoded and painted
    assert green > 5000, f"test image not visible in screenshot ({green} green pixels)"
    red = ((r > 190) & (g < 90) & (b < 90)).sum()       # the strongest word highlight / positive bars
    assert red > 200, f"no red attribution colour in screenshot ({red} pixels)"

    # 2. Same page with its CSP dropped and a probe script added: every <img> decoded (naturalWidth > 0), and the
    #    console capture used above works (the probe's log line must show up).
    probe = ("<script>window.addEventListener('load', () => { const im = [...document.images];"
             " const ok = im.filter(i => i.complete && i.naturalWidth > 0).length;"
             " document.body.setAttribute('data-img-check', ok + '/' + im.length);"
             " console.log('mmdx-probe ' + ok + '/' + im.length); });</script>")
    raw = page.read_text(encoding="utf-8")
    raw = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", raw)
    probed = tmp_path / "probed.html"
    probed.write_text(raw.replace("</body>", probe + "</body>"), encoding="utf-8")
    proc = _run_chromium(exe, tmp_path, probed.as_uri(), "--dump-dom")
    assert 'data-img-check="3/3"' in proc.stdout, re.findall(r'data-img-check="[^"]*"', proc.stdout)
    lines = _console_lines(proc.stderr)
    assert any("mmdx-probe 3/3" in ln for ln in lines), "console capture did not see the probe"
    assert not [ln for ln in lines if "mmdx-probe" not in ln], lines
    print(f"browser checks took {time.perf_counter() - t0:.1f} s")


def test_index_says_which_probability_is_which_and_captions_name_columns(tmp_path):
    """A benign nevus explained for melanoma must not read '0.996' beside 'explained class = melanoma'."""
    from explain.report import write_reports

    e = PatientExplanation(id="nevus", target="melanoma", probs={"benign": 0.996, "melanoma": 0.004}, pred="benign",
                           images=[np.full((16, 16), 0.5)], image_labels=["dermoscopic"],
                           image_maps=[np.ones((16, 16))], modality_share={"image": 1.0}, convergence_delta=0.9)
    written = write_reports([e], tmp_path / "r", model_info={**MODEL_INFO, "classes": ["benign", "melanoma"],
                                                               "modalities": ["image"]})
    index = written["index.html"]
    rows = _page(index).rows
    assert len(rows) == 1
    cells = " ".join(rows[0]["text"].split())
    assert "benign 0.996 melanoma 0.004" in cells  # predicted class, P(predicted), explained class, P(explained)
    head = index.read_text()
    assert "P(predicted)" in head and "P(explained class)" in head
    page = next(v for k, v in written.items() if k.startswith("patient_")).read_text()
    assert "dermoscopic (16×16" in page and "Image 1" not in page
    assert "poor: sizes are unreliable" in page  # |delta| 0.9 on the logit scale


def test_delta_quality_bands():
    from explain.report import delta_quality

    assert delta_quality(0.01)["level"] == "good" and delta_quality(-0.1)["level"] == "fair"
    assert delta_quality(0.5)["level"] == "poor" and delta_quality(None) is None and delta_quality(float("nan")) is None


def test_a_score_just_under_the_cut_off_reads_as_under_it_with_the_true_label(tmp_path):
    """A melanoma 0.018 under a screening cut-off was headlined 'not melanoma, probability 0.886'."""
    e = PatientExplanation(id="m1", target="melanoma", probs={"benign": 0.918, "melanoma": 0.082}, pred="benign",
                           threshold=0.1, label="melanoma", features=["age"], feature_values=["70"],
                           feature_scores=[0.2], modality_share={"tabular": 1.0},
                           modality_ablation={"image": 0.03, "tabular": -0.06})
    write_reports([e], tmp_path, model_info={"name": "m", "modalities": ["image", "tabular"]})
    page = _page(tmp_path / f"patient_{safe_name(e.id)}.html")
    text = " ".join(page.text.split())
    assert "P(melanoma) = 0.082, 0.018 below the operating point 0.100" in text
    assert "True label: melanoma" in text
    assert "not recorded in the model directory" in text         # no training date given: not the report's date
    raw = (tmp_path / f"patient_{safe_name(e.id)}.html").read_text(encoding="utf-8")
    bars = re.findall(r'<span class="(pos|neg|none)" style="width: ([\d.]+)%"></span>', raw)
    assert bars == [("neg", "50.0")]                               # the patient has no image: tabular only, largest


def test_effect_bars_share_one_signed_scale(tmp_path):
    e = _full_patient()
    write_reports([e], tmp_path, model_info=MODEL_INFO)
    raw = (tmp_path / f"patient_{safe_name(e.id)}.html").read_text(encoding="utf-8")
    bars = re.findall(r'<span class="(pos|neg|none)" style="width: ([\d.]+)%"></span>', raw)
    # image +0.21 (the largest: half the track), text +0.15, tabular -0.02
    assert bars == [("pos", "50.0"), ("pos", str(round(50 * 0.15 / 0.21, 2))), ("neg", str(round(50 * 0.02 / 0.21, 2)))]
    assert 'id="operating"' not in raw and "True label" in raw and "not in the records" in raw  # no cut-off stored


def test_drawn_maps_are_smoothed_and_the_json_keeps_the_raw_map(tmp_path):
    from explain.figures import SMOOTH_FRACTION, smooth_maps

    spike = np.zeros((2, 50, 60))
    spike[0, 20, 30], spike[1, 5, 7] = 1.0, -2.0
    out = smooth_maps(spike, SMOOTH_FRACTION)
    assert out.shape == spike.shape and out.dtype == spike.dtype
    assert np.unravel_index(np.argmax(out[0]), (50, 60)) == (20, 30) and out[0].max() < 0.2   # spread, not moved
    assert out[0].sum() == pytest.approx(1.0, abs=1e-4) and out[1].min() < 0 and (out[0] > 0.01).sum() > 9
    assert smooth_maps(spike, 0.0) is spike
    e = _full_patient()
    write_reports([e], tmp_path, model_info=MODEL_INFO)
    stored = json.loads((tmp_path / "attributions" / f"{safe_name(e.id)}.json").read_text())
    np.testing.assert_allclose(stored["image_maps"][1], np.asarray(e.image_maps[1], np.float32).round(6), atol=1e-6)
    assert f"smoothed (a Gaussian of σ = {100 * SMOOTH_FRACTION:.0f}% of the image side)" in _page(
        tmp_path / f"patient_{safe_name(e.id)}.html").text.replace("\n", " ")
