"""Evaluation: agreement and screening metrics with bootstrap confidence intervals."""
