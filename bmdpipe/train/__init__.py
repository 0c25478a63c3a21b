"""Training machinery shared by every method: folds, the epoch loop, checkpoints, distributed runs."""
