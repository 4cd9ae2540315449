"""The real-data benchmark harness: its statistics on planted differences, and `--quick` end to end."""
import json
import sys

import numpy as np
import pytest

from conftest import REPO, SYNTH_CONFIG, shared

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_stats as st  # noqa: E402


def _planted(n=400, seeds=3):
    rng = np.random.default_rng(0)
    y = (rng.random(n) < 0.4).astype(int)

    def model(signal):
        return [1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1, n)))) for _ in range(seeds)]
    return y, {"strong": model(1.5), "weak": model(0.3)}


def test_paired_bootstrap_finds_a_planted_gap_and_none_between_identical_models():
    y, v = _planted()
    v["strong again"] = [p.copy() for p in v["strong"]]
    boots = st.bootstrap(y, v, n_boot=200)
    gap = st.paired_difference(y, v, boots, "strong", "weak")
    assert gap["ci95"][0] > 0.1 and gap["p_le_0"] == 0.0
    same = st.paired_difference(y, v, boots, "strong", "strong again")
    assert same["value"] == 0 and same["ci95"] == [0.0, 0.0]
    s = st.summarise(y, v, boots)
    lo, hi = s["strong"]["auroc"]["ci95"]
    assert lo < s["strong"]["auroc"]["value"] < hi and len(s["strong"]["auroc"]["per_seed"]) == 3


def test_ece_floor_is_the_noise_of_a_calibrated_model_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = st.ece_floor(rng.random(60)), st.ece_floor(rng.random(6000))
    assert 0.05 < small < 0.2 and large < 0.03


def _run(tmp_path, *args):
    import real_data
    import torch

    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    try:  # main() sets torch's thread count for the process; later tests must not inherit it
        assert real_data.main(["--quick", "--out", str(out), "--n-boot", "50", "--threads", str(threads), *args]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "results.json").read_text()), (out / "BENCHMARKS.md").read_text(), out


def test_quick_benchmark_medpix2(tmp_path):
    shared("medpix2")
    # configs/medpix2.yaml leaves its images out (no signal in them); the override keeps every image path
    # of the harness covered, and shows an override choosing the variants and baselines
    # (auto leaves out: it is the joint network plus the unimodal ensemble's, both covered here)
    report, md, out = _run(tmp_path, "--datasets", "medpix2", "--override", "modalities=image,text,tabular",
                           "--variants", "attention,concat,unimodal ensemble,image only,text only,tabular only")
    d = report["datasets"][0]
    singles = ["image only", "text only", "tabular only"]
    assert {"attention", "concat", "unimodal ensemble", "mean of single-modality models", *singles} <= set(d["summary"])
    assert {(c["a"], c["b"]) for c in d["comparisons"]} >= {
        ("unimodal ensemble", "mean of single-modality models"), ("unimodal ensemble", d["best_baseline"])}
    assert sum(r["variant"] == "attention" for r in d["runs"]) == 2 and report["seeds"] == [0, 1]
    assert d["best_single"] in singles and d["comparisons"][1]["b"] == d["best_single"]
    baselines = [v for v in d["summary"] if v.startswith("baseline: ")]
    assert {"baseline: TF-IDF + LR (text)", "baseline: LR (image features)", "baseline: mean of baselines",
            "baseline: LR stack (CV)"} <= set(baselines)
    assert d["comparisons"][0]["a"] == "attention" and d["comparisons"][0]["b"] == d["best_baseline"]
    assert d["best_baseline"] == max(baselines, key=lambda v: d["summary"][v]["auroc"]["value"])
    for m in ("image", "text", "tabular"):  # missing-modality robustness of the fused model
        assert f"attention, without {m}" in d["summary"] and f"attention, {m} kept" in d["summary"]
    assert d["throughput"]["n_cli"] == 67  # every validation row predicted by `mmdx predict`
    for p in d["plots"]:
        assert (out / p).read_bytes()[:4] == b"\x89PNG"
    for v in ("attention", "concat", *singles):
        assert f"| {v} | " in md
    assert "attention − " + d["best_single"] in md and "quick mode" in md
    assert "| TF-IDF + LR (text) | " in md  # the baselines' table
    assert len(list((out / "runs").glob("*.json"))) == 12  # 6 variants x 2 seeds, kept for resuming


def test_quick_benchmark_grouped_cv_predicts_every_patient_once(tmp_path):
    shared("iu_xray")
    # one variant: the pooling of folds is what is tested here (CI time: the four variants took 150 s)
    report, md, _ = _run(tmp_path, "--datasets", "iu_xray", "--cv", "2", "--seeds", "0", "--variants", "attention")
    d = report["datasets"][0]
    assert d["n_eval"] == 300 and "2-fold" in d["split"]  # 200 train + 100 val pooled
    assert len([r for r in d["runs"] if r["variant"] == "attention"]) == 2  # one per fold
    assert np.isfinite(d["summary"]["attention"]["auroc"]["value"])  # no patient left unpredicted (NaN)
    assert "2-fold grouped CV" in md


def test_a_cached_run_is_reused_only_for_the_same_config_and_code(cohort, tmp_path, monkeypatch):
    """The harness keeps each run's predictions to skip it on a rerun; a run of another config or of
    other engine code must be trained again, not reported as if it were of this one."""
    import real_data
    from multimodal import DiagnosisModel

    cfg = SYNTH_CONFIG
    ov = {"modalities": "tabular", "train.epochs": 1}
    fits = []
    fit = DiagnosisModel.fit
    monkeypatch.setattr(DiagnosisModel, "fit", lambda self, *a, **k: fits.append(1) or fit(self, *a, **k))
    cache = tmp_path / "runs" / "synthetic__tabular__s0__val"
    first = real_data.train_one(cfg, ov, cohort["train"], cohort["test"], cache)
    again = real_data.train_one(cfg, ov, cohort["train"], cohort["test"], cache)
    assert len(fits) == 1 and np.array_equal(first["preds"]["calibrated"], again["preds"]["calibrated"])
    real_data.train_one(cfg, ov | {"train.seed": 1}, cohort["train"], cohort["test"], cache)  # another config
    assert len(fits) == 2
    monkeypatch.setattr(real_data, "ROOT", tmp_path)  # other engine sources: here, none at all
    (tmp_path / "multimodal").mkdir()
    (tmp_path / "multimodal" / "changed.py").write_text("x = 1\n")
    real_data.train_one(cfg, ov | {"train.seed": 1}, cohort["train"], cohort["test"], cache)
    assert len(fits) == 3


def test_update_replaces_only_the_rerun_dataset_and_refuses_a_differently_run_report(tmp_path):
    from bench_report import previous_report, updated

    def report(names, seconds, seeds=(0,)):
        return {"command": "python benchmarks/real_data.py", "quick": False, "seeds": list(seeds), "n_boot": 1000,
                "overrides": {}, "seconds": sum(seconds), "environment": {"cpu": "x"},
                "datasets": [{"dataset": n, "seconds": s, "auroc": n + " old"} for n, s in zip(names, seconds)]}

    old = report(["ham10000", "medpix2", "iu_xray"], [2800.0, 490.0, 240.0])
    new = report(["medpix2"], [600.0])
    new["datasets"][0]["auroc"] = "medpix2 new"
    merged = updated(old, new)
    assert [d["dataset"] for d in merged["datasets"]] == ["ham10000", "medpix2", "iu_xray"]  # order kept
    assert [d["auroc"] for d in merged["datasets"]] == ["ham10000 old", "medpix2 new", "iu_xray old"]
    assert merged["seconds"] == 2800.0 + 600.0 + 240.0 and merged["command"] == old["command"]
    assert merged["updates"][0]["datasets"] == ["medpix2"]
    (tmp_path / "results.json").write_text(json.dumps(old))
    settings = dict(quick=False, seeds=[0], n_boot=1000, overrides={})
    assert previous_report(tmp_path / "results.json", **settings) == old
    with pytest.raises(SystemExit, match="seeds"):
        previous_report(tmp_path / "results.json", **(settings | {"seeds": [0, 1]}))
    with pytest.raises(SystemExit, match="no .*results.json"):
        previous_report(tmp_path / "missing" / "results.json", **settings)


def test_a_regenerated_report_states_the_date_of_its_run_not_of_the_regeneration(tmp_path):
    """--report-only rewrites BENCHMARKS.md from a kept results.json, maybe days later: the date is the run's."""
    from bench_report import write_markdown

    kept = json.loads((REPO / "benchmarks" / "results" / "results.json").read_text())
    kept["date"] = "2001-02-03"
    md = write_markdown(kept, tmp_path / "BENCHMARKS.md", plots_base=REPO / "benchmarks" / "results").read_text()
    assert "- Run: 2001-02-03, " in md
