"""Training: the method registry, the step, per-epoch monitoring, the epoch loop and its command line."""
