"""Federated training (multimodal.training.federated, site_counts; mmdx federate with Flower): the sites'
merged preprocessing is the pooled one, the hooks move and restore weights, FedProx pulls towards the
global weights, the server's validation numbers come from histograms exactly; and three simulated
sites for two rounds reach the pooled model's validation AUROC, each site's records in its own process."""
from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SYNTH_CONFIG, one_line_error, run_cli
from multimodal.config import load_config

# Text and labs only: a from-scratch CNN needs ~10 epochs on this cohort, these two learn in a few.
SMALL = {"modalities": ["text", "tabular"], "fusion.strategy": "joint", "fusion.layers": 1,
         "text.vocab_size": 200, "train.alone": {}, "train.epochs": 6, "train.min_epochs": 6}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """The synthetic cohort's training records in three sites by age tertile (non-IID in age, not in label)."""
    from multimodal.synth import make_cohort

    cohort = make_cohort(tmp_path_factory.mktemp("fedcohort"), n=1200, seed=1, _write_images=False)
    train = pd.read_csv(cohort["train"], dtype=str, keep_default_na=False, na_values=[""])
    tertile = pd.qcut(pd.to_numeric(train["age"]), 3, labels=False).fillna(0)  # no age: the first site
    paths = {}
    for k, name in enumerate(("north", "south", "west")):
        paths[name] = cohort["dir"] / f"site_{name}.csv"
        train[tertile == k].to_csv(paths[name], index=False)
    return {"cohort": cohort, "paths": paths}


def _cfg(**extra):
    return load_config(SYNTH_CONFIG, {**SMALL, **extra})


def _records(path, cfg):
    from multimodal.data.records import load_records

    return load_records(path, cfg, labels=True)


def test_merged_site_statistics_give_the_pooled_preprocessing_and_carry_no_record(sites):
    from multimodal.data.preprocess import Preprocessing
    from multimodal.training import site_counts

    cfg = _cfg()
    recs = [_records(p, cfg) for p in sites["paths"].values()]
    stats = [site_counts.site_statistics(cfg, r) for r in recs]
    merged = site_counts.agreed_preprocessing(cfg, stats)
    pooled = Preprocessing.fit(cfg, _records(sites["cohort"]["train"], cfg))
    assert merged.labels.classes == pooled.labels.classes
    np.testing.assert_allclose(merged.tabular.mean, pooled.tabular.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.tabular.std, pooled.tabular.std, rtol=1e-9)
    assert merged.tabular.vocab == pooled.tabular.vocab
    ours, theirs = set(merged.text.tokenizer.get_vocab()), set(pooled.text.tokenizer.get_vocab())
    assert len(ours & theirs) / len(ours | theirs) > 0.9  # words rare at every site stay out (site_counts)
    blob = json.dumps(stats)  # what would leave the sites: no id, no report, no word of fewer patients
    ids = pd.concat([r.df for r in recs])["patient_id"]
    assert not any(i in blob for i in ids)
    assert all(" " not in w for s in stats for w in s["words"])
    assert all(n >= cfg.text.min_doc_freq for s in stats for n in s["words"].values())


def _agreed_site(path, cfg, offset=0):
    from multimodal.training import site_counts
    from multimodal.training.federated import Site

    site = Site(cfg, _records(path, cfg), seed_offset=offset)
    prep = site_counts.agreed_preprocessing(cfg, [site.statistics()])
    counts = site.agree(prep, total_epochs=2)
    return site, counts


def test_hooks_move_train_and_restore_the_weights_and_evaluate_as_counts(sites):
    from multimodal.training import site_counts

    cfg = _cfg()
    site, counts = _agreed_site(sites["paths"]["north"], cfg)
    assert counts["n"] == len(site.y_train) and len(counts["positives"]) == 1
    start = site.get_state()
    assert start and all(v.dtype.kind == "f" for v in start.values())
    assert "temperature" not in start  # calibration is fitted after training, never averaged
    balance = site_counts.merged_class_balance([counts])
    out = site.train_steps(3, balance)
    assert out["num-examples"] > 0 and np.isfinite(out["train-loss"])
    moved = site.get_state()
    assert any(not np.array_equal(start[k], moved[k]) for k in start)
    site.set_state(start)
    assert all(np.array_equal(start[k], v) for k, v in site.get_state().items())
    ev = site.evaluate_site()
    hist = np.asarray(ev["histogram"]).reshape(1, 2, site_counts.BINS)
    assert ev["num-examples"] == len(site.y_val) == hist.sum()
    assert hist[0, 1].sum() == int(site.y_val.sum())  # positives in the label-1 row
    with pytest.raises(ValueError, match="do not fit"):
        site.set_state({k: v for k, v in list(start.items())[1:]})


def test_fedprox_term_keeps_a_site_nearer_the_global_weights(sites):
    from multimodal.training import site_counts

    cfg = _cfg()
    far, near = (_agreed_site(sites["paths"]["south"], cfg)[0] for _ in range(2))
    start = far.get_state()
    assert all(np.array_equal(start[k], v) for k, v in near.get_state().items())  # same seed, same start
    balance = [0.4]
    far.train_steps(6, balance)
    near.train_steps(6, balance, proximal_mu=50.0)

    def drift(site):
        return sum(float(((site.get_state()[k] - start[k]) ** 2).sum()) for k in start)

    assert drift(near) < 0.5 * drift(far)
    assert site_counts.merged_class_balance([{"n": 2, "positives": [1.0]}, {"n": 6, "positives": [1.0]}]) == [0.25]


def test_validation_from_summed_histograms_is_exact_at_bin_edges():
    from sklearn.metrics import roc_auc_score

    from multimodal.data.preprocess import Preprocessing
    from multimodal.evaluation.operating import choose
    from multimodal.training import site_counts

    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.4).astype(int)
    p = np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1)
    cfg = load_config(SYNTH_CONFIG, {**SMALL, "task.threshold": "youden"})
    prep = Preprocessing.from_state(cfg.model_copy(update={"modalities": []}), {"labels": {"classes": ["0", "1"]}},
                                    None)
    hists = [site_counts.histogram(y[:200], p[:200], "binary", 1), site_counts.histogram(y[200:], p[200:], "binary", 1)]
    assert np.array_equal(np.sum(hists, axis=0), site_counts.histogram(y, p, "binary", 1))
    edge = np.minimum(np.floor(p * site_counts.BINS), site_counts.BINS - 1) / site_counts.BINS
    v = site_counts.validation_from_histograms(hists, cfg, prep)
    assert v["n"] == 500
    assert v["auroc"] == pytest.approx(roc_auc_score(y, edge), abs=1e-12)
    assert v["thresholds"] == [pytest.approx(choose(y, edge, "youden"))]


def test_federate_mistakes_are_one_line(capsys, tmp_path, sites):
    a, b = (str(sites["paths"][n]) for n in ("north", "south"))
    out = tmp_path / "m"

    def fails(needle, *argv):
        code, _, err = run_cli(capsys, "federate", "--config", SYNTH_CONFIG, *argv, "--out", out)
        one_line_error(code, err, needle)

    fails("at least 2 sites", "--site", f"a={a}", "modalities=text,tabular", "fusion.strategy=joint")
    fails("NAME=RECORDS", "--site", a, "--site", f"b={b}")
    fails("fusion.strategy=joint", "--site", f"a={a}", "--site", f"b={b}")  # the synthetic config: one per modality
    fails("not a file", "--site", f"a={a}", "--site", f"b={tmp_path / 'none.csv'}", "fusion.strategy=joint")
    fails("given twice", "--site", f"a={a}", "--site", f"a={b}")
    assert not out.exists()


def _audited(log_dir: str):
    """A site process that notes, per process, each records file it reads and the ids of every patient
    table it holds after training and evaluating (any DataFrame with the id column, found by gc)."""
    from multimodal.federation import SiteWorker

    class AuditedSite(SiteWorker):
        def _note(self, what: str, ids) -> None:
            with open(Path(log_dir) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps({"what": what, "ids": sorted(set(map(str, ids)))}) + "\n")

        def load(self, records):
            rec = super().load(records)
            self._note(f"read {Path(records).name}", rec.df["patient_id"])
            return rec

        def evaluate(self, state):
            out = super().evaluate(state)
            held = [o for o in gc.get_objects() if isinstance(o, pd.DataFrame) and "patient_id" in o.columns]
            self._note("held", pd.concat([d["patient_id"] for d in held]) if held else [])
            return out

    return AuditedSite


def test_three_sites_two_rounds_match_pooled_training_and_keep_records_apart(sites, tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from multimodal import DiagnosisModel, federate

    cfg = _cfg()
    audit, home = tmp_path / "audit", tmp_path / "home"
    audit.mkdir()
    home.mkdir()
    scratch = Path(tempfile.mkdtemp(prefix="mfd", dir="/tmp"))  # short enough for Ray's sockets
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    try:
        fed = federate(cfg, sites["paths"], rounds=2, local_epochs=3, progress=False,
                       site_class=_audited(str(audit)))
        assert list(scratch.iterdir()) == []  # Ray's session folder is gone
    finally:
        shutil.rmtree(scratch)
    assert list(home.iterdir()) == []  # nothing under $HOME (Flower's folder is in mmdx's cache)
    fed.save(tmp_path / "fed")
    pooled = DiagnosisModel(cfg).fit(sites["cohort"]["train"], progress=False)  # 6 epochs: 2 rounds x 3
    val = sites["cohort"]["val"]
    auroc = {name: m.evaluate(val, n_boot=0)["overall"]["auroc"]["value"] for name, m in
             (("federated", DiagnosisModel.load(tmp_path / "fed")), ("pooled", pooled))}
    assert abs(auroc["federated"] - auroc["pooled"]) <= 0.03, auroc
    assert auroc["federated"] > 0.8, auroc
    pred = DiagnosisModel.load(tmp_path / "fed").predict(sites["cohort"]["test"])
    assert (pred["status"] == "ok").all()

    own = {f"site_{n}.csv": set(pd.read_csv(p, dtype=str)["patient_id"]) for n, p in sites["paths"].items()}
    processes = {}
    for f in audit.iterdir():
        notes = [json.loads(line) for line in f.read_text().splitlines()]
        reads = [n["what"].removeprefix("read ") for n in notes if n["what"].startswith("read ")]
        assert len(reads) == 1, reads  # one site per process
        seen = set().union(*(n["ids"] for n in notes))
        assert seen <= own[reads[0]], f"{reads[0]}'s process held {len(seen - own[reads[0]])} other patients"
        assert any(n["what"] == "held" for n in notes)
        processes[reads[0]] = int(f.stem)
    assert set(processes) == set(own) and os.getpid() not in processes.values()
