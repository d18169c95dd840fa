"""Evaluation (lm-eval), the experiment sweep, its SQLite registry and the report."""
