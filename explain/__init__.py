"""Attributions and explanation reports (issue #3)."""
