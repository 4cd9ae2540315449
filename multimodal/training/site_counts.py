"""Federated training: what leaves a site (counts), and what the server makes of them.

No record, report or image leaves a site. Besides the network's weights (multimodal.training.federated),
a site sends only these counts, as JSON:
- its label values (class names), and how many of its training patients are in each class;
- per numeric lab: n, sum and sum of squares; per categorical column: the patient count of each value
  that at least tabular.min_category_count of the site's patients have;
- per word of its reports: how often it occurs, without the words that text.min_doc_freq (and with
  text.scrub, the identifier and name rules) keep out of the vocabulary at that site;
- for validation: per output, a histogram of its hold-out patients' predicted probabilities in BINS
  equal bins, by true label.

Why merged statistics rather than preprocessing fitted on one site: the scaler statistics and the
category lists are then exactly those of the pooled records (sums add up), and the vocabulary is learnt
from every site's words, so the other sites' reports are not read through a vocabulary that never saw
them. The privacy thresholds hold per site, before anything is sent, so a value or word that is rare
at every site but common overall stays out (where pooled preprocessing would keep it).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from multimodal.config import Config
from multimodal.data.preprocess import Preprocessing
from multimodal.data.preprocess.labels import LabelEncoder
from multimodal.data.preprocess.tabular import TabularPreprocessor
from multimodal.data.preprocess.text import TextPreprocessor
from multimodal.data.records import Records
from multimodal.data.splits import patients
from multimodal.errors import UserError
from multimodal.evaluation.metrics import onehot, point_metrics, prob_matrix
from multimodal.evaluation.operating import thresholds_for

BINS = 100  # validation histograms: probabilities in steps of 0.01


def site_statistics(cfg: Config, train: Records) -> dict:
    """One site's preprocessing counts (module docstring), from its training records."""
    df, who = train.df, patients(train.df, cfg)
    stats = {"label_values": LabelEncoder(cfg.task).values(df), "n": len(df)}
    if "tabular" in cfg.modalities:
        stats["tabular"] = TabularPreprocessor(cfg.tabular).site_statistics(df, who)
    if "text" in cfg.modalities and not _pretrained_text(cfg):
        stats["words"] = TextPreprocessor.site_word_counts(df[cfg.text.column].tolist(), cfg.text, who)
    return stats


def _pretrained_text(cfg: Config) -> bool:
    return cfg.text.encoder == "hf" and bool(cfg.text.pretrained)


def agreed_preprocessing(cfg: Config, sites: list[dict]) -> Preprocessing:
    """The preprocessing every site encodes its records with, from the sites' site_statistics: label
    classes united, scaler statistics and categories merged, the vocabulary learnt from the summed word
    counts. What needs no data (image statistics, a pretrained tokenizer) comes as Preprocessing.fit
    makes it."""
    values = sorted({v for s in sites for v in s["label_values"]})
    frame = pd.DataFrame({cfg.data.id: range(len(values)), LabelEncoder(cfg.task).columns[0]: values})
    if cfg.data.group:
        frame[cfg.data.group] = None
    prep = Preprocessing.fit(cfg.model_copy(update={"modalities": _without_data(cfg)}),
                             Records(frame, root=None, source="the sites' label values"))
    if "tabular" in cfg.modalities:
        prep.tabular = TabularPreprocessor.from_site_statistics(cfg.tabular, [s["tabular"] for s in sites])
    if "words" in sites[0]:
        counts: dict[str, int] = {}
        for s in sites:
            for w, n in s["words"].items():
                counts[w] = counts.get(w, 0) + n
        prep.text = TextPreprocessor.from_word_counts(counts, cfg.text)
    return prep


def _without_data(cfg: Config) -> list[str]:
    """The modalities whose preprocessing Preprocessing.fit makes without reading records."""
    return [m for m in cfg.modalities if m == "image" or (m == "text" and _pretrained_text(cfg))]


def class_balance_counts(y: np.ndarray, task: str, k: int) -> dict:
    """A site's labelled patients per output (binary, multilabel: positives; multiclass: per class)."""
    Y = onehot(y, task, k) if task == "multiclass" else (y[:, None] if task == "binary" else np.nan_to_num(y))
    return {"n": int(len(y)), "positives": Y.sum(0).astype(float).tolist()}


def merged_class_balance(sites: list[dict]) -> list[float]:
    """What training.loop.class_balance gives on the pooled labels, from the sites' counts."""
    n = sum(s["n"] for s in sites)
    if not n:
        raise UserError("no site has labelled training records")
    return (np.sum([s["positives"] for s in sites], axis=0) / n).tolist()


def histogram(y: np.ndarray, probs: np.ndarray, task: str, k: int) -> list[int]:
    """Per output, per true label (0, 1), how many scored patients fall in each probability bin:
    [k, 2, BINS] flattened. Unscored rows (NaN) and unlabelled outputs are left out."""
    P = np.asarray(probs, np.float64).reshape(len(y), -1)  # binary: the positive class's, [N, 1]
    Y = y.reshape(len(y), -1).astype(float) if task != "multiclass" else onehot(y, task, k).astype(float)
    counts = np.zeros((P.shape[1], 2, BINS), np.int64)
    for j in range(P.shape[1]):
        ok = np.isfinite(P[:, j]) & np.isfinite(Y[:, j])
        b = np.clip((P[ok, j] * BINS).astype(int), 0, BINS - 1)
        np.add.at(counts[j], (Y[ok, j].astype(int), b), 1)
    return counts.ravel().tolist()


def validation_from_histograms(hists: list[list[int]], cfg: Config, prep: Preprocessing) -> dict:
    """Validation metrics and the operating point from the sites' summed histograms. Each patient
    stands at its bin's lower edge, so a threshold chosen here (task.threshold's rule) is a bin edge that
    splits the patients exactly as it says; AUROC counts two patients in one bin as a tie."""
    k = prep.labels.num_outputs
    counts = np.sum([np.asarray(h, np.int64).reshape(k, 2, BINS) for h in hists], axis=0)
    edges = np.arange(BINS) / BINS
    out, cuts = {"n": int(counts[0].sum()), "bins": BINS}, []
    for j in range(k):
        y = np.repeat(np.r_[np.zeros(BINS, int), np.ones(BINS, int)], counts[j].ravel())
        p = np.repeat(np.r_[edges, edges], counts[j].ravel())
        both = 0 < y.sum() < len(y)
        out[f"auroc/{j}"] = point_metrics(onehot(y, "binary", 2), prob_matrix(p, "binary"), "binary")["auroc"] \
            if both else float("nan")
        if cfg.task.type != "multiclass":
            cuts.append(thresholds_for(y, p, "binary", cfg.task.threshold)[0] if both else 0.5)
    aurocs = [out[f"auroc/{j}"] for j in range(k)]
    out["auroc"] = float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else float("nan")
    if cuts:
        out["thresholds"] = cuts
    return out
