"""The evaluation's base names, imported by every other evaluation module (so none of them needs
another's to raise or label): the error type and the label of reference-code reproductions."""

REFERENCE_LABEL = "reproduces the reference code, not a robustness figure"


class EvaluationError(ValueError):
    """Evaluation asked for something impossible (unknown attack, missing dataset name, ...)."""
