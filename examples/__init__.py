"""Seed systems rebuilt on tidings: one small package each, run as ``python -m examples.NAME``."""
