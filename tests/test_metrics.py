import numpy as np

from multimodal.evaluation.metrics import compute_metrics, format_table


def test_perfect_and_random_binary():
    y = np.array([0, 1] * 50)
    perfect = compute_metrics(y, y * 0.8 + 0.1, "binary", ["neg", "pos"], n_boot=50)
    assert perfect["overall"]["auroc"]["value"] == 1.0 and perfect["overall"]["accuracy"]["value"] == 1.0
    rng = np.random.default_rng(0)
    noise = compute_metrics(rng.integers(0, 2, 400), rng.random(400), "binary", ["neg", "pos"], n_boot=100)
    lo, hi = noise["overall"]["auroc"]["ci95"]
    assert lo < 0.5 < hi and hi - lo < 0.2
    from multimodal.evaluation.metrics import _fmt

    assert format_table(noise).count(_fmt(noise["overall"]["auroc"])) == 1  # not repeated per class


def test_calibration_error_interval_holds_its_own_value():
    """A resample's calibration error sits above the sample's (fewer points per bin, more noise counted
    as miscalibration): on well-calibrated scores the plain percentile interval left the value out."""
    from multimodal.evaluation.bootstrap import ci95
    from multimodal.evaluation.calibration import expected_calibration_error

    rng = np.random.default_rng(1)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(int)
    m = compute_metrics(y, p, "binary", ["neg", "pos"], n_boot=200)
    ece = m["overall"]["ece"]
    lo, hi = ece["ci95"]
    assert lo <= ece["value"] <= hi and lo >= 0
    plain = ci95([expected_calibration_error(y[i], np.stack([1 - p[i], p[i]], 1), "binary")
                  for i in (rng.integers(0, 300, 300) for _ in range(200))])
    assert plain[0] > ece["value"]  # the case the shift mends


def test_ci_brackets_point_estimate_multiclass():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    P = rng.dirichlet([1, 1, 1], 300)
    P[np.arange(300), y] += 0.3
    P /= P.sum(1, keepdims=True)
    m = compute_metrics(y, P, "multiclass", ["a", "b", "c"], n_boot=100)
    for k in ("auroc", "auprc", "f1", "accuracy"):
        s = m["overall"][k]
        assert s["ci95"][0] - 1e-9 <= s["value"] <= s["ci95"][1] + 1e-9 and s["ci95"][1] - s["ci95"][0] > 0.01
    assert set(m["per_class"]) == {"a", "b", "c"} and m["per_class"]["a"]["support"] == int((y == 0).sum())
    assert "AUROC" in format_table(m)
