"""Temperature scaling and ECE against values known by construction."""
import numpy as np
import pytest

from multimodal.evaluation.calibration import expected_calibration_error, fit_temperature


@pytest.mark.parametrize("true_t", [0.5, 3.0])
def test_fit_temperature_recovers_known_miscalibration(true_t):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(float)  # calibrated at T=1
    t = fit_temperature((z * true_t)[:, None], y, "binary")  # logits scaled by true_t: T should undo it
    assert t == pytest.approx(true_t, rel=0.08)


def test_fit_temperature_multiclass():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (20000, 4))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])
    assert fit_temperature(z * 2.0, y, "multiclass") == pytest.approx(2.0, rel=0.08)


def test_ece_known_values():
    # every patient at confidence 0.8, half of them positive: ECE = |0.5 - 0.8| = 0.3
    P = np.tile([0.2, 0.8], (1000, 1))
    y = np.array([0, 1] * 500)
    assert expected_calibration_error(y, P, "binary") == pytest.approx(0.3, abs=1e-9)
    rng = np.random.default_rng(2)
    p = rng.random(50000)
    y = (rng.random(50000) < p).astype(int)
    assert expected_calibration_error(y, np.stack([1 - p, p], 1), "binary") < 0.01  # calibrated by construction
    sharp = np.clip((p - 0.5) * 3 + 0.5, 0, 1)  # overconfident
    assert expected_calibration_error(y, np.stack([1 - sharp, sharp], 1), "binary") > 0.1


def test_trained_model_is_calibrated_and_ranking_unchanged(tiny_model, cohort, tmp_path):
    t, b = tiny_model.metrics["training"]["temperature"], tiny_model.metrics["training"]["logit_bias"]
    assert float(tiny_model.net.temperature) == pytest.approx(t) and 0.05 <= t <= 20
    assert tiny_model.net.logit_bias.tolist() == pytest.approx(b)
    scaled = tiny_model.predict(cohort["test"]).prob_1.to_numpy()
    with tiny_model.uncalibrated():
        raw = tiny_model.predict(cohort["test"]).prob_1.to_numpy()
    assert tiny_model.predict(cohort["test"]).prob_1.to_numpy() == pytest.approx(scaled)  # restored
    assert (np.argsort(scaled) == np.argsort(raw)).all() and not np.allclose(scaled, raw)
    m = tiny_model.evaluate(cohort["test"], n_boot=20, plots_dir=tmp_path / "plots")
    assert 0 <= m["overall"]["ece"]["value"] <= 1
    for name in ("roc.png", "reliability.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_bias_undoes_class_weight_shift():
    # calibrated logits shifted by log(pos_weight)=log(4), as class weighting does: T alone cannot undo it
    rng = np.random.default_rng(3)
    z = rng.normal(-1.5, 1.5, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(float)
    shifted = (z + np.log(4.0))[:, None]
    t, b = fit_temperature(shifted, y, "binary", bias=True)
    assert t == pytest.approx(1.0, rel=0.08) and b[0] == pytest.approx(-np.log(4.0), abs=0.1)
    p_t = 1 / (1 + np.exp(-shifted[:, 0] / fit_temperature(shifted, y, "binary")))
    p_tb = 1 / (1 + np.exp(-(shifted[:, 0] / t + b[0])))
    ece = [expected_calibration_error(y, np.stack([1 - p, p], 1), "binary") for p in (p_t, p_tb)]
    assert ece[1] < 0.02 < ece[0]


def test_roc_axes_name_the_classes_not_an_encoded_label(tmp_path, monkeypatch):
    """With task.names the positive class is 'melanoma'; scikit-learn's default axis label said
    'Positive label: 1'."""
    from matplotlib.figure import Figure
    from multimodal.evaluation.plots import write_plots

    seen = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (
        seen.append((self.axes[0].get_title(), self.axes[0].get_xlabel())), save(self, *a, **k))[1])
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    write_plots(y, np.clip(y * 0.3 + rng.random(80) * 0.7, 0, 1), "binary", ["benign", "melanoma"], tmp_path)
    title, xlabel = seen[0]
    assert title == "ROC, melanoma against benign" and "Positive label" not in xlabel and "specificity" in xlabel
