"""Evaluation: metrics with grouped-bootstrap CIs, operating points, calibration, comparisons, baselines and CV."""
