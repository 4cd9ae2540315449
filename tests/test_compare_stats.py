"""`mmdx compare --test delong,mcnemar --margin M --by COLUMNS`: DeLong against published numbers and the
paired bootstrap, non-inferiority / superiority and McNemar on planted differences, subgroup tables
that find a planted weak group and warn on a tiny one, and the command line."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import one_line_error, run_cli
from multimodal.errors import UserError
from multimodal.evaluation.bootstrap import bootstrap_stats
from multimodal.evaluation.comparison import auroc, compare, format_report
from multimodal.evaluation.significance import delong, delong_difference, mcnemar

# pROC's `aSAH` data (Turck et al. 2010, Intensive Care Med 36:107): 113 patients after aneurysmal
# subarachnoid haemorrhage, outcome at 6 months (G good, P poor), the WFNS score and S100B (µg/l × 100).
ASAH_OUTCOME = ("GGGGPPGPGGPGPPGGPGPPPGPGGGGGGGGGPGGPPGPPGGGGGGGGGPPGGGPGGGPGPGGPPPGPPGPPPPGGGPPGPGGGGGGPGGGGGGGGGGG"
                "GPPPPPPGGGPGGG")
ASAH_WFNS = ("11113254125255125225211112121134214541425511241125521251222151125214524414121421232421451154221113125"
             "225552445111")
ASAH_S100B = ("13 14 10 4 13 10 47 16 18 10 12 10 44 71 4 8 49 4 7 33 9 9 7 11 7 17 7 11 13 19 5 16 41 14 34 35 48 9 "
              "96 25 50 46 16 7 43 45 11 8 9 86 52 8 6 13 207 10 14 15 7 6 77 5 9 30 3 9 4 23 70 9 27 71 8 26 8 16 "
              "9 13 10 8 11 33 11 28 7 10 32 22 7 5 24 38 10 15 8 14 10 7 4 19 56 14 58 32 82 74 15 47 17 44 15 50 48")


def test_delong_reproduces_procs_documented_asah_example():
    """pROC's manual: roc.test(wfns, s100b) on aSAH is Z = 2.209, p = 0.02718, AUROCs 0.8237 and 0.7314;
    ci.auc(s100b) is 0.6301-0.8326 (DeLong)."""
    y = np.array([c == "P" for c in ASAH_OUTCOME])
    wfns, s100b = np.array([int(c) for c in ASAH_WFNS]), np.array(ASAH_S100B.split(), dtype=float)
    assert len(y) == len(wfns) == len(s100b) == 113 and y.sum() == 41
    t = delong_difference(y, wfns, s100b)
    assert round(t["z"], 3) == 2.209 and round(t["p_two_sided"], 5) == 0.02718
    aucs, cov = delong(y, np.stack([wfns, s100b], 1))
    assert np.round(aucs, 4).tolist() == [0.8237, 0.7314]
    lo, hi = aucs[1] - 1.959964 * np.sqrt(cov[1, 1]), aucs[1] + 1.959964 * np.sqrt(cov[1, 1])
    assert (round(lo, 4), round(hi, 4)) == (0.6301, 0.8326)


def test_delong_variance_by_hand_with_a_tie():
    """Positives 0.8, 0.4 and negatives 0.4, 0.2: the four pairs score 1, 1, ½ (the tie), 1, so AUROC 7/8.
    Placements: per positive V10 = (1, ¾), per negative V01 = (¾, 1); each has sample variance 1/32, and
    DeLong's variance is 1/32 / 2 + 1/32 / 2 = 1/32."""
    aucs, cov = delong([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.2])
    assert aucs[0] == pytest.approx(7 / 8) and cov[0, 0] == pytest.approx(1 / 32)


def _pair(n, seed=0, scramble=0.0, weak_in=None):
    """Labels and two prediction files: `other` sees the label through noise; `reference` is `other` with a
    share `scramble` of its scores replaced by noise (a planted AUROC loss), or pure noise where `weak_in`."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    labels = pd.DataFrame({"patient_id": [f"P{i:04d}" for i in range(n)], "label": y,
                           "sex": np.where(rng.random(n) < 0.5, "F", "M"),
                           "site": np.where(np.arange(n) < 6, "rare", np.where(rng.random(n) < 0.5, "head", "trunk"))})
    good = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1, n))))
    ref = np.where(rng.random(n) < scramble, rng.random(n), good)
    if weak_in is not None:
        ref = np.where(weak_in(labels), rng.random(n), ref)

    def frame(p):
        return pd.DataFrame({"id": labels["patient_id"], "prob_0": 1 - p, "prob_1": p, "pred": (p >= 0.5).astype(int),
                             "status": "ok"})
    return labels, frame(ref), frame(good)


def test_delong_variance_agrees_with_the_paired_bootstrap_within_10_percent():
    labels, ref, other = _pair(600, scramble=0.3)
    r = compare({"ref": ref, "other": other}, labels, n_boot=2000, tests=["delong"])
    t = r["comparisons"][0]["delong"]
    assert t["value"] == pytest.approx(r["comparisons"][0]["value"]) and t["value"] < -0.05
    assert abs(t["bootstrap_se"] ** 2 / t["se"] ** 2 - 1) < 0.10
    y = labels["label"].to_numpy()
    S = np.stack([ref["prob_1"], other["prob_1"]], 1)
    _, cov = delong(y, S)
    boots = bootstrap_stats(y, lambda idx: {j: auroc(y[idx, None], S[idx, j:j + 1]) for j in range(2)}, 2000)
    for j in range(2):  # each AUROC's variance too, not only the difference's
        assert abs(np.var(boots[j], ddof=1) / cov[j, j] - 1) < 0.10


@pytest.mark.parametrize("scramble, margin, non_inferior", [(0.05, 0.05, True), (0.4, 0.05, False)])
def test_non_inferiority_on_planted_losses(scramble, margin, non_inferior):
    """The reference loses a little of its signal (within the margin: non-inferior) or much (beyond it: not)."""
    labels, ref, other = _pair(1000, scramble=scramble)
    c = compare({"ref": ref, "other": other}, labels, n_boot=500, margin=margin, tests=["delong"])["comparisons"][0]
    t = c["margin"]["non_inferiority"]
    assert t["hypothesis"] == f"AUROC(ref) - AUROC(other) > -{margin:g}, one-sided at 2.5%"
    assert c["value"] < 0 and t["lower_95"] == c["ci95"][0] and t["bound"] == -margin
    assert t["shown"] is non_inferior and t["delong_shown"] is non_inferior
    assert (t["p_bootstrap"] < 0.025) is non_inferior and (t["p_delong"] < 0.025) is non_inferior
    assert c["margin"]["superiority"]["shown"] is False


@pytest.mark.parametrize("scramble, superior", [(0.4, True), (0.03, False)])
def test_superiority_at_a_margin_on_planted_gains(scramble, superior):
    """The reference is the better file, by much (superior at 0.02) or by less than the margin (not shown),
    though in the second case it may still be better than 0: the margin is what is tested."""
    labels, worse, better = _pair(1000, scramble=scramble)
    r = compare({"better": better, "worse": worse}, labels, n_boot=500, margin=0.02)
    c = r["comparisons"][0]
    assert c["value"] > 0 and c["margin"]["superiority"]["shown"] is superior
    assert c["margin"]["non_inferiority"]["shown"] is True
    assert ("better is superior to worse" in format_report(r)) is superior


def test_mcnemar_on_a_planted_two_by_two():
    """15 records right only by a, 5 only by b: exact two-sided p = 2 · P(Binomial(20, ½) ≤ 5) = 21700 / 2^19."""
    want = 21700 / 2 ** 19
    a = np.r_[np.ones(15), np.zeros(5), np.ones(30), np.zeros(10)].astype(bool)
    b = np.r_[np.zeros(15), np.ones(5), np.ones(30), np.zeros(10)].astype(bool)
    t = mcnemar(a, b)
    assert (t["a_right_b_wrong"], t["b_right_a_wrong"], t["both_right"], t["both_wrong"]) == (15, 5, 30, 10)
    assert t["p_exact"] == pytest.approx(want, rel=1e-12) and mcnemar(a, a)["p_exact"] == 1
    # the same table from prediction files, decided at their operating points: a pred column cut at 0.7,
    # read back as the lowest probability it calls positive (0.9: the same decisions)
    y = np.random.default_rng(0).permutation(np.r_[np.ones(30), np.zeros(30)].astype(int))
    labels = pd.DataFrame({"patient_id": range(60), "label": y})

    def frame(right):
        p = np.where(right == (y == 1), 0.9, 0.6)  # called positive where right on a positive or wrong on a negative
        return pd.DataFrame({"id": range(60), "prob_0": 1 - p, "prob_1": p, "pred": (p >= 0.7).astype(int)})
    r = compare({"a": frame(a), "b": frame(b)}, labels, n_boot=20, tests=["mcnemar"])
    m = r["comparisons"][0]["mcnemar"]
    assert (m["a_right_b_wrong"], m["b_right_a_wrong"]) == (15, 5) and m["p_exact"] == pytest.approx(want)
    assert r["operating_points"]["a"] == {"threshold": 0.9, "from": "the file's pred column"}
    assert m["accuracy_a"] == pytest.approx(45 / 60) and m["accuracy_b"] == pytest.approx(35 / 60)


def test_subgroups_find_a_planted_weak_group_and_warn_on_a_tiny_one():
    labels, ref, other = _pair(600, weak_in=lambda lab: lab["sex"] == "F")
    r = compare({"ref": ref, "other": other}, labels, n_boot=300, by=["sex", "site"])
    sex = {e["value"]: e for e in r["subgroups"]["sex"]}
    f, m = sex["F"]["models"]["ref"]["auroc"], sex["M"]["models"]["ref"]["auroc"]
    assert 0.4 < f["value"] < 0.6 and f["ci95"][1] < m["ci95"][0]  # the planted weak group
    assert sex["F"]["differences"][0]["ci95"][1] < 0 and sex["M"]["differences"][0]["value"] == 0
    # sensitivity and specificity at the file's operating point (its pred column: 0.5), by hand
    men = (labels["sex"] == "M").to_numpy()
    y, p = labels["label"].to_numpy(), ref["prob_1"].to_numpy()
    assert sex["M"]["models"]["ref"]["sensitivity"]["value"] == pytest.approx((p[men & (y == 1)] >= 0.5).mean())
    assert sex["M"]["models"]["ref"]["specificity"]["value"] == pytest.approx((p[men & (y == 0)] < 0.5).mean())
    assert sex["M"]["n"] == men.sum() and sex["M"]["counts"]["positives"] == (y[men] == 1).sum()
    site = {e["value"]: e for e in r["subgroups"]["site"]}
    assert site["rare"]["n"] == 6 and site["rare"]["too_small"] and not site["head"]["too_small"]
    assert len(r["subgroup_warnings"]) == 1 and r["subgroup_warnings"][0].startswith("site=rare: positives")
    text = format_report(r)
    assert "warning: site=rare" in text and "subgroups by sex: AUROC, sensitivity, specificity" in text


def test_subgroups_of_a_missing_value_and_of_too_many_values():
    labels, ref, other = _pair(200)
    labels.loc[:29, "sex"] = np.nan
    r = compare([ref, other], labels, n_boot=50, by=["sex"])
    assert [e["value"] for e in r["subgroups"]["sex"]] == ["F", "M", "(missing)"]
    with pytest.raises(UserError, match="--by patient_id: 200 different values"):
        compare([ref, other], labels, n_boot=10, by=["patient_id"])


@pytest.mark.parametrize("kwargs, needle", [
    ({"tests": ["wilcoxon"]}, "--test wilcoxon: choose from delong, mcnemar"),
    ({"margin": 1.5}, "--margin 1.5: an AUROC margin is between 0 and 1"),
    ({"by": ["scanner"]}, "no column 'scanner'"),
])
def test_mistakes_are_user_errors(kwargs, needle):
    labels, ref, other = _pair(60)
    with pytest.raises(UserError, match=needle):
        compare([ref, other], labels, n_boot=10, **kwargs)


def test_delong_needs_one_class_of_a_multiclass_task():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    P = rng.dirichlet(np.ones(3), 90)
    labels = pd.DataFrame({"patient_id": range(90), "label": np.array(list("abc"))[y]})
    pa = pd.DataFrame({"id": range(90), **{f"prob_{c}": P[:, j] for j, c in enumerate("abc")}})
    with pytest.raises(UserError, match="give --positive"):
        compare([pa, pa.copy()], labels, n_boot=10, tests=["delong"])
    r = compare([pa, pa.copy()], labels, n_boot=10, tests=["delong", "mcnemar"], positive="b")
    assert r["comparisons"][0]["delong"]["value"] == 0 and r["comparisons"][0]["mcnemar"]["p_exact"] == 1


# -- the command line: one command each ------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    labels, ref, other = _pair(300, scramble=0.3, weak_in=lambda lab: lab["sex"] == "F")
    labels.to_csv(tmp_path / "test.csv", index=False)
    ref.to_csv(tmp_path / "fusion.csv", index=False)
    other.to_csv(tmp_path / "text_only.csv", index=False)
    return tmp_path


@pytest.mark.parametrize("option, printed, key", [
    (["--test", "delong"], "DeLong's test (records taken as independent)", "delong"),
    (["--test", "mcnemar"], "McNemar's exact test of the decisions at each file's operating point", "mcnemar"),
    (["--margin", "0.02"], "non-inferiority at margin 0.02 (H1: AUROC(reference) - AUROC(other) > -0.02", "margin"),
    (["--by", "sex,site"], "subgroups by site:", "subgroups"),
])
def test_cli_one_command_each(capsys, files, option, printed, key):
    code, out, err = run_cli(capsys, "compare", files / "fusion.csv", files / "text_only.csv", "--labels",
                             files / "test.csv", "--n-boot", 100, *option, "--out", files / "r.json")
    assert code == 0, err
    assert printed in out and "fusion - text_only" in out
    r = json.loads((files / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert key in r["comparisons"][0] or key in r
    if key == "subgroups":
        assert list(r["subgroups"]) == ["sex", "site"] and "warning: site=rare" in out


@pytest.mark.parametrize("option, needle", [
    (["--test", "delong,bogus"], "--test bogus: choose from"), (["--by", "nope"], "no column 'nope'"),
    (["--margin", "-0.1"], "--margin -0.1"),
])
def test_cli_mistakes_are_one_line(capsys, files, option, needle):
    code, _, err = run_cli(capsys, "compare", files / "fusion.csv", files / "text_only.csv", "--labels",
                           files / "test.csv", "--n-boot", 10, *option)
    one_line_error(code, err, needle)


def test_delong_says_when_records_share_patients():
    """DeLong takes records as independent; where a patient has several, the output says to read the bootstrap."""
    labels, ref, other = _pair(200, scramble=0.3)
    labels["patient"] = labels.index // 2
    r = compare([ref, other], labels, n_boot=50, tests=["delong"], group_column="patient")
    assert r["delong_note"].startswith("200 records of 100 patients") and "note: 200 records" in format_report(r)
    assert "delong_note" not in compare([ref, other], labels, n_boot=50, tests=["delong"])
