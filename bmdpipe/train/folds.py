"""Patient-level K-fold split, fixed once and shared by every method."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def make_folds(patients: Sequence[str], k: int, seed: int) -> dict[str, list[str]]:
    """Split patients into ``k`` folds of near-equal size, no patient in two folds.

    Returns:
        ``{"0": [...], "1": [...], ...}`` (sorted ids within a fold); the same
        inputs always give the same split.
    """
    unique = sorted(set(patients))
    if k < 2 or k > len(unique):
        raise ValueError(f"need 2 <= k <= {len(unique)} patients, got k={k}")
    order = np.random.default_rng(seed).permutation(len(unique))
    return {str(f): sorted(unique[i] for i in order[f::k]) for f in range(k)}


def split(folds: dict[str, list[str]], test_fold: int, n_val_folds: int = 0) -> dict[str, list[str]]:
    """Train / validation / test patients when fold ``test_fold`` is held out.

    The ``n_val_folds`` folds after the test fold (cyclically) are validation.
    """
    k = len(folds)
    val = {(test_fold + 1 + i) % k for i in range(n_val_folds)}
    train = [p for f in range(k) if f != test_fold and f not in val for p in folds[str(f)]]
    return {"train": train, "val": [p for f in sorted(val) for p in folds[str(f)]], "test": list(folds[str(test_fold)])}
