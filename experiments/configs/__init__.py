"""Experiment configs (ml_collections), one file per row of the paper's tables."""
