"""Evaluation: needle, RULER-style synthetic tasks, LongBench, fidelity against the full cache."""
