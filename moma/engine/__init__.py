"""Engine: the one training loop, evaluation, checkpoints, run folders, plots."""
