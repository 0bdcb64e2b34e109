"""Analysis: penultimate-feature statistics, their figures and the training curves."""
