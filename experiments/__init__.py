"""Experiment entry points: configs, ``python -m experiments.train`` and the report."""
