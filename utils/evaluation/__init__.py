"""Evaluation: the attack catalogue, the cascade runner, the adaptive attacks, sanity checks, the
AutoAttack adapter and the reports; :func:`evaluate_model` evaluates any model."""
from utils.evaluation.suite import evaluate_model

__all__ = ["evaluate_model"]
