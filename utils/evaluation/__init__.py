"""Evaluation: the attack catalogue, the adaptive attacks, sanity checks and the AutoAttack adapter."""
