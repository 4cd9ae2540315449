"""Temperature scaling (Guo et al., 2017), optionally with one bias per output, and expected calibration error.

One scalar T divides every logit; it is fitted on validation logits by minimising the negative
log-likelihood, so it changes confidence but never the ranking (AUROC is unchanged). Class-weighted
training shifts every logit by roughly log(pos_weight), which no temperature can undo; the optional
bias b (z / T + b, Platt scaling for binary) does, and is still monotone per output."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _nll(z: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multiclass":
        return F.cross_entropy(z, y.long())
    target = y.reshape(z.shape)
    valid = ~torch.isnan(target)
    return F.binary_cross_entropy_with_logits(z[valid], target[valid])


def fit_temperature(logits: np.ndarray, y: np.ndarray, task: str, bias: bool = False):
    """logits [N, K] (binary K=1) at temperature 1, labels as the loss expects → T in [0.05, 20];
    with `bias`, returns (T, b[K]) for z / T + b. Multiclass biases are centred (softmax ignores a shift)."""
    z = torch.as_tensor(logits, dtype=torch.float64).reshape(len(logits), -1)
    yt = torch.as_tensor(y, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=bias)
    params = [log_t, b] if bias else [log_t]
    opt = torch.optim.LBFGS(params, lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(z / log_t.exp() + b, yt, task)
        loss.backward()
        return loss
    opt.step(closure)
    t = float(log_t.detach().exp().clamp(0.05, 20.0))
    if not bias:
        return t
    b = b.detach().numpy()
    return t, (b - b.mean() if task == "multiclass" else b)


def calibration_points(y: np.ndarray, P: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(correct, confidence) pairs: the positive class for binary, the top label for multiclass,
    every (patient, label) for multilabel."""
    if task == "binary":
        return y.astype(int), P[:, 1]
    if task == "multiclass":
        return (P.argmax(1) == y).astype(int), P.max(1)
    Y = np.asarray(y, dtype=float)
    ok = ~np.isnan(Y)
    return Y[ok].astype(int), P[ok]


def expected_calibration_error(y: np.ndarray, P: np.ndarray, task: str, n_bins: int = 15) -> float:
    """Bin-count-weighted mean |observed frequency - mean confidence| over equal-width bins."""
    from sklearn.calibration import calibration_curve

    correct, conf = calibration_points(y, P, task)
    if len(np.unique(correct)) < 2:
        return float(np.abs(correct.mean() - conf.mean()))
    frac, mean_conf = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    # Bin membership as calibration_curve assigns it (edges to the lower bin), empty bins dropped alike.
    edges = np.linspace(0.0, 1.0 + 1e-8, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], conf), minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts * np.abs(frac - mean_conf)) / counts.sum())
